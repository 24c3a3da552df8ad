"""Writing a file by replacing it: never through a symlink, never leaving a temporary file.

Every small file the project rewrites (a checkpoint's MANIFEST and `latest`, config.yaml,
wandb_id.txt, LEASE.json, metrics.jsonl, a sweep's record, progress reports) goes through a
temporary name, then a rename. Whatever already has the temporary name (a leftover, or a symlink
planted to redirect the write outside the run) is removed first and never followed: the file is
created with O_CREAT|O_EXCL|O_NOFOLLOW, so a name recreated in between fails the write (EEXIST)
instead of leading it elsewhere. This module imports neither torch nor anything of ours.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_new(path: Path, data: bytes, sync: bool = True) -> None:
    """Write `data` into a file that this call creates at `path` (and fsync it, with `sync`)."""
    try:
        os.unlink(path)  # a symlink itself, not what it points to
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except OSError as exc:  # os.write names no file: name it, for the one-line error
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes, tmp: Path | None = None, sync: bool = True) -> None:
    """Replace `path` with a file holding `data`: `tmp` (default `<name>.tmp`; give a name of the
    process's own where several processes replace one file) written with `write_new`, then renamed
    over `path`. A symlink at either name is replaced, never written through; a failure leaves no
    temporary file behind."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    try:
        write_new(tmp, data.encode() if isinstance(data, str) else data, sync)
        try:
            os.replace(tmp, path)
        except OSError as exc:  # os.replace names the temporary file: name the one it replaces
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    except BaseException:  # a full disk, a Ctrl-C: no temporary file stays
        if os.path.islink(tmp) or os.path.isfile(tmp):  # never a directory that had the name
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
