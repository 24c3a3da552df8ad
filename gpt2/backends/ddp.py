"""DDP: every rank holds the whole model and optimizer; gradients are averaged in backward.

Accumulation skips the gradient all-reduce on all but the last micro-batch (`no_sync`).
Mixed precision is bf16 autocast over fp32 parameters. Rank 0 saves the full state once
(model.pt and optimizer.pt, written in parallel, from a host copy when the save is asynchronous).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2.backends.base import Backend, make_adamw
from gpt2.checkpoint import safe_load
from gpt2.checkpoint.writer import NothingStaged, Staged, TorchFiles
from gpt2.model import GPT


class DDPBackend(Backend):
    name = "ddp"

    def setup(self, model: GPT) -> None:
        self.raw_model = model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DDP(self.maybe_compile(self.raw_model), device_ids=ids)
        self.optimizer = make_adamw(self.raw_model, self.s, self.device)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last_micro: bool) -> torch.Tensor:
        assert self.model is not None
        sync = nullcontext() if last_micro else self.model.no_sync()
        with sync:
            with self.autocast():
                _, loss = self.model(x.to(self.device), y.to(self.device))
            (loss / self.s.grad_accumulation_steps).backward()
        return loss.detach().float()

    def stage(self, ckpt_dir: Path, copy: bool) -> Staged:
        """Rank 0's model and optimizer state (replicas are identical: one copy is the whole state),
        to be written as model.pt and optimizer.pt side by side."""
        assert self.optimizer is not None and self.raw_model is not None
        if not self.dist.is_main:
            return NothingStaged()
        state = {"model.pt": self.raw_model.state_dict(), "optimizer.pt": self.optimizer.state_dict()}
        if not copy:
            return TorchFiles(state)
        host = self.stager.add(state)
        self.stager.start()  # copies during the next forward and backward; optimizer_step fences
        return TorchFiles(host, ready=self.stager.ready)

    def load(self, ckpt_dir: Path) -> None:
        assert self.optimizer is not None and self.raw_model is not None
        sd = safe_load.load(ckpt_dir / "model.pt", map_location=self.device)  # scanned, weights_only
        self.raw_model.load_state_dict(sd)
        opt = safe_load.load(ckpt_dir / "optimizer.pt", map_location=self.device)
        self.optimizer.load_state_dict(opt)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        assert self.raw_model is not None
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}
