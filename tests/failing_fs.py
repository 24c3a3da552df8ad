"""A real file system that fails: a read-only FUSE mirror of a folder whose reads fail with EIO
while a switch file exists. The kernel itself then returns EIO to read(2) and pread(2), and raises
SIGBUS in a process that touches a memory-mapped page it cannot fill: the failure of a dying disk
or a flaky network mount, reached without a mock.

    python tests/failing_fs.py SOURCE MOUNTPOINT SWITCH [direct]     (runs until unmounted)

`direct` mounts with direct_io: every read reaches this server, none is served from the page cache,
so a switch thrown mid-run fails the reads of pages read before as well (memory maps need the
cache: leave it out for them).

Needs fusepy and the libfuse2 library (`make fuse-lib`), /dev/fuse, and the right to mount.
"""

from __future__ import annotations

import errno
import os
import sys

from fuse import FUSE, FuseOSError, Operations

_STAT_KEYS = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")


class FailingMirror(Operations):  # type: ignore[misc]
    use_ns = True  # times in nanoseconds (fusepy warns otherwise)

    def __init__(self, source: str, switch: str):
        self.source, self.switch = source, switch

    def _real(self, path: str) -> str:
        return os.path.join(self.source, path.lstrip("/"))

    def getattr(self, path: str, fh: int | None = None) -> dict[str, float]:
        st = os.lstat(self._real(path))
        return {k: getattr(st, k) for k in _STAT_KEYS}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def open(self, path: str, flags: int) -> int:
        return os.open(self._real(path), os.O_RDONLY)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if os.path.exists(self.switch):
            raise FuseOSError(errno.EIO)
        return os.pread(fh, size, offset)

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0


if __name__ == "__main__":
    source, mountpoint, switch = sys.argv[1:4]
    FUSE(FailingMirror(source, switch), mountpoint, foreground=True, ro=True, direct_io=sys.argv[4:5] == ["direct"])
