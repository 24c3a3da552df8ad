"""The small interface every backend implements, and what they share.

The training loop (gpt2/train.py) only talks to this interface:

    backend.setup(model)                       # wrap, build the optimizer
    loss = backend.forward_backward(x, y, last_micro)   # one micro-batch, loss already / accum
    grad_norm = backend.optimizer_step(lr)     # clip, step, zero grads
    backend.stage(dir, copy) -> Staged         # this rank's share of model + optimizer state, off the device
    staged.write(dir)                          # ... written, fsynced and hashed (any thread, no collectives)
    backend.save(dir) / backend.load(dir)      # stage(dir, copy=False).write(dir) / read it back
    backend.full_state_dict()                  # the whole model (our layout), for export
    backend.state_bytes()                      # parameter + optimizer bytes this rank holds
    backend.close()                            # let go of the process group (before it is destroyed)

A backend never imports another backend.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from gpt2.checkpoint.writer import FileInfo, HostStager, Staged
from gpt2.config import TrainerSettings
from gpt2.distributed import DistInfo
from gpt2.model import GPT

# Settings only some backends read; any other backend warns once when one differs from its default.
BACKEND_ONLY = {
    "reshard_after_forward": ("fsdp", True),
    "forward_prefetch": ("fsdp", 1),
    "backward_prefetch": ("fsdp", 1),
    "cpu_offload": ("fsdp", False),
    "deepspeed_config": ("deepspeed", "deepspeed_configs/zero1.json"),
}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (matmuls, embeddings), none on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_adamw(model: torch.nn.Module, s: TrainerSettings, device: torch.device) -> torch.optim.AdamW:
    fused = device.type == "cuda"  # fused AdamW only exists on CUDA
    return torch.optim.AdamW(
        param_groups(model, s.weight_decay), lr=s.lr, betas=(s.beta1, s.beta2), eps=1e-8, fused=fused
    )


def moment_shapes_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """After load_state_dict: a per-parameter state tensor (AdamW's moments) whose shape is not its
    parameter's would fail the first optimizer step; None when every one fits."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    return (f"holds {name} of shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}: "
                            "it does not fit this run's optimizer")
    return None


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`, as this rank holds them: a DTensor counts its
    local shard, and a storage reached twice (tied weights, views into one flat buffer) counts once."""
    # imported here: torch.distributed.tensor takes seconds to import, which DDP runs need not pay
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class Backend:
    """Common state and defaults; subclasses override what differs."""

    name = "base"

    def __init__(self, settings: TrainerSettings, dist: DistInfo):
        self.s = settings
        self.dist = dist
        self.device = dist.device
        self.model: torch.nn.Module | None = None  # the wrapped model
        self.raw_model: GPT | None = None  # the plain GPT underneath
        self.optimizer: torch.optim.Optimizer | None = None
        self.stager = HostStager()  # host buffers kept from one asynchronous save to the next
        self._warn_ignored()

    def _warn_ignored(self) -> None:
        for key, (owner, default) in BACKEND_ONLY.items():
            if owner != self.name and getattr(self.s, key) != default and self.dist.is_main:
                logger.warning(f"trainer.config.{key} is only read by trainer={owner}; ignored by {self.name}")

    # ---- numerics -------------------------------------------------------------------
    def autocast(self):  # noqa: ANN201 - a context manager
        """bf16 autocast for backends whose parameters stay fp32 (DDP); others override."""
        if self.s.use_mixed_precision:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def maybe_compile(self, model: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(model) if self.s.compile else model

    # ---- the interface ----------------------------------------------------------------
    @classmethod
    def preload(cls) -> None:
        """Import the libraries this backend uses before the process group exists.

        Some evaluate `group.WORLD` in default arguments at import time; imported later, they would
        hold the group for the life of the interpreter (see gpt2.distributed)."""

    def setup(self, model: GPT) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what this backend keeps of the process group (its engine, caches), so that
        `distributed.destroy()` can end the group's threads; the backend is unusable after."""

    @classmethod
    def teardown(cls) -> None:
        """Once per process, after every backend of this kind is closed and before
        `distributed.destroy()`: drop what the library keeps at module level."""

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last_micro: bool) -> torch.Tensor:
        raise NotImplementedError

    def optimizer_step(self, lr: float) -> float:
        """Clip, step, zero the gradients; returns the pre-clip global gradient norm.

        Shared by DDP and FSDP: on FSDP's DTensor gradients torch computes the norm over the
        shards and reduces it across ranks, so only the final `full_tensor()` differs."""
        assert self.optimizer is not None and self.raw_model is not None
        self.stager.fence()  # a save's host copy must have read the state this step changes
        self.set_lr(lr)
        norm = torch.nn.utils.clip_grad_norm_(
            self.raw_model.parameters(), self.s.grad_clip if self.s.grad_clip > 0 else float("inf")
        )
        if hasattr(norm, "full_tensor"):  # a DTensor (FSDP); not imported here, see held_bytes
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        self.model.eval()
        with self.autocast():
            _, loss = self.model(x.to(self.device), y.to(self.device))
        self.model.train()
        return loss.detach().float()

    def stage(self, ckpt_dir: Path, copy: bool) -> Staged:
        """Collective: this rank's share of model + optimizer state, ready to be written into `ckpt_dir`
        without the device or the process group (gpt2/checkpoint/writer.py). `copy`: on the host,
        independent of the live tensors (an asynchronous save: training goes on meanwhile); else
        the live state, written before training continues."""
        raise NotImplementedError

    def save(self, ckpt_dir: Path) -> dict[str, FileInfo]:
        """Collective: write this rank's share into `ckpt_dir` now; {file: size and sha256}."""
        return self.stage(ckpt_dir, copy=False).write(ckpt_dir)

    def load(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model in our own layout (collective for sharded backends; all ranks call)."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of parameters and optimizer state held by this rank (local shards only), for memory reports."""
        assert self.raw_model is not None and self.optimizer is not None
        state = [t for st in self.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
        return held_bytes([*self.raw_model.parameters(), *state])

    def set_lr(self, lr: float) -> None:
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
