"""Writing a file by replacing it: never through a symlink, never leaving a temporary file.

Every small file the project rewrites (a checkpoint's MANIFEST and `latest`, config.yaml,
wandb_id.txt, LEASE.json, metrics.jsonl, a sweep's record, progress reports) goes through a
temporary name, then a rename. Whatever already has the temporary name (a leftover, or a symlink
planted to redirect the write outside the run) is removed first and never followed: the file is
created with O_CREAT|O_EXCL|O_NOFOLLOW, so a name recreated in between fails the write (EEXIST)
instead of leading it elsewhere. This module imports neither torch nor anything of ours.

Files that grow by appending (metrics.jsonl, decisions.jsonl, a controller's log) are opened with
`open_append`: never through a symlink, never a FIFO.

Lock files go through `file_lock`: a symlink planted at a lock's name would make filelock fail
(it never follows one), so it is removed first; a lock file holds nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, TextIO

from filelock import FileLock

NOT_REGULAR = "not a regular file"  # the strerror of the OSError(EINVAL) for a FIFO or a device under a file's name
Chunks = bytes | memoryview | Sequence[bytes | memoryview]  # one buffer, or several written in order


def write_new(path: Path, data: Chunks, sync: bool = True) -> None:
    """Write `data` (one buffer, or a sequence of them, in order) into a file that this call
    creates at `path` (and fsync it, with `sync`)."""
    try:
        os.unlink(path)  # a symlink itself, not what it points to
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        for chunk in [data] if isinstance(data, (bytes, memoryview)) else data:
            view = memoryview(chunk).cast("B")
            while view:
                view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except OSError as exc:  # os.write names no file: name it, for the one-line error
        if exc.errno is None or exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | Chunks, tmp: Path | None = None, sync: bool = True) -> None:
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


def open_append(path: Path) -> TextIO:
    """`path` opened for appending text (created if missing), never through a symlink (ELOOP) and
    never blocking on a FIFO planted under its name: only a regular file is appended to (EINVAL)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise OSError(errno.EINVAL, NOT_REGULAR, str(path)) from None
        raise
    return regular_file(fd, path, "a")


def regular_file(fd: int, path: Path | str, mode: str) -> IO[Any]:
    """The file object of `fd` (opened O_NONBLOCK, made blocking again) when it is a regular file;
    otherwise `fd` is closed and an OSError names `path`: IsADirectoryError for a directory, as
    open() says of one, and EINVAL (NOT_REGULAR) for a FIFO or a device."""
    try:
        kind = os.fstat(fd).st_mode
        if stat.S_ISDIR(kind):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(kind):
            raise OSError(errno.EINVAL, NOT_REGULAR, str(path))
        os.set_blocking(fd, True)
        return open(fd, mode)  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(fd)
        raise


def file_lock(path: Path) -> FileLock:
    """A FileLock at `path`, after removing a symlink that has its name (nobody can hold a lock
    through one: filelock opens with O_NOFOLLOW, so every acquire would fail with ELOOP)."""
    if os.path.islink(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return FileLock(str(path))
