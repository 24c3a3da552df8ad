"""What a run tells the world: loguru lines, metrics.jsonl, Weights & Biases, MFU.

Rank 0 logs to the console; every rank logs to `<run.dir>/logs/rank<N>.log`; each line carries
the job id, array index and restart count. Rank 0 appends one JSON object per logged step to
`<run.dir>/metrics.jsonl` and mirrors it to W&B. The W&B run id is created once and kept in
`<run.dir>/wandb_id.txt` (and in each checkpoint's manifest), so requeues continue one run.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from gpt2.config import Config, to_dict

# Peak dense bf16 FLOP/s for MFU. CPU figure: a nominal 2.5 GHz x 32 fp32 FLOP/cycle per core (AVX2 FMA);
# set GPT2_PEAK_FLOPS to your hardware's number for exact MFU.
_GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


def peak_flops(device: torch.device) -> float:
    if os.environ.get("GPT2_PEAK_FLOPS"):
        return float(os.environ["GPT2_PEAK_FLOPS"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in _GPU_PEAK.items():
            if key in name:
                return val
        return 312e12
    return (os.cpu_count() or 1) * 2.5e9 * 32


def job_tags() -> dict[str, str]:
    return {
        "job": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or "local",
        "task": os.environ.get("SLURM_ARRAY_TASK_ID", "-"),
        "restart": os.environ.get("GPT2_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT", "0"),
    }


def setup_logging(run_dir: Path, rank: int) -> None:
    """Console for rank 0, a file per rank; every line tagged with job, array task and restart."""
    tags = job_tags()
    logger.remove()
    logger.configure(extra={**tags, "rank": rank})
    fmt = "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | job {extra[job]}[{extra[task]}] r{extra[restart]} rank{extra[rank]} | {message}"
    if rank == 0:
        logger.add(sys.stderr, format=fmt, level=os.environ.get("GPT2_LOG_LEVEL", "INFO"))
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    logger.add(run_dir / "logs" / f"rank{rank}.log", format=fmt, level="DEBUG", enqueue=False)


def wandb_run_id(run_dir: Path) -> str:
    """The run's W&B id, created once and kept in the run directory."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    rid = uuid.uuid4().hex[:12]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(rid + "\n")
    tmp.replace(path)
    return rid


class MetricsLogger:
    """Rank 0 writes metrics.jsonl and W&B; other ranks do nothing."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int, wandb_id: str | None, restart: int = 0):
        self.enabled = rank == 0
        self.restart = restart
        self.path = run_dir / "metrics.jsonl"
        self._wandb = None
        if self.enabled and cfg.wandb.mode != "disabled":
            self._wandb = self._init_wandb(cfg, run_dir, wandb_id)

    @staticmethod
    def _init_wandb(cfg: Config, run_dir: Path, wandb_id: str | None) -> Any:
        import wandb

        mode = cfg.wandb.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
            mode = os.environ["WANDB_MODE"]
        return wandb.init(
            project=cfg.wandb.project or cfg.run.sweep or "gpt2",
            group=cfg.wandb.group or cfg.run.sweep,
            name=cfg.wandb.name or cfg.run.job or Path(cfg.run.dir).name,
            entity=cfg.wandb.entity,
            id=wandb_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=to_dict(cfg),
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {**metrics, "restart": self.restart}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if v is not None}, step=int(row["step"]))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: allocated CUDA memory on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
