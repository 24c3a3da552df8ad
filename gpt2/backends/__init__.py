"""Training backends: each wraps the model, steps the optimizer and saves/loads its own state."""

from __future__ import annotations

from gpt2.backends.base import Backend
from gpt2.config import TrainerSettings
from gpt2.distributed import DistInfo


def backend_class(name: str) -> type[Backend]:
    """Import only the chosen backend (DeepSpeed is slow to import and never needed by DDP)."""
    if name == "ddp":
        from gpt2.backends.ddp import DDPBackend as cls
    elif name == "fsdp":
        from gpt2.backends.fsdp import FSDPBackend as cls
    elif name == "deepspeed":
        from gpt2.backends.deepspeed import DeepSpeedBackend as cls
    else:
        raise ValueError(f"unknown backend {name!r}")
    return cls


def make_backend(name: str, settings: TrainerSettings, dist: DistInfo) -> Backend:
    return backend_class(name)(settings, dist)
