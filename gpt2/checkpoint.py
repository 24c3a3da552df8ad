"""Checkpoints that are either whole or absent.

Commit protocol (every backend):
  1. rank 0 creates `step_XXXXXXXX.tmp/`; every rank writes its share into it (backend.save)
     plus its own RNG state;
  2. every node fsyncs what was written;
  3. rank 0 writes MANIFEST.json last (format version, step, backend, world size, config,
     trainer state, every file's size and sha256), fsyncs it, renames the directory to
     `step_XXXXXXXX/`, and replaces the `latest` pointer atomically under a file lock;
  4. retention removes checkpoints beyond the last N, keeping every M-th step.

On start rank 0 picks the newest checkpoint whose manifest verifies, falling back to older
ones (and saying why), removes leftover `.tmp` directories, and broadcasts its choice.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from loguru import logger

from gpt2 import distributed
from gpt2.config import CheckpointSettings
from gpt2.distributed import DistInfo
from gpt2.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
LATEST = "latest"


class CheckpointError(UserError):
    """A checkpoint that cannot be used with this run (one line: what differs, what to do)."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path, bufsize: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_file(Path(dirpath) / f)
        _fsync_file(Path(dirpath))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


# ---- RNG state ---------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every generator a step can touch, in a form `torch.load(weights_only=True)` accepts."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the manager ---------------------------------------------------------------------------
@dataclass
class Resume:
    """What a verified checkpoint tells the loop."""

    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def trainer_state(self) -> dict[str, Any]:
        return self.manifest["trainer_state"]


class CheckpointManager:
    def __init__(self, root: Path, settings: CheckpointSettings, dist: DistInfo):
        self.root = Path(root)
        self.s = settings
        self.dist = dist
        self.lock = FileLock(str(self.root / ".lock"))
        self.last_save_s = 0.0

    # -- writing ------------------------------------------------------------------------
    def save(self, step: int, backend: Any, *, meta: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank calls with the same step. Returns the committed directory."""
        t0 = time.perf_counter()
        final = self.root / step_name(step)
        tmp = self.root / (step_name(step) + ".tmp")
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        distributed.barrier()
        backend.save(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{self.dist.rank:05d}.pt")
        distributed.barrier()
        if self.dist.local_rank == 0:  # one process per node flushes the node's page cache
            _fsync_tree(tmp)
        distributed.barrier()
        if self.dist.is_main:
            self._commit(tmp, final, step, backend.name, meta, trainer_state)
            self._retain()
        distributed.barrier()
        self.last_save_s = time.perf_counter() - t0
        return final

    def _commit(self, tmp: Path, final: Path, step: int, backend: str, meta: dict[str, Any],
                trainer_state: dict[str, Any]) -> None:
        files = {}
        for p in _files(tmp):
            rel = str(p.relative_to(tmp))
            files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p) if self.s.verify_checksums else None}
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "backend": backend,
            "world_size": self.dist.world_size,
            "time": time.time(),
            **meta,
            "trainer_state": trainer_state,
            "files": files,
        }
        mpath = tmp / MANIFEST
        mpath.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _fsync_file(mpath)
        if final.exists():  # a re-save of the same step (e.g. finish right after an interval save)
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_file(self.root)
        with self.lock:
            ptr = self.root / (LATEST + ".tmp")
            ptr.write_text(final.name + "\n")
            _fsync_file(ptr)
            ptr.replace(self.root / LATEST)
        logger.info(f"checkpoint {final.name} committed ({sum(f['size'] for f in files.values()) / 1e6:.1f} MB)")

    def _retain(self) -> None:
        steps = sorted(self._committed(), reverse=True)
        keep = set(steps[: self.s.keep_last])
        if self.s.keep_every > 0:
            keep |= {s for s in steps if s % self.s.keep_every == 0}
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.root / step_name(s), ignore_errors=True)

    def _committed(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.glob("step_*"):
            if p.is_dir() and not p.name.endswith(".tmp"):
                try:
                    out.append(int(p.name.split("_", 1)[1]))
                except ValueError:
                    continue
        return out

    # -- finding and verifying -------------------------------------------------------------
    def verify(self, path: Path, checksums: bool | None = None) -> str | None:
        """None when the checkpoint is whole; otherwise why not (one line)."""
        checksums = self.s.verify_checksums if checksums is None else checksums
        mpath = path / MANIFEST
        if not mpath.is_file():
            return f"{path.name}: no {MANIFEST} (an interrupted write)"
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            return f"{path.name}: unreadable {MANIFEST} ({exc})"
        if manifest.get("format_version") != FORMAT_VERSION:
            return f"{path.name}: format version {manifest.get('format_version')} (this code reads {FORMAT_VERSION})"
        for rel, info in manifest["files"].items():
            p = path / rel
            if not p.is_file():
                return f"{path.name}: {rel} is missing"
            if p.stat().st_size != info["size"]:
                return f"{path.name}: {rel} has {p.stat().st_size} bytes, manifest says {info['size']}"
            if checksums and info.get("sha256") and _sha256(p) != info["sha256"]:
                return f"{path.name}: {rel} fails its sha256 check"
        return None

    def find_latest(self) -> Resume | None:
        """Collective: rank 0 picks the newest verified checkpoint, all ranks get it."""
        choice: str | None = None
        if self.dist.is_main:
            for leftover in self.root.glob("step_*.tmp") if self.root.is_dir() else []:
                logger.warning(f"removing unfinished checkpoint {leftover.name}")
                shutil.rmtree(leftover, ignore_errors=True)
            for step in sorted(self._committed(), reverse=True):
                path = self.root / step_name(step)
                why = self.verify(path)
                if why is None:
                    choice = str(path)
                    break
                logger.warning(f"skipping damaged checkpoint: {why}")
        choice = distributed.broadcast_object(choice)
        if choice is None:
            return None
        path = Path(choice)
        return Resume(path=path, manifest=json.loads((path / MANIFEST).read_text()))

    def restore_rng(self, resume: Resume) -> None:
        """This rank's RNG state, when the checkpoint has one for it (same or larger world)."""
        f = resume.path / f"rng_rank{self.dist.rank:05d}.pt"
        if f.is_file():
            set_rng_state(torch.load(f, weights_only=True))


def check_compatible(manifest: dict[str, Any], backend: str, compat: dict[str, Any], world_size: int,
                     path: Path) -> None:
    """Refuse a checkpoint this run cannot continue from, saying what differs."""
    if manifest["backend"] != backend:
        raise CheckpointError(
            f"{path} was written by trainer={manifest['backend']}, this run uses trainer={backend}: "
            f"resume with trainer={manifest['backend']} or convert it with `python -m gpt2.export`"
        )
    saved = manifest.get("config", {})
    diffs = [k for k in sorted(set(saved) | set(compat)) if saved.get(k) != compat.get(k)]
    if diffs:
        k = diffs[0]
        raise CheckpointError(
            f"{path} has {k}={saved.get(k)!r} but this run has {k}={compat.get(k)!r}"
            + (f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else "")
            + ": use the checkpoint's config or a new run.dir"
        )
    if backend == "deepspeed" and manifest["world_size"] != world_size:
        raise CheckpointError(
            f"{path} was saved by {manifest['world_size']} DeepSpeed ranks, this run has {world_size}: "
            f"resume with the same number of ranks, or export it with `python -m gpt2.export`"
        )
