"""User errors: one line saying what is wrong and what to do; entry points exit with code 2.

Every door (main.py, launch/sweep.py, render.py, plot.py, gpt2.export, gpt2.generate,
data_prep/download.py) parses with `ArgumentParser` (a usage mistake is one line too) and ends
with `report(exc)` for UserError and OSError: a full disk, a read-only folder or a missing path
is the user's to fix, so it is one line and exit 2 as well. A storage error (EIO, a stale NFS
handle, a mount that timed out: `is_storage_error`) is the infrastructure's: one line and exit 76,
retried like a lost peer. Any other OSError stays a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import unicodedata
from typing import NoReturn

from gpt2.safe_write import NOT_REGULAR


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). str(exc) is one printable line."""

    exit_code = 2


# Exit codes shared by every entry point (documented in the README).
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_REQUEUE = 75  # sysexits' EX_TEMPFAIL: stopped cleanly after a checkpoint; requeue me
# An infrastructure failure was detected in this rank (a hang, a lost peer, a communication error,
# a failed pre-flight check, a storage error; gpt2/watchdog.py): retry from the last committed
# checkpoint, counted against the job's max_failures.
EXIT_FAILURE = 76

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# The file system failed to answer, not the file: the same read may well work on the next attempt.
# A checkpoint that meets one of these is kept where it is, never called damaged or quarantined.
STORAGE_ERRORS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ENOTCONN, errno.ECONNRESET,
                            errno.ECONNABORTED, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETDOWN,
                            errno.ENETUNREACH, errno.EREMOTEIO, errno.ENOLINK, errno.ECOMM})
_USER_OS_ERRORS = {
    errno.EROFS: "read-only file system: point the output somewhere writable",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EISDIR: "is a directory, not a file",
    errno.ENAMETOOLONG: "a file name is too long for the file system: shorten it",
    errno.ELOOP: "a symbolic link where a file was expected (or a loop of them): remove it",
}


def is_storage_error(exc: BaseException) -> bool:
    """Whether `exc` is the file system failing to answer (`STORAGE_ERRORS`), not bad input."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRORS


def storage_error_on(code: int, rank: int, where: str) -> OSError:
    """The storage error another rank met (errno `code`), to raise on this rank as well: a retry
    everywhere, not a crash of this rank's own."""
    return OSError(code, f"{os.strerror(code)} (on rank {rank})", where)


def storage_error_line(exc: OSError) -> str:
    """One line for a storage error: what failed, and that retrying is the remedy."""
    where = exc.filename if exc.filename is not None else "the file system"
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return (f"{where}: a storage error ({code}: {os.strerror(exc.errno or 0).lower()}); nothing was changed or "
            "set aside: retry when the file system answers again (a job of a sweep is requeued by itself)")


def os_error_line(exc: OSError) -> str | None:
    """One line for an OSError the user can act on (disk full, read-only, missing path), else None."""
    where = exc.filename if exc.filename is not None else "a write"
    if exc.errno in DISK_FULL:
        return (f"{where}: the disk is full ({errno.errorcode.get(exc.errno or 0, exc.errno)}: "
                f"{os.strerror(exc.errno or 0).lower()}); free space or write elsewhere (nothing partial was kept)")
    if exc.errno == errno.EINVAL and exc.strerror == NOT_REGULAR:  # gpt2.safe_read, gpt2.safe_write
        return f"{exc.filename}: not a regular file (a FIFO or a device under a file's name): remove it"
    reason = _USER_OS_ERRORS.get(exc.errno or 0)
    if reason is None:
        return None
    return f"{exc.filename}: {reason}" if exc.filename is not None else f"{exc.strerror or reason}"


# Cc: C0/C1 controls (NUL, tab, newline, CR, NEL, ...); Cf: invisible format characters (bidi
# overrides, zero-width); Zl/Zp: U+2028/U+2029; Cs: lone surrogates.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def one_line(message: str) -> str:
    """`message` with every control or line-separator character escaped: what a door prints."""
    return "".join(c if unicodedata.category(c) not in UNSAFE_CATEGORIES else ascii(c)[1:-1] for c in message)


def report(exc: Exception) -> int:
    """Print a UserError, or an OSError the user can act on, as one line on stderr and return the
    exit code (2; a storage error: 76, EXIT_FAILURE); re-raise anything else, so a real bug keeps
    its traceback."""
    if isinstance(exc, UserError):
        msg, code = str(exc), exc.exit_code
    elif isinstance(exc, OSError) and is_storage_error(exc):
        msg, code = storage_error_line(exc), EXIT_FAILURE
    elif isinstance(exc, OSError) and (line := os_error_line(exc)) is not None:
        msg, code = line, EXIT_USER_ERROR
    else:
        raise exc
    print(f"error: {one_line(msg)}", file=sys.stderr)
    return code


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (`--help` still shows the usage)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
