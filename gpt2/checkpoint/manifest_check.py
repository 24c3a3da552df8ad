"""What a MANIFEST.json must look like, and which files verification may open.

A checkpoint directory is input like any other: a MANIFEST can be edited, truncated or written
by someone else. `manifest_problem` checks its structure and types in one place (what the
loaders and export read: step, backend, world size, trainer state, the file table), so that a
wrong one is "invalid, because ..." and never a KeyError or TypeError later. `file_problem`
admits only regular files inside the checkpoint's own directory: no absolute path, no `..`, no
symlink that leads outside, no FIFO or device (opening a FIFO blocks the reader forever).
Both return None when all is well, else one line saying what is wrong.
"""

from __future__ import annotations

import json
import os
import re
import stat
import unicodedata
from pathlib import Path, PurePosixPath
from typing import Any

from gpt2.errors import UNSAFE_CATEGORIES, is_storage_error, one_line

MAX_MANIFEST_BYTES = 64 << 20  # far above a real manifest (a few KB per thousand files); bounds the read
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_WANDB_ID = 256
_WANDB_RESERVED = ":;,#?/'\\"  # what W&B refuses in a run id (wandb_settings.validate_run_id), and a backslash


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_manifest(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) or (None, why): JSON that is an object, parsed without a traceback
    (a deeply nested document exhausts the parser's recursion, which is an answer too)."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        return None, f"not valid JSON ({reason})"
    if not isinstance(data, dict):
        return None, f"holds a JSON {type(data).__name__}, not an object"
    return data, None


def read_text(path: Path) -> str:
    """The manifest's text: a regular file of bounded size (raises OSError or ValueError)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{st.st_size} bytes, more than any manifest ({MAX_MANIFEST_BYTES})")
    return path.read_text()


def manifest_problem(m: dict[str, Any], format_version: int) -> str | None:
    """Why `m` is not a manifest this code can use, or None (structure and types only)."""
    if m.get("format_version") != format_version:
        return f"format version {m.get('format_version')!r}, this code reads {format_version}"
    if not _int(m.get("step")):
        return f"step is {m.get('step')!r}, not a whole number"
    if not isinstance(m.get("backend"), str):
        return f"backend is {m.get('backend')!r}, not a name"
    if not _int(m.get("world_size")) or m["world_size"] < 1:
        return f"world_size is {m.get('world_size')!r}, not a positive whole number"
    for key in ("config", "resolved_config", "rng"):
        if key in m and not isinstance(m[key], dict):
            return f"{key} is a {type(m[key]).__name__}, not an object"
    why = wandb_id_problem(m.get("wandb_id"))
    if why is not None:
        return why
    ts = m.get("trainer_state")
    if not isinstance(ts, dict):
        return "no trainer_state object"
    for key in ("step", "tokens"):
        if not _int(ts.get(key)):
            return f"trainer_state.{key} is {ts.get(key)!r}, not a whole number"
    if ts["step"] != m["step"]:
        return f"trainer_state.step {ts['step']} differs from step {m['step']}"
    if not isinstance(ts.get("data"), dict):
        return "trainer_state.data (the data-loader position) is not an object"
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        return "files is not a non-empty object of {path: {size, sha256}}"
    for rel, info in files.items():
        if not isinstance(info, dict) or not _int(info.get("size")):
            return f"files[{rel!r}] has no whole-number size"
        digest = info.get("sha256")
        if digest is not None and not (isinstance(digest, str) and _SHA256.match(digest)):
            return f"files[{rel!r}].sha256 is not a sha256 hex digest"
    return None


def wandb_id_problem(value: Any) -> str | None:
    """Why a manifest's `wandb_id` is not a W&B run id (written to wandb_id.txt and handed to
    W&B on resume), or None; absent (None) is fine."""
    if value is None:
        return None
    if not isinstance(value, str):
        return f"wandb_id is a {type(value).__name__}, not a W&B run id (text)"
    unsafe = any(unicodedata.category(c) in UNSAFE_CATEGORIES or c in _WANDB_RESERVED for c in value)
    if not value or len(value) > MAX_WANDB_ID or value != value.strip() or unsafe:
        return (f"wandb_id {one_line(value[:64])!r} is not a W&B run id (1-{MAX_WANDB_ID} characters, no control "
                f"characters, no space at either end, none of {_WANDB_RESERVED})")
    return None


def file_problem(ckpt_dir: Path, rel: str) -> str | None:
    """Why the manifest entry `rel` must not be opened, or None for a regular file inside `ckpt_dir`."""
    if not rel or "\x00" in rel:
        return f"{rel!r} is not a file name"
    pure = PurePosixPath(rel)
    if pure.is_absolute() or rel.startswith("\\") or os.path.isabs(rel):
        return f"{rel!r} is an absolute path (outside the checkpoint)"
    if ".." in pure.parts:
        return f"{rel!r} climbs out with '..'"
    path = ckpt_dir / rel
    try:
        real = path.resolve(strict=True)
        st = os.stat(real)
    except FileNotFoundError:
        return f"{rel} is missing"
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        if is_storage_error(exc):  # the file system's failure, not the checkpoint's
            raise
        return f"{rel} cannot be resolved ({exc})"
    if not real.is_relative_to(ckpt_dir.resolve()):
        return f"{rel} resolves through a symlink to {real}, outside the checkpoint"
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        return f"{rel} is {kind}, not a regular file"
    return None
