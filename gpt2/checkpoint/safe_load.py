"""Checkpoint files are read without unpickling anything we did not allow.

A pickle can call any importable function while it loads (`os.system` in a REDUCE), so a
checkpoint directory someone else could write to is as dangerous as a script. Two layers:

- **A scan before any read** (`check_file`, `check_tree`): the pickle opcodes of every pickle in a
  file (the `data.pkl` of a torch archive, DCP's `.metadata`, the torch archives DCP embeds in its
  `.distcp` files for non-tensor values) are walked with `pickletools.genops`, without executing
  them, and every global they import (GLOBAL, INST, STACK_GLOBAL) must be on the allow-list of the
  backend that wrote the checkpoint. Verification (gpt2.checkpoint.files.verify) runs it, so a crafted
  file makes its checkpoint invalid like a corrupted one; the loaders run it again right before
  they read.
- **weights_only loading** (`load`, `weights_only_loading`): torch's restricted unpickler, with
  the same allow-list handed to `torch.serialization.safe_globals`. DeepSpeed's engine and
  DCP's byte items call `torch.load(weights_only=False)` themselves; `weights_only_loading`
  forces weights_only on them for the duration (TORCH_FORCE_WEIGHTS_ONLY_LOAD, which torch
  reads on every call). DCP's `.metadata` is a plain `pickle.load` in torch: the scan is its guard.

A refused file raises UnsafeCheckpointError (a UserError: one line naming the file, exit 2).
A storage error while reading (EIO, a stale NFS handle: `gpt2.errors.is_storage_error`) passes
through as the OSError it is: the file system failed, not the file, so nothing is called damaged.
The allow-lists were read off real checkpoints of each backend (see tests/test_trust.py, which
checks that every file our backends write passes).
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import pickletools
import struct
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from gpt2.errors import UserError, is_storage_error

# What torch.save of tensors, dicts of tensors and optimizer states needs (torch's own
# weights_only unpickler allows these by itself; listed so that the scan accepts them too).
TORCH = frozenset({
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.FloatStorage", "torch.BFloat16Storage", "torch.HalfStorage", "torch.DoubleStorage",
    "torch.LongStorage", "torch.IntStorage", "torch.ByteStorage", "torch.BoolStorage",
    "torch.storage.UntypedStorage",
    "torch.Size", "torch.device",
    "torch.float32", "torch.bfloat16", "torch.float16", "torch.int64", "torch.int32", "torch.uint8", "torch.bool",
    "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex",
})
# DCP's .metadata: the classes describing each saved tensor and byte item.
DCP = TORCH | frozenset({
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.serialization._get_layout",
    "pathlib.PosixPath",  # StorageMeta.checkpoint_id
})
# DeepSpeed's model/optimizer states: a few of its own objects beside the tensors (ZeRO-3 also
# pickles a plain Tensor subclass rebuild).
DEEPSPEED = TORCH | frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "torch.Tensor",
    "torch._tensor._rebuild_from_type_v2",
})
ALLOWED: dict[str, frozenset[str]] = {"ddp": TORCH, "fsdp": DCP, "deepspeed": DEEPSPEED}

# Pickle opcodes that push exactly one value without consuming any (the values STACK_GLOBAL reads).
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_NO_STACK = {"FRAME", "PROTO"}
_OPAQUE = object()  # a stack value that is not a string we know
_ZIP_MAGIC = b"PK\x03\x04"


class UnsafeCheckpointError(UserError):
    """A checkpoint file whose pickle imports something the allow-list does not name (or that
    cannot be read as a pickle at all): one line naming the file and what it imports."""


def pickle_globals(data: bytes) -> Iterator[str]:
    """Every `module.name` the pickle in `data` would import, without running it.

    STACK_GLOBAL takes its module and name from the stack: they are tracked only as far as
    string pushes and memo gets; anything else there yields `?` (refused by every allow-list)."""
    recent: list[object] = []  # the values the last stack-changing opcodes pushed (the top is last)
    memo: dict[int, object] = {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _NO_STACK:
            continue
        if name in _MEMO_PUT:
            key = len(memo) if name == "MEMOIZE" else int(arg)  # type: ignore[arg-type]
            memo[key] = recent[-1] if recent else _OPAQUE
            continue
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            yield f"{module}.{attr}"
            recent.append(_OPAQUE)
        elif name == "STACK_GLOBAL":
            module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (_OPAQUE, _OPAQUE)
            yield f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "?"
            recent.append(_OPAQUE)
        elif name.startswith("EXT"):
            yield f"? (extension code {arg})"
            recent.append(_OPAQUE)
        elif name in _STRINGS:
            recent.append(arg if isinstance(arg, str) else _OPAQUE)
        elif name in _MEMO_GET:
            recent.append(memo.get(int(arg), _OPAQUE))  # type: ignore[arg-type]
        else:
            recent.append(_OPAQUE)
        del recent[:-2]


def _pickles(path: Path, metadata: dict[Path, Any]) -> Iterator[tuple[str, bytes]]:
    """(where, pickle bytes) of every pickle a checkpoint file holds; `metadata` caches DCP's
    metadata per directory (every `.distcp` file of a directory is located through it)."""
    if path.name == ".metadata":  # DCP: one plain pickle
        yield path.name, path.read_bytes()
        return
    if path.suffix == ".distcp":
        if path.parent not in metadata:
            metadata[path.parent] = _read_dcp_metadata(path.parent / ".metadata")
        yield from _distcp_items(path, metadata[path.parent])
        return
    yield from _archive_pickles(path.name, path)


def _archive_pickles(where: str, source: Path | io.BytesIO) -> Iterator[tuple[str, bytes]]:
    """The pickles of a torch archive (torch.save's zip format: `<name>/data.pkl`)."""
    # torch.load goes by the first bytes (a zip's local header), zipfile by the end: both must agree,
    # or a pickle with a zip appended would pass the scan and be read by torch's legacy path
    if isinstance(source, Path):
        with open(source, "rb") as f:
            head = f.read(4)
    else:
        head = source.getvalue()[:4]
    if head != _ZIP_MAGIC or not zipfile.is_zipfile(source):
        raise ValueError("not a torch archive (torch.save's zip format)")
    # a file we open is ours to close; a caller's BytesIO stays open for the caller
    with zipfile.ZipFile(source) as z, (open(source, "rb") if isinstance(source, Path) else nullcontext(source)) as f:
        found = False
        for info in z.infolist():
            if info.filename.endswith(".pkl"):
                found = True
                yield f"{where}:{info.filename}", _stored_member(f, info)
        if not found:
            raise ValueError("a zip file without a pickle: not a torch archive")


def _stored_member(f: Any, info: zipfile.ZipInfo) -> bytes:
    """The bytes of an uncompressed archive member, found through its local header as torch's reader
    finds them. Not `ZipFile.read`: it checks the zip's CRC32, which our own files leave out
    (gpt2/checkpoint/writer.write_torch: their sha256 in the MANIFEST covers every byte)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{info.filename} is compressed: torch.save never compresses")
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise ValueError(f"{info.filename}: no local header where the central directory says")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    data = f.read(info.file_size)
    if len(data) != info.file_size:
        raise ValueError(f"{info.filename}: cut short")
    return data


def _distcp_items(path: Path, meta: Any) -> Iterator[tuple[str, bytes]]:
    """The torch archives DCP wrote into a `.distcp` file for non-tensor values, located through
    the directory's `.metadata`."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_keys = {k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    with open(path, "rb") as f:
        for index, info in (meta.storage_data or {}).items():
            if index.fqn not in byte_keys or info.relative_path != path.name:
                continue
            f.seek(info.offset)
            blob = io.BytesIO(f.read(info.length))
            yield from _archive_pickles(f"{path.name}:{index.fqn}", blob)


def _read_dcp_metadata(path: Path) -> Any:
    """DCP's metadata object, unpickled only after its scan passed (torch itself uses pickle.load)."""
    check_file(path, DCP)
    with open(path, "rb") as f:
        return pickle.load(f)  # noqa: S301 - scanned just above against the DCP allow-list


def check_file(path: Path, allowed: frozenset[str], metadata: dict[Path, Any] | None = None) -> None:
    """Raise UnsafeCheckpointError unless every pickle in `path` imports only `allowed` globals.

    Opens only regular files (a FIFO would block the reader)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise UnsafeCheckpointError(f"{path}: not a regular file; refusing to read it")
        for where, data in _pickles(path, {} if metadata is None else metadata):
            refused = sorted({g for g in pickle_globals(data) if g not in allowed})
            if refused:
                raise UnsafeCheckpointError(
                    f"{path.parent / where}: its pickle imports {', '.join(refused[:3])}, which no checkpoint of "
                    "this toolkit contains; refusing to load it (a crafted or foreign file)")
    except UnsafeCheckpointError:
        raise
    except (ValueError, struct.error, pickle.UnpicklingError, zipfile.BadZipFile, OSError, EOFError, KeyError,
            AttributeError, TypeError) as exc:  # what a malformed pickle or zip raises while it is walked
        if is_storage_error(exc):  # the file system's failure, not the file's: never called damaged
            raise
        raise UnsafeCheckpointError(f"{path}: unreadable as a checkpoint file ({exc}); refusing to load it") from None


def is_pickled(rel: str) -> bool:
    """Whether a checkpoint file (a MANIFEST path) holds pickles the scan must read."""
    name = rel.rsplit("/", 1)[-1]
    return name.endswith((".pt", ".distcp")) or name == ".metadata"


def check_tree(root: Path, rels: list[str], backend: str) -> None:
    """Scan the pickled files among `rels` (paths relative to `root`) against `backend`'s
    allow-list; DCP's `.metadata` first, since the `.distcp` scan reads it."""
    allowed = ALLOWED.get(backend, TORCH)
    pickled = sorted((r for r in rels if is_pickled(r)), key=lambda r: (not r.endswith(".metadata"), r))
    metadata: dict[Path, Any] = {}
    for rel in pickled:
        check_file(Path(root) / rel, allowed, metadata)


# ---- loading -----------------------------------------------------------------------------------
def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None  # a class this install does not have: no file can need it here


def _objects(allowed: frozenset[str]) -> list[Any]:
    """The allow-listed globals torch's weights_only unpickler does not allow by itself, as objects
    for `torch.serialization.safe_globals` (DeepSpeed's, only once DeepSpeed is imported: a file
    that needs them is read by DeepSpeed, and importing it takes seconds)."""
    out = []
    for name in sorted(allowed):
        if name.split(".")[0] in ("torch", "builtins", "collections", "pathlib"):
            continue
        if name.startswith("deepspeed.") and "deepspeed" not in sys.modules:
            continue
        obj = _resolve(name)
        if obj is not None:
            out.append(obj)
    return out


@contextmanager
def weights_only_loading(allowed: frozenset[str]) -> Iterator[None]:
    """Every torch.load inside (a library's too, even with weights_only=False) uses torch's
    restricted unpickler, allowing `allowed` besides tensors and plain containers."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_objects(allowed)):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


# What torch.load raises on a damaged archive that the scan let through (a central directory or
# record header zipfile tolerates but torch's reader does not, a storage shorter than its tensor, a
# pickle that walks cleanly but does not build): the file is unreadable, which is bad input.
READ_ERRORS = (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError,
                OverflowError, AssertionError, struct.error, pickle.UnpicklingError, zipfile.BadZipFile)


def brief(exc: BaseException, limit: int = 240) -> str:
    """An exception's message on one line (its lines joined), shortened: what a one-line error quotes."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def read(path: Path, allowed: frozenset[str] = TORCH, map_location: Any = "cpu", mmap: bool = False,
         name: str | None = None) -> Any:
    """torch.load(weights_only=True) of a file the scan already passed (`check_file`, `check_tree`).

    A file torch cannot read raises UnsafeCheckpointError (one line, naming it: `name`, else its
    path). `mmap`: the tensors are mapped, not read (what verification uses to see that an
    archive opens)."""
    try:
        with torch.serialization.safe_globals(_objects(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except torch.OutOfMemoryError:  # a RuntimeError, but the device's, not the file's
        raise
    except READ_ERRORS as exc:
        raise UnsafeCheckpointError(f"{name or path}: unreadable as a checkpoint file ({brief(exc)}); "
                                    "refusing to load it") from None


def dcp_read_failure(exc: BaseException) -> str | None:
    """One line for DCP's CheckpointException when every rank's failure is a file torch could not
    read (`READ_ERRORS`: a damaged or crafted file), else None (an I/O or device error: not the
    user's input, so it keeps its traceback)."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return None
    errors = [pair[0] for pair in failures.values()]
    if not all(isinstance(e, (*READ_ERRORS, UnsafeCheckpointError)) and not isinstance(e, torch.OutOfMemoryError)
               for e in errors):
        return None
    rank = min(failures)
    first = failures[rank][0]
    return f"rank {rank}: {type(first).__name__}" + (f": {brief(first)}" if str(first).strip() else "")


def dcp_storage_failure(exc: BaseException) -> OSError | None:
    """The first rank's storage error among DCP's gathered failures (`gpt2.errors.is_storage_error`),
    to raise as itself (a retry, not a damaged checkpoint); None when there is none."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict):
        return None
    return next((pair[0] for _, pair in sorted(failures.items()) if is_storage_error(pair[0])), None)


def load(path: Path, allowed: frozenset[str] = TORCH, map_location: Any = "cpu") -> Any:
    """torch.load of one checkpoint file: scanned first, then read with weights_only=True.

    Raises UnsafeCheckpointError (one line) for a file that is refused or that torch cannot read."""
    check_file(path, allowed)
    return read(path, allowed, map_location)


def check_dir(ckpt_dir: Path, backend: str) -> None:
    """Scan every pickled file under `ckpt_dir` as it is on disk (what a loader is about to read,
    listed in the manifest or not) against `backend`'s allow-list; a symlink out is refused too."""
    ckpt_dir = Path(ckpt_dir)
    real = ckpt_dir.resolve()
    rels = []
    for p in sorted(ckpt_dir.rglob("*")):
        if not is_pickled(p.name):
            continue
        if not p.resolve().is_relative_to(real):
            raise UnsafeCheckpointError(f"{p}: a symlink to {p.resolve()}, outside the checkpoint; refusing to load it")
        rels.append(str(p.relative_to(ckpt_dir)))
    check_tree(ckpt_dir, rels, backend)
