"""What a rank of a job sets up before it trains: its process-group variables, a port per job, the
restart count, its thread count, where torch.compile keeps its caches, and the checkpoint interval's M.

Pure environment writes (launch/job.py calls them; gpt2/ only reads the variables).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2.config import fixed_interval
from launch import goodput, record

if TYPE_CHECKING:
    from launch.job import JobEntry

COMPILE_CACHE = ".compile-cache"  # in the sweep's folder: torch.compile's caches, shared by its jobs
PORT_BASE, PORT_SPAN = 20000, 40000


def master_port(unique_job_id: str) -> int:
    """A port per job: SLURM gives every array task its own SLURM_JOB_ID, and local jobs a pid."""
    digits = "".join(ch for ch in unique_job_id if ch.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


@dataclass
class TaskContext:
    rank: int
    world_size: int
    job_id: str | None  # what scontrol requeue takes: "123" or "123_4"
    restarts: int
    run_dir: Path
    started: float = 0.0  # when this attempt began: older failure reports are not its own


def setup_env(entry: JobEntry, prior: record.RunState) -> TaskContext:
    """Export the distributed set-up and restart count for this rank; pure environment writes."""
    run_dir = Path(entry.cfg.run.dir)
    job_id: str | None = None
    if entry.executor == "debug":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.pop("MASTER_ADDR", None)
        rank, world, local_world = 0, 1, 1
    else:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        env = JobEnvironment()
        dist_env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        job_id = env.job_id
        os.environ["MASTER_PORT"] = str(master_port(os.environ.get("SLURM_JOB_ID") or env.raw_job_id))
        if entry.executor == "local":
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        rank, world, local_world = dist_env.rank, dist_env.world_size, dist_env.local_world_size
    restarts = max(prior.restarts, int(os.environ.get("SLURM_RESTART_COUNT") or 0))
    os.environ["GPT2_RESTART_COUNT"] = str(restarts)
    if entry.cfg.trainer.config.compile:
        share_compile_cache(Path(entry.sweep_dir))
    if "OMP_NUM_THREADS" not in os.environ:
        n = entry.threads or int(os.environ.get("SLURM_CPUS_PER_TASK") or 0) or (os.cpu_count() or 1) // local_world
        os.environ["OMP_NUM_THREADS"] = str(max(1, n))
    return TaskContext(rank=rank, world_size=world, job_id=job_id, restarts=restarts, run_dir=run_dir)


def share_compile_cache(sweep_dir: Path) -> None:
    """Point torch.compile's caches (inductor's graphs and code, Triton's kernels) at the sweep's folder,
    unless the user pointed them elsewhere. Their default, under /tmp, is per node: an attempt requeued onto
    another node compiled everything again. In the sweep's folder, on the shared filesystem, every
    later attempt, and every trial of the same model and shapes, starts from the compiled kernels."""
    root = sweep_dir.absolute() / COMPILE_CACHE
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, _inductor_default()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))


def _inductor_default() -> str | None:
    """inductor's own per-node default. Once a process has compiled, inductor writes it into that
    process's environment, so a launcher's environment may carry it without anyone choosing it."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch: then only an unset variable is replaced
        return None
    return default_cache_dir()


def mtbi(entry: JobEntry) -> tuple[float | None, str]:
    """M for the Young/Daly interval: the sweep's ledger once it has seen interruptions, else the
    cluster profile's `mtbi_hours` (None: gpt2/checkpoint/interval.py's default)."""
    seen = goodput.sweep_mtbi(entry.sweep_dir)
    if seen is not None:
        return seen[0], f"sweep ledger: {seen[1]} interruption(s)"
    return entry.mtbi_s, "cluster profile mtbi_hours"


def export_mtbi(entry: JobEntry) -> None:
    """GPT2_MTBI_S and GPT2_MTBI_SOURCE for a trainer with `interval: auto` (gpt2/ reads no sweep)."""
    if fixed_interval(entry.cfg.trainer.config.checkpoint_strategy.config) is not None:
        return
    m, source = mtbi(entry)
    if m is not None:
        os.environ["GPT2_MTBI_S"], os.environ["GPT2_MTBI_SOURCE"] = f"{m:.1f}", source
