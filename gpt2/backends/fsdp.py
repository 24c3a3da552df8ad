"""FSDP2: parameters, gradients and optimizer state sharded across ranks with `fully_shard`.

Each transformer block is one FSDP unit: its parameters are all-gathered just before it runs
and freed again after forward (unless reshard_after_forward=false) and after backward, where
its gradients are reduce-scattered. The root unit holds the rest: wte (tied to lm_head), wpe,
ln_f. Mixed precision keeps fp32 shards and computes in bf16, reducing gradients in fp32.
Accumulation defers the reduce-scatter to the last micro-batch. Checkpoints are sharded
(`torch.distributed.checkpoint`, one file per rank plus metadata under `<dir>/dcp/`) and
reshard on load, so a run saved on N ranks continues on M. A save runs DCP (and its
collectives) on the training thread into host memory; the bytes reach the disk later, from
any thread (`stage`).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Generator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from loguru import logger
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from gpt2.backends.base import Backend, make_adamw
from gpt2.checkpoint import safe_load
from gpt2.checkpoint.files import CheckpointError
from gpt2.checkpoint.writer import FileInfo, Staged, write_all, write_bytes
from gpt2.model import GPT

_DCP = "dcp"  # DCP's directory inside a checkpoint


class _MemoryFiles(FileSystemBase):
    """The files DCP writes, kept in memory under their path relative to the checkpoint, until
    `write` puts them on the disk (hashed as they go; see gpt2/checkpoint/writer.py)."""

    def __init__(self) -> None:
        self.files: dict[str, _KeptBytes] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        assert mode == "wb", mode  # saving only
        buf = _KeptBytes()
        yield buf
        self.files[str(path)] = buf

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{path}/{suffix}"

    def init_path(self, path: str | os.PathLike) -> str:
        return str(path)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.files[str(new_path)] = self.files.pop(str(path))

    def mkdir(self, path: str | os.PathLike) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def exists(self, path: str | os.PathLike) -> bool:
        return str(path) in self.files

    def rm_file(self, path: str | os.PathLike) -> None:
        del self.files[str(path)]

    def write(self, ckpt_dir: Path) -> dict[str, FileInfo]:
        def job(buf: _KeptBytes) -> Callable[[Path], FileInfo]:
            return lambda path: write_bytes(buf.getbuffer(), path)

        return write_all(ckpt_dir, [(rel, job(buf)) for rel, buf in self.files.items()])


class _KeptBytes(io.BytesIO):
    """A BytesIO that DCP's writer may close without losing the bytes."""

    def close(self) -> None:
        pass


class _MemoryWriter(FileSystemWriter):
    """DCP's own file writer (one file per rank plus rank 0's .metadata), into `_MemoryFiles`."""

    def __init__(self) -> None:
        super().__init__(_DCP, sync_files=False)  # fsync happens when the bytes reach the disk
        self.fs = _MemoryFiles()


class FSDPBackend(Backend):
    name = "fsdp"

    def setup(self, model: GPT) -> None:
        s = self.s
        mesh = self.mesh = init_device_mesh(self.device.type, (self.dist.world_size,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if s.use_mixed_precision else MixedPrecisionPolicy())
        offload: OffloadPolicy = OffloadPolicy()
        if s.cpu_offload and self.device.type == "cpu" and self.dist.is_main:
            logger.warning("trainer.config.cpu_offload has no effect on CPU: the shards already live in host memory")
        elif s.cpu_offload and self.device.type != "cpu":
            offload = CPUOffloadPolicy()  # shards and the optimizer step stay on the host
        # GPT returns logits[..., :vocab_size], a view that drops the padded vocab rows, and FSDP2 warns
        # in case someone edits it in place; nothing here does, so the warning is noise on every run.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        if not s.cpu_offload or self.device.type == "cpu":
            model = model.to(self.device)
        blocks = list(model.transformer.h)
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=s.reshard_after_forward,
                        mp_policy=mp, offload_policy=offload)
        # The root keeps FSDP's default (no reshard after forward): lm_head runs first in backward.
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
        # Explicit prefetch: block i asks for the next `forward_prefetch` blocks in forward and the
        # previous `backward_prefetch` blocks in backward, overlapping all-gathers with compute.
        for i, block in enumerate(blocks):
            assert isinstance(block, FSDPModule)
            block.set_modules_to_forward_prefetch(blocks[i + 1: i + 1 + s.forward_prefetch])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - s.backward_prefetch): i][::-1])
        self.raw_model = model  # fully_shard works in place: same module, DTensor parameters
        self.model = self.maybe_compile(model)
        self.optimizer = make_adamw(model, s, self.device)  # over the local shards

    def close(self) -> None:
        """DTensor's sharding and redistribution caches keep this mesh for the life of the process,
        and the mesh keeps the process group: make the mesh forget its groups."""
        registry = getattr(getattr(self, "mesh", None), "_pg_registry", None)  # torch's own field
        if isinstance(registry, dict):
            registry.clear()

    def autocast(self):  # noqa: ANN201 - a context manager
        """No autocast: the MixedPrecisionPolicy already computes in bf16."""
        return nullcontext()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last_micro: bool) -> torch.Tensor:
        assert self.model is not None and isinstance(self.raw_model, FSDPModule)
        # Off: gradients accumulate unsharded on each rank; on: reduce-scatter after this backward.
        self.raw_model.set_requires_gradient_sync(last_micro)
        _, loss = self.model(x.to(self.device), y.to(self.device))
        (loss / self.s.grad_accumulation_steps).backward()
        return loss.detach().float()

    def stage(self, ckpt_dir: Path, copy: bool) -> Staged:
        """Collective: DCP plans and serializes every rank's shard of model and optimizer into host
        memory (its collectives run here, on the calling thread); the files are written later.

        The bytes are the files a `dcp.save` to `<ckpt_dir>/dcp/` would have written, so loading
        does not know the difference. Serializing is itself the host copy: `copy` changes nothing."""
        assert self.optimizer is not None and self.raw_model is not None
        model_sd, optim_sd = get_state_dict(self.raw_model, self.optimizer)
        writer = _MemoryWriter()
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer, checkpoint_id=_DCP)
        return writer.fs

    def load(self, ckpt_dir: Path) -> None:
        """Collective: load `<ckpt_dir>/dcp/`, whatever world size wrote it (DCP reshards)."""
        assert self.optimizer is not None and self.raw_model is not None
        # get_state_dict gives the layout to fill (it also creates the AdamW state before the first
        # step), dcp.load reads into it in place, set_state_dict hands it back to model and optimizer.
        model_sd, optim_sd = get_state_dict(self.raw_model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        # .metadata is a plain pickle.load in torch, the byte items torch.load(weights_only=False):
        # every pickle is scanned first, and the byte items are read weights_only (gpt2.checkpoint.safe_load)
        safe_load.check_dir(ckpt_dir / "dcp", self.name)
        with safe_load.weights_only_loading(safe_load.DCP):
            try:
                dcp.load(state, checkpoint_id=str(ckpt_dir / "dcp"))
            except CheckpointException as exc:  # raised on every rank: DCP gathers the failures
                if (storage := safe_load.dcp_storage_failure(exc)) is not None:
                    raise storage from None  # the file system's: retried, the checkpoint kept
                line = safe_load.dcp_read_failure(exc)
                if line is None:
                    raise
                raise CheckpointError(f"{ckpt_dir / 'dcp'} is unreadable ({line}); move its checkpoint aside "
                                      "to resume from the one before") from None
        set_state_dict(self.raw_model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every rank gets the whole fp32 model on CPU, gathered one tensor at a time.

        Tied weights come back as one tensor under both names, as `GPT.state_dict()` gives them.
        """
        assert self.raw_model is not None
        out: dict[str, torch.Tensor] = {}
        gathered: dict[int, torch.Tensor] = {}
        for key, value in self.raw_model.state_dict(keep_vars=True).items():  # same order on every rank
            if id(value) not in gathered:
                full = value.full_tensor() if isinstance(value, DTensor) else value
                gathered[id(value)] = full.detach().cpu()
            out[key] = gathered[id(value)]
        return out
