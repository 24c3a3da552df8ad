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

from gpt2.backends.base import Backend, make_adamw, moment_shapes_problem
from gpt2.checkpoint import safe_load
from gpt2.checkpoint.files import CheckpointError, optimizer_state_problem, state_dict_problem
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
        """model.pt and optimizer.pt into this rank's model and optimizer. A file that does not fit
        them (its sha256 matching, or unchecked) is a CheckpointError: one line naming it."""
        assert self.optimizer is not None and self.raw_model is not None
        path = ckpt_dir / "model.pt"
        sd = safe_load.load(path, map_location=self.device)  # scanned, weights_only; unreadable: one line
        why = state_dict_problem(sd) or _fit_problem(sd, self.raw_model.state_dict())
        if why is None:
            try:
                self.raw_model.load_state_dict(sd)
            except RuntimeError as exc:  # anything _fit_problem did not foresee
                why = f"does not fit this run's model ({safe_load.brief(exc)})"
        if why is not None:
            raise CheckpointError(f"{path} {why}; move its checkpoint aside to resume from the one before")
        path = ckpt_dir / "optimizer.pt"
        opt = safe_load.load(path, map_location=self.device)
        why = optimizer_state_problem(opt)
        if why is None:
            try:
                self.optimizer.load_state_dict(opt)
            except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:  # groups or sizes differ
                why = f"does not fit this run's optimizer ({type(exc).__name__}: {safe_load.brief(exc)})"
        if why is None:
            why = moment_shapes_problem(self.optimizer)
        if why is not None:
            raise CheckpointError(f"{path} {why}; move its checkpoint aside to resume from the one before")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        assert self.raw_model is not None
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}


def _fit_problem(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str | None:
    """Why the state dict `sd` does not fit a model whose state dict is `own` (names, then shapes), or None."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = [f"{len(names)} weights {what}, e.g. {', '.join(names[:2])}"
                 for names, what in ((missing, "missing"), (unexpected, "unexpected")) if names]
        return f"does not fit this run's model ({'; '.join(parts)})"
    for k, v in own.items():
        if sd[k].shape != v.shape:
            return f"does not fit this run's model ({k} has shape {tuple(sd[k].shape)}, the model's {tuple(v.shape)})"
    return None
