"""What a checkpoint directory holds and how it is read and checked, without a process group.

Names (`step_XXXXXXXX/`, `rank_NNNNN.pt`, MANIFEST.json, `latest`), the file helpers the writer
shares (sha256, fsync, atomic replace), the RNG states, and the reading side: `read_manifest`,
`verify` (sizes, sha256, every manifest entry a regular file inside the checkpoint, every pickle
scanned against the allow-lists of gpt2/checkpoint/safe_load.py), `newest_valid`, `resolve` (what export and
generate call) and `check_compatible`. The commit protocol and the collective manager are in
gpt2/checkpoint/manager.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger

from gpt2.checkpoint import manifest_check, safe_load
from gpt2.errors import UserError, is_storage_error
from gpt2.safe_write import write_atomic

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_RANK_RE = re.compile(r"^rank_\d{5,}\.pt$")
_IO_THREADS = 8  # fsync and sha256 release the GIL: overlap them across files


class CheckpointError(UserError):
    """A checkpoint that cannot be used with this run (one line: what differs, what to do)."""


def step_name(step: int) -> str:
    """`step_00001200` for step 1200: the directory name of a committed checkpoint."""
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a committed checkpoint's directory name; None for anything else (.tmp too)."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def rank_file(rank: int) -> str:
    """The file holding one rank's RNG states inside a checkpoint."""
    return f"rank_{rank:05d}.pt"


# ---- files -----------------------------------------------------------------------------------
def _sha256(path: Path, bufsize: int = 8 << 20) -> tuple[int, str]:
    """(bytes read, sha256 hex digest) of a file."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(bufsize)
        view = memoryview(buf)
        while k := f.readinto(buf):
            h.update(view[:k])
            n += k
    return n, h.hexdigest()


def _list_files(root: Path) -> list[str]:
    """Every file under root except the manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _describe(root: Path, rels: list[str], checksums: bool) -> dict[str, dict[str, Any]]:
    """{rel: {"size", "sha256"}} for the given files, hashed on a few threads."""

    def one(rel: str) -> tuple[str, dict[str, Any]]:
        p = root / rel
        if checksums:
            size, digest = _sha256(p)
            return rel, {"size": size, "sha256": digest}
        return rel, {"size": p.stat().st_size, "sha256": None}

    if not rels:
        return {}
    with ThreadPoolExecutor(min(_IO_THREADS, len(rels))) as pool:
        return dict(pool.map(one, rels))


_write_atomic = write_atomic  # the name manager.py imports (never follows a symlink at `<name>.tmp`)


# ---- RNG state -------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every generator a step can touch, in a form `torch.load(weights_only=True)` accepts."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device (gpt2.distributed made it current)
    return state


_RNG_ERRORS = (TypeError, ValueError, RuntimeError, OverflowError, AttributeError, IndexError, KeyError)


def rng_problem(state: Any) -> str | None:
    """Why `state` is not what `rng_state()` captured, or None: each generator's state is tried on
    a fresh generator of its kind, so a state that passes restores without an error."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not RNG states"
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        return f"has no {missing[0]} RNG state"
    try:
        v, internal, gauss = state["python"]
        if gauss is not None and not isinstance(gauss, float):  # setstate keeps any object here
            raise TypeError(f"python's cached gaussian is a {type(gauss).__name__}, not a float")
        random.Random().setstate((v, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"numpy keys are a {type(keys).__name__}, not a tensor")
        np.random.RandomState().set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
        torch.Generator().set_state(state["torch"])
        cuda = state.get("cuda")
        if cuda is not None and not (isinstance(cuda, torch.Tensor) and cuda.dtype == torch.uint8 and cuda.dim() == 1):
            raise TypeError(f"the cuda state is a {type(cuda).__name__}, not a byte tensor")
    except _RNG_ERRORS as exc:
        return f"holds unusable RNG states ({safe_load.brief(exc)})"
    return None


def set_rng_state(state: dict[str, Any], where: str = "the RNG state") -> None:
    """Restore what `rng_state()` captured; the CUDA state goes to the current device, if any.

    Raises CheckpointError (one line naming `where`) for a state that is not one (`rng_problem`)."""
    why = rng_problem(state)
    if why is not None:
        raise CheckpointError(f"{where} {why}; move its checkpoint aside to resume from the one before")
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state(state["cuda"])
        except RuntimeError as exc:  # a byte tensor of the wrong size for this device's generator
            raise CheckpointError(f"{where} holds an unusable cuda RNG state ({safe_load.brief(exc)}); "
                                  "move its checkpoint aside to resume from the one before") from None


# ---- reading and verifying (no process group needed) -----------------------------------------
def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory, checked for structure and types
    (gpt2.checkpoint.manifest_check). Raises CheckpointError if absent, unreadable or malformed."""
    mpath = Path(path) / MANIFEST
    manifest, why = _load_manifest(mpath)
    if manifest is None:
        if not os.path.lexists(mpath):
            raise CheckpointError(f"{path} has no {MANIFEST}: it is not a committed checkpoint")
        raise CheckpointError(f"{mpath} is unusable ({why}); pick another checkpoint")
    return manifest


def _load_manifest(mpath: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) for a well-formed manifest; (None, why) for anything else."""
    try:
        manifest, why = manifest_check.parse_manifest(manifest_check.read_text(mpath))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if is_storage_error(exc):  # the file system's failure, not the manifest's
            raise
        return None, f"unreadable {MANIFEST} ({exc})"
    if manifest is None:
        return None, f"unreadable {MANIFEST} ({why})"
    why = manifest_check.manifest_problem(manifest, FORMAT_VERSION)
    if why is not None:
        return None, f"malformed {MANIFEST}: {why}"
    return manifest, None


def verify(path: Path, checksums: bool = True) -> str | None:
    """None when the checkpoint at `path` is whole and safe to load; otherwise why not, in one line.

    Always checks that MANIFEST.json is a regular file that parses into a manifest of this code's
    format version, structure and types (gpt2.checkpoint.manifest_check) with the step of the directory
    name; that every listed file is a regular file inside the checkpoint (no absolute path, `..`,
    symlink out or FIFO) with its recorded size; and that every pickle among them imports only
    what its backend's files contain (gpt2.checkpoint.safe_load); and that torch reads the files
    whose content this code knows (every rank's RNG states, DDP's model.pt and optimizer.pt: their
    tensors mapped, not read) as what they should hold (`_content_problem`), since a matching
    sha256 does not make a file readable. With `checksums` also each file's sha256 (read on a few threads)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not os.path.lexists(mpath):
        return f"{path.name}: no {MANIFEST} (an interrupted write)"
    manifest, why = _load_manifest(mpath)
    if manifest is None:
        return f"{path.name}: {why}"
    step = parse_step(path.name)
    if step is not None and manifest["step"] != step:
        return f"{path.name}: manifest says step {manifest['step']!r}"
    files: dict[str, dict[str, Any]] = manifest["files"]
    for rel, info in files.items():
        why = manifest_check.file_problem(path, rel)
        if why is not None:
            return f"{path.name}: {why}"
        size = (path / rel).stat().st_size
        if size != info["size"]:
            return f"{path.name}: {rel} has {size} bytes, manifest says {info['size']}"
    if checksums:
        wanted = [rel for rel, info in files.items() if info.get("sha256")]
        got = _describe(path, wanted, checksums=True)
        for rel in wanted:
            if got[rel]["sha256"] != files[rel]["sha256"]:
                return f"{path.name}: {rel} fails its sha256 check (corrupted)"
    try:
        safe_load.check_tree(path, list(files), manifest["backend"])
        why = _content_problem(path, list(files), manifest["backend"])
    except safe_load.UnsafeCheckpointError as exc:
        return f"{path.name}: {exc}"
    return None if why is None else f"{path.name}: {why}"


def state_dict_problem(sd: Any) -> str | None:
    """Why `sd` is not a model's state dict (names -> tensors), or None."""
    if not isinstance(sd, dict):
        return f"holds a {type(sd).__name__}, not a model state dict (name -> tensor)"
    if not sd:
        return "holds an empty state dict, no weights"
    bad = next((k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        return f"holds {bad!r} -> {type(sd[bad]).__name__}, not a model state dict (name -> tensor)"
    return None


def optimizer_state_problem(opt: Any) -> str | None:
    """Why `opt` is not an optimizer's `state_dict()` ({"state": {index: {name: value}},
    "param_groups": [{"params": [index, ...], ...}]}), or None. Whether it fits a given optimizer
    (group and parameter counts, shapes) only that optimizer can tell (gpt2.backends.ddp)."""
    if not isinstance(opt, dict):
        return f"holds a {type(opt).__name__}, not an optimizer state"
    state, groups = opt.get("state"), opt.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list):
        return "holds no optimizer state (a 'state' object and a 'param_groups' list)"
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list) \
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in g["params"]):
            return "has a parameter group without a list of parameter indices"
    for i, s in state.items():
        if not isinstance(s, dict) or not all(isinstance(k, str) and isinstance(v, (torch.Tensor, int, float))
                                              for k, v in s.items()):
            return f"holds a state for parameter {i!r} that is not names -> tensors"
    return None


def _content_problem(path: Path, rels: list[str], backend: str) -> str | None:
    """What torch itself makes of the files this code knows the content of (every rank's RNG
    states; DDP's model.pt and optimizer.pt), read with their tensors mapped, not read: an archive
    torch cannot open (a damaged zip with a matching or unchecked sha256), RNG states that do
    not restore, a model.pt or optimizer.pt that is no state dict of its kind. Raises UnsafeCheckpointError for an unreadable
    file; None when all is well. Scanned files only (`safe_load.check_tree` first)."""
    for rel in rels:
        is_rng = _RANK_RE.match(rel) is not None
        if not is_rng and not (backend == "ddp" and rel in ("model.pt", "optimizer.pt")):
            continue
        obj = safe_load.read(path / rel, mmap=True, name=rel)
        why = (rng_problem(obj) if is_rng else state_dict_problem(obj) if rel == "model.pt"
               else optimizer_state_problem(obj))
        if why is not None:
            return f"{rel} {why}"
    return None


def committed_steps(root: Path) -> list[int]:
    """Steps of the committed-looking directories under root (verified or not), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(s for p in root.iterdir() if p.is_dir() and (s := parse_step(p.name)) is not None)


def newest_valid(root: Path, checksums: bool = True, below: int | None = None) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint under root that verifies or None, reasons for those skipped); with
    `below`, only checkpoints of earlier steps are looked at.

    Reads only: usable on a run that is still writing (export, generate)."""
    skipped: list[str] = []
    for step in reversed(committed_steps(root)):
        if below is not None and step >= below:
            continue
        path = Path(root) / step_name(step)
        why = verify(path, checksums)
        if why is None:
            return path, skipped
        skipped.append(why)
    return None, skipped


def resolve(path: Path, checksums: bool = True) -> Path:
    """A checkpoint directory from a run directory, a checkpoints directory or a checkpoint itself.

    Raises CheckpointError (saying what was looked at) when nothing usable is found."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a run directory or a step_XXXXXXXX checkpoint")
    if os.path.lexists(path / MANIFEST):  # a checkpoint itself (verify opens its manifest only if regular)
        why = verify(path, checksums)
        if why:
            raise CheckpointError(f"{why}; pick an older checkpoint")
        return path
    roots = [path, path / "checkpoints"]
    if (path / "config.yaml").is_file():  # a run directory: its checkpoint_dir may live elsewhere
        from gpt2.config import ConfigError, from_yaml

        try:
            configured = from_yaml(path / "config.yaml").trainer.config.checkpoint_strategy.config.checkpoint_dir
        except ConfigError as exc:  # damaged: one line, and where else to point
            raise CheckpointError(f"{exc}; give the checkpoints directory or a step_XXXXXXXX checkpoint "
                                  "instead of the run directory") from None
        if configured:
            roots.insert(1, Path(configured))
    for root in roots:
        found, skipped = newest_valid(root, checksums)
        if found is not None:
            for why in skipped:
                logger.warning(f"skipping damaged checkpoint: {why}")
            return found
        if skipped:  # the error names the newest: one line
            raise CheckpointError(f"no checkpoint under {root} verifies (newest: {skipped[0]})")
    raise CheckpointError(f"no checkpoint under {' or '.join(map(str, roots))}: train first, or give a "
                          "step_XXXXXXXX directory")


# ---- compatibility ---------------------------------------------------------------------------
def check_compatible(manifest: dict[str, Any], backend: str, compat: dict[str, Any], world_size: int,
                     path: Path) -> None:
    """Refuse a checkpoint this run cannot continue from, saying what differs and what to do.

    `compat` is `gpt2.config.compat_view(cfg)`: the keys that must match (model shape, optimizer,
    batch, data settings, ...). DDP and FSDP resume on any number of ranks; DeepSpeed only on
    the number that saved it."""
    if manifest.get("backend") != backend:
        raise CheckpointError(
            f"{path} was written by trainer={manifest.get('backend')}, this run uses trainer={backend}: "
            f"resume with trainer={manifest.get('backend')}, or export it (`python -m gpt2.export`) to start anew"
        )
    saved = manifest.get("config", {})
    diffs = [k for k in sorted(set(saved) | set(compat)) if saved.get(k) != compat.get(k)]
    # model shape first: it is the difference a user most needs to see
    diffs.sort(key=lambda k: (not k.startswith("model."), k))
    if diffs:
        shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {compat.get(k)!r}" for k in diffs[:3])
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CheckpointError(
            f"{path} does not fit this config: {shown}{more}; resume with the checkpoint's values or use a new run.dir"
        )
    if backend == "deepspeed" and manifest.get("world_size") != world_size:
        raise CheckpointError(
            f"{path} was saved by {manifest.get('world_size')} DeepSpeed ranks, this run has {world_size}: "
            f"resume with the same number of ranks, or export it with `python -m gpt2.export`"
        )
