"""Reading a file that a damaged or hostile run directory could hold under any name: a regular
file only, and never blocking.

A FIFO planted as `metrics.jsonl` blocks a plain open() forever, and a symlink to /dev/zero fills
memory on read(). `open_regular` opens with O_NONBLOCK (a FIFO opens at once) and refuses
whatever is not a regular file with an OSError that names it (`safe_write.regular_file`: EISDIR
for a directory, EINVAL for the rest), which every reader already treats as an unreadable file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO

from gpt2.safe_write import regular_file


def open_regular(path: Path | str) -> IO[bytes]:
    """`path` opened for binary reading; OSError (see `safe_write.regular_file`) when it is not a regular file."""
    return regular_file(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), path, "rb")


def read_text(path: Path | str) -> str:
    """The whole of a regular file as text, a damaged byte replaced (it spoils its line, not the file)."""
    with open_regular(path) as f:
        return f.read().decode(errors="replace")


def text_lines(path: Path | str) -> io.TextIOWrapper:
    """A regular file opened as text lines (damaged bytes replaced), for reading line by line."""
    return io.TextIOWrapper(open_regular(path), errors="replace")
