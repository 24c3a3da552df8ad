"""Process-group set-up from whatever launcher started us.

torchrun and the deepspeed launcher export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.
Under SLURM without them (srun, submitit), submitit's TorchDistributedEnvironment derives them
from the SLURM variables. A single process gets an in-process store, so every backend
(FSDP and DeepSpeed need a process group) runs the same way at world size 1.

Teardown matters as much as set-up. A process group owns C++ threads (gloo's work loops and
transport loop, NCCL's watchdog, rank 0's TCPStore server). They stop only when the group's C++
object is destroyed; one still alive when the interpreter finalizes may finish a collective and
drop the last reference to a Python-owned tensor, which needs the GIL, which a finalizing
interpreter never gives back: the thread is unwound inside a noexcept destructor, std::terminate
prints "terminate called without an active exception" and the rank dies with SIGABRT instead of
its exit code. So `destroy()` must leave nothing referencing the group, and `init()` keeps torch
itself from holding it (see `_bind_defaults_before_init`).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt2.errors import UserError

# thread names torch gives the threads of gloo, NCCL and the TCPStore (pt_gloo_runloop, gloo_tcp_loop,
# pt_nccl_watchdg, pt_tcpstore_uv, ...)
_C10D_THREAD_PREFIXES = ("pt_", "gloo")
# ... but not autograd's per-device workers (pt_autograd_0, ...): a backward on an accelerator starts
# them (a CUDA build of torch also on a machine without a GPU) and they live as long as the process
_NOT_C10D_PREFIXES = ("pt_autograd",)
INIT_TIMEOUT = timedelta(seconds=int(os.environ.get("GPT2_DIST_TIMEOUT_S", "600")))


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_from_slurm() -> None:
    """Fill RANK & co. from SLURM when a multi-task job step started us without a launcher."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    port = os.environ.get("MASTER_PORT")
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if port:  # the launcher's per-job port wins over submitit's derived one
        os.environ["MASTER_PORT"] = port


def pick_device(pref: str, local_rank: int) -> torch.device:
    """`auto` (CUDA when visible), `cpu`, `cuda` (the local rank's GPU) or `cuda:N`; a device that
    does not exist here is a UserError (one line, exit 2), not a crash."""
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"run.device={pref} but no CUDA device is visible here: use run.device=cpu or auto")
    index = int(pref.split(":", 1)[1]) if ":" in pref else local_rank
    if index >= torch.cuda.device_count():
        raise UserError(f"run.device={pref}: GPU {index} does not exist here ({torch.cuda.device_count()} visible)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _bind_defaults_before_init() -> None:
    """Import torch.distributed.nn.functional while no process group exists.

    Its collectives take `group=group.WORLD` as a default argument, evaluated once at import: imported
    after the default group exists (torch imports it lazily, e.g. through torch.distributed._shard),
    a dozen functions hold that group for the life of the interpreter and `destroy()` cannot free it.
    Imported first, those defaults are None, which those functions read as the default group anyway.
    """
    import torch.distributed.nn.functional  # noqa: F401


def init(device_pref: str = "auto") -> DistInfo:
    """Join (or create) the default process group; idempotent."""
    _env_from_slurm()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = pick_device(device_pref, local_rank)
    if not dist.is_initialized():
        _bind_defaults_before_init()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=INIT_TIMEOUT)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=INIT_TIMEOUT,
                                    device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def destroy(synchronize: bool = True) -> list[str]:
    """End the process group and its C++ threads now, before the interpreter exits.

    Call it after dropping everything that holds the group (model wrappers, optimizers, the
    backend, after its `close()`): the group's threads stop when its last reference goes, which
    `gc.collect()` here hastens for reference cycles. `synchronize` (collective): first wait at a
    barrier so rank 0 does not take the store down while another rank still uses it; pass False on
    an error path, where the other ranks may never arrive. Returns the names of the
    process-group threads still running (and warns when there are any): empty is the contract.
    """
    if dist.is_initialized():
        if synchronize:
            barrier()
        dist.destroy_process_group()
    gc.collect()
    left = process_group_threads()
    if left:
        from loguru import logger

        logger.warning(f"process-group threads still running after destroy ({', '.join(left)}): something "
                       "still holds the group, and the interpreter may abort at exit")
    return left


def process_group_threads(settle_s: float = 1.0) -> list[str]:
    """Names of this process's threads that belong to torch.distributed (gloo, NCCL, TCPStore); Linux only.

    A thread that was just joined can still be listed for a moment: `join` returns when the thread
    clears its id, a little before the kernel removes it from /proc/self/task. So a non-empty answer
    is read again for up to `settle_s` seconds; a thread that is really still running stays listed.
    """
    deadline = time.monotonic() + settle_s
    while (names := _listed_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return names


def _listed_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(n for n in names if n.startswith(_C10D_THREAD_PREFIXES) and not n.startswith(_NOT_C10D_PREFIXES))


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce(values: list[float], op: str = "sum", device: torch.device | None = None) -> list[float]:
    """All-reduce a few floats (sum or max) in one collective; identity at world size 1."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()
