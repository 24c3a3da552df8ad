"""Process-group set-up from whatever launcher started us.

torchrun and the deepspeed launcher export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.
Under SLURM without them (srun, submitit), submitit's TorchDistributedEnvironment derives them
from the SLURM variables. A single process gets an in-process store, so every backend
(FSDP and DeepSpeed need a process group) runs the same way at world size 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gpt2.errors import UserError

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


def init(device_pref: str = "auto") -> DistInfo:
    """Join (or create) the default process group; idempotent."""
    _env_from_slurm()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = pick_device(device_pref, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=INIT_TIMEOUT)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=INIT_TIMEOUT,
                                    device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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
