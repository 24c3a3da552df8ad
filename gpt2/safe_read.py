"""Reading a file that a damaged or hostile run directory could hold under any name: a regular
file only, and never blocking.

A FIFO planted as `metrics.jsonl` blocks a plain open() forever, and a symlink to /dev/zero fills
memory on read(). `open_regular` opens with O_NONBLOCK (a FIFO opens at once) and refuses
whatever is not a regular file with an OSError(EINVAL) that names it, which every reader already
treats as an unreadable file.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

from gpt2.safe_write import NOT_REGULAR


def open_regular(path: Path | str) -> io.BufferedReader:
    """`path` opened for binary reading; OSError (EINVAL) when it is not a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):  # what open() says of one
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, str(path))
        os.set_blocking(fd, True)
        return open(fd, "rb")  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(fd)
        raise


def read_text(path: Path | str) -> str:
    """The whole of a regular file as text, a damaged byte replaced (it spoils its line, not the file)."""
    with open_regular(path) as f:
        return f.read().decode(errors="replace")


def text_lines(path: Path | str) -> io.TextIOWrapper:
    """A regular file opened as text lines (damaged bytes replaced), for reading line by line."""
    return io.TextIOWrapper(open_regular(path), errors="replace")
