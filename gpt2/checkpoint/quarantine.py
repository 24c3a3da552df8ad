"""Taking checkpoints out of the way without losing one.

Two moves, both a single rename first, so that a process killed at any point leaves either the
checkpoint under its name or nothing that looks like a checkpoint:

- `drop`: retention's delete. `step_X/` is renamed to `step_X.drop.tmp` (a leftover the next
  start removes, like an interrupted save), then removed. A crash mid-delete never leaves a
  half-deleted `step_X/` whose manifest still claims it whole.
- `quarantine`: for a checkpoint newer than the step the run continues from, which failed
  verification once (a flipped byte, a crafted file, or an NFS hiccup that a second look would
  not see). Deleting it would destroy the evidence and maybe the newest good weights; keeping its
  name would let a later start resume from an abandoned timeline. It moves to
  `<root>/quarantine/step_X-<reason-slug>/` with the reason in `QUARANTINE_REASON.txt` beside it.

`clean_leftovers` (on start) removes what an interrupted save or drop left, and puts back the old
copy of a re-saved step that a crash caught between its two renames.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from pathlib import Path

from loguru import logger

from gpt2.checkpoint.writer import fsync
from gpt2.errors import UserError
from gpt2.safe_write import write_new

QUARANTINE = "quarantine"
REASON_FILE = "QUARANTINE_REASON.txt"
_SLUG_LEN = 48


def slug(reason: str) -> str:
    """A short file-name-safe form of a reason: `model.pt fails its sha256 check` -> `model-pt-fails-its-sha256-check`."""
    text = re.sub(r"[^a-z0-9]+", "-", reason.lower()).strip("-")
    return text[:_SLUG_LEN].rstrip("-") or "unverified"


def quarantine(root: Path, path: Path, reason: str) -> Path:
    """Move the checkpoint at `path` to `<root>/quarantine/<name>-<slug>/`, the reason written
    beside it (`<that>.QUARANTINE_REASON.txt`, outside the checkpoint, so its files stay as found)."""
    qdir = Path(root) / QUARANTINE
    _quarantine_dir(qdir, path, reason)
    dest = qdir / f"{path.name}-{slug(reason.removeprefix(path.name + ': '))}"
    if os.path.lexists(dest) or os.path.lexists(f"{dest}.{REASON_FILE}"):  # quarantined before: keep both
        dest = dest.with_name(f"{dest.name}-{time.time_ns()}")
    write_new(dest.parent / f"{dest.name}.{REASON_FILE}", (reason + "\n").encode())  # never through a symlink
    path.rename(dest)
    fsync(Path(root))
    logger.warning(f"quarantined {path.name} to {dest} ({reason}); it is kept, not deleted: inspect it, "
                   "then delete it or move it back")
    return dest


def _quarantine_dir(qdir: Path, path: Path, reason: str) -> None:
    """Create `qdir`, or check that it is a real directory: a file there would stop the move with
    a traceback, and a symlink would carry the checkpoint (and the reason file) out of the run."""
    try:
        qdir.mkdir()
        return
    except FileExistsError:
        pass
    if not stat.S_ISDIR(os.lstat(qdir).st_mode):
        kind = "a symlink" if qdir.is_symlink() else "not a directory"
        raise UserError(f"{qdir} is {kind}: damaged checkpoints are moved into that directory, and "
                        f"{path.name} is one ({reason}); move {qdir.name} aside and start again")


def remove(path: Path, ignore_errors: bool = True) -> None:
    """Remove whatever has the name `path`: a directory tree, a file, or a symlink itself (never
    what it points to; `shutil.rmtree` refuses a symlink, which would leave it in the way)."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            if not ignore_errors:
                raise
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)


def drop(path: Path) -> None:
    """Delete a checkpoint directory: renamed aside first, so a crash leaves no half-deleted `step_X/`."""
    aside = path.with_name(path.name + ".drop.tmp")
    remove(aside)  # an earlier drop of this step was interrupted (or anything else had the name)
    path.rename(aside)
    fsync(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def clean_leftovers(root: Path) -> None:
    """Remove what interrupted saves and drops left (`step_*.tmp`), except the old copy of a
    re-saved step whose new copy never got its name (`step_X.old.tmp` without `step_X`): put back."""
    for leftover in sorted(Path(root).glob("step_*.tmp")):
        if leftover.name.endswith(".old.tmp") and not leftover.is_symlink():  # only a directory of ours comes back
            final = leftover.with_name(leftover.name.removesuffix(".old.tmp"))
            if not os.path.lexists(final) and leftover.is_dir() and (leftover / "MANIFEST.json").is_file():
                logger.warning(f"restoring {final.name} from {leftover.name} (a re-save was interrupted)")
                leftover.rename(final)
                continue
        logger.warning(f"removing unfinished checkpoint {leftover.name} (a save was interrupted)")
        remove(leftover)  # a symlink: itself, never what it points to
