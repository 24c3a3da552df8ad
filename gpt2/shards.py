"""The token shard format, in one place: llm.c's `.bin` files.

A shard is a 256 x int32 little-endian header followed by `uint16` tokens:

    header[0] = 20240520   magic (llm.c's)
    header[1] = 1          version
    header[2] = N          number of tokens that follow
    header[3:] = 0         llm.c leaves these zero and never reads them

Files are named `<name>_val_000000.bin`, `<name>_train_000001.bin`, ...: one index sequence across
splits, the first shard(s) being the validation split. Shards made by llm.c's or modded-nanogpt's
FineWeb scripts therefore load here unchanged, and ours load there.

Our writer also fills a few of the words llm.c leaves zero (marked by `EXT_MARK` in word 3) with
provenance that lets `data_prep/download.py` resume an interrupted run without re-tokenising the
finished shards, and lets `verify` detect flipped bits:

    header[3] = EXT_MARK   our words below are valid
    header[4] = fingerprint of the prepare flags (crc32), so a re-run with other flags is refused
    header[5] = capacity of this shard in tokens (--shard_size, or the val size)
    header[6], header[7] = low and high 32 bits of the index of the text unit the NEXT shard starts in
    header[8] = tokens of that unit already written (the next shard skips them)
    header[9] = crc32 of the token bytes
    header[10] = 1 if the data ended in this shard (it is the last one)

Readers never need these words; a file with word 3 = 0 (llm.c's) is just as valid.
"""

from __future__ import annotations

import os
import re
import socket
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2.errors import UserError, is_storage_error
from gpt2.safe_write import write_atomic

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKEN = 2**16 - 1  # what uint16 can hold; the vocabulary must fit below it
EXT_MARK = 0x47505432  # "GPT2" in ASCII: the provenance words below are ours
SPLITS = ("val", "train")
_NAME_RE = re.compile(r"^(?P<name>.+)_(?P<split>val|train)_(?P<index>\d{6})\.bin$")
_CRC_CHUNK = 1 << 24  # tokens per crc/max chunk, so verifying a 200 MB shard never loads it whole


class DataError(UserError):
    """Token data is missing or unusable. The message names the file and the command that fixes it."""


class ShardError(DataError):
    """One shard file is malformed (magic, version, size, token range, checksum)."""


def shard_name(name: str, split: str, index: int) -> str:
    """`<name>_<split>_<index:06d>.bin`, llm.c's naming."""
    assert split in SPLITS, split
    return f"{name}_{split}_{index:06d}.bin"


def parse_shard_name(filename: str) -> tuple[str, str, int] | None:
    """(name, split, index) for a shard file name, None for anything else."""
    m = _NAME_RE.match(filename)
    if m is None:
        return None
    return m["name"], m["split"], int(m["index"])


@dataclass(frozen=True)
class Provenance:
    """The words our writer adds to the header (see the module docstring); None on llm.c's files."""

    fingerprint: int
    capacity: int
    next_unit: int
    next_offset: int
    crc32: int
    final: bool


@dataclass(frozen=True)
class ShardHeader:
    """A parsed, checked header: the file holds exactly `num_tokens` tokens after the header."""

    path: Path
    num_tokens: int
    provenance: Provenance | None


def _fix_hint(path: Path) -> str:
    return (f"re-create it: delete {path} and re-run `python data_prep/download.py --dataset NAME "
            f"--dir {path.parent}` with the flags that made it")


def read_header(path: Path) -> ShardHeader:
    """Read and check one shard's header and size.

    Raises ShardError (one line, naming the file) on a short file, wrong magic or version, or a size
    that does not match the token count (a truncated or over-long file).
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO named like a shard would block the read for ever
        raise ShardError(f"{path} is not a regular file (a pipe, a device?): remove it; " + _fix_hint(path))
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        if is_storage_error(e):  # the file system's, not the file's: a retry
            raise _naming(e, path) from None
        raise ShardError(f"cannot read shard {path}: {e.strerror}") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path} is {size} bytes, shorter than the {HEADER_BYTES}-byte shard header; "
                         + _fix_hint(path))
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise ShardError(f"{path} has magic {int(header[0])}, not {MAGIC}: not an llm.c token shard; "
                         + _fix_hint(path))
    if header[1] != VERSION:
        raise ShardError(f"{path} has format version {int(header[1])}; this code reads version {VERSION} "
                         "(uint16 tokens); " + _fix_hint(path))
    num_tokens = int(header[2])
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if num_tokens < 0 or size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ShardError(f"{path} is {what}: header says {num_tokens} tokens ({expected} bytes) but the "
                         f"file is {size} bytes; " + _fix_hint(path))
    prov = None
    if int(header[3]) == EXT_MARK:
        u = header.view("<u4")
        prov = Provenance(fingerprint=int(u[4]), capacity=int(header[5]),
                          next_unit=int(u[6]) | (int(u[7]) << 32), next_offset=int(header[8]),
                          crc32=int(u[9]), final=bool(header[10]))
    return ShardHeader(path=path, num_tokens=num_tokens, provenance=prov)


def _naming(e: OSError, path: Path) -> OSError:
    """`e` with the shard's path, which a read on a file descriptor does not carry."""
    return OSError(e.errno, e.strerror, str(path))


class ShardReader:
    """A shard's tokens, read with positional reads (pread) from one open file, never memory-mapped.

    What a mapping would do on a bad day, a read reports: a file system that fails to answer (EIO on
    a flaky network mount) raises an OSError naming the shard, which the watchdog calls a storage
    error (a retry, no node blamed); a file cut short under a running job raises ShardError. A
    mapping turns either into SIGBUS, which kills the rank with no report. The reader checks the
    file's size against the header's token count when it opens it, and is safe to share between
    threads (every read names its own offset)."""

    def __init__(self, path: Path, num_tokens: int):
        self.path, self.num_tokens = Path(path), num_tokens
        self._fd = -1
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            size = os.fstat(self._fd).st_size
        except OSError as e:
            self.close()
            raise _naming(e, self.path) from None
        self._size = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
        if size != self._size:
            self.close()
            raise ShardError(f"{self.path} is now {size} bytes, not the {self._size} its {num_tokens} tokens take: "
                             "it changed after this job first read it; " + _fix_hint(self.path))

    def read_into(self, out: np.ndarray, start: int) -> None:
        """Fill the contiguous uint16 array `out` with the tokens at [start, start + len(out))."""
        assert out.dtype == TOKEN_DTYPE and out.flags.c_contiguous and out.ndim == 1, (out.dtype, out.shape)
        self.read_many([memoryview(out).cast("B")], [start])

    def read_many(self, outs: Sequence[memoryview], starts: Sequence[int]) -> None:
        """Fill each byte buffer outs[i] with the tokens from starts[i] on (the loader's batch: one
        read a window, the windows known to lie inside the shard)."""
        fd, preadv, first, size = self._fd, os.preadv, HEADER_BYTES, TOKEN_DTYPE.itemsize
        try:
            for out, start in zip(outs, starts, strict=True):
                done = preadv(fd, [out], first + size * start)
                if done != len(out):
                    self._read_rest(out, first + size * start, done)
        except OSError as e:
            raise _naming(e, self.path) from None

    def _read_rest(self, out: memoryview, offset: int, done: int) -> None:
        """After a short read of `done` bytes: rare (a signal, a network file system), or the file was cut short."""
        assert offset + len(out) <= self._size, (offset, len(out), self._size)
        while done < len(out):
            n = os.preadv(self._fd, [out[done:]], offset + done)
            if n == 0:
                raise ShardError(f"{self.path} is now {os.fstat(self._fd).st_size} bytes, short of the {self._size} "
                                 f"its {self.num_tokens} tokens take: it was cut short while this job read it; "
                                 + _fix_hint(self.path))
            done += n

    def chunks(self, size: int = _CRC_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(first token, tokens) for consecutive chunks of at most `size` tokens, one buffer reused."""
        buf = np.empty(min(size, self.num_tokens), dtype=TOKEN_DTYPE)
        for start in range(0, self.num_tokens, size):
            chunk = buf[:min(size, self.num_tokens - start)]
            self.read_into(chunk, start)
            yield start, chunk

    def close(self, _close: Callable[[int], None] = os.close) -> None:  # bound early: __del__ may run at exit
        if self._fd >= 0:
            _close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_tokens(path: Path) -> np.ndarray:
    """A whole shard's tokens, read into memory (header checked first): for tools and tests."""
    header = read_header(path)
    out = np.empty(header.num_tokens, dtype=TOKEN_DTYPE)
    with ShardReader(path, header.num_tokens) as reader:
        reader.read_into(out, 0)
    return out


def _tmp_path(path: Path) -> Path:
    # Hidden, and unique per host and process, so two writers never share a temporary file and the
    # loader's `*_train_*.bin` pattern never matches one.
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def clean_stale_tmp(directory: Path) -> list[Path]:
    """Remove temporary shard files left by killed writers on this host (their pid no longer runs).

    Files of live processes, or of other hosts on a shared filesystem, are left alone.
    """
    removed = []
    host = socket.gethostname()
    for p in Path(directory).glob(".*.bin.*.tmp"):
        parts = p.name[1:].rsplit(".", 3)  # <shard>.bin, host, pid, tmp
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_shard(path: Path, tokens: np.ndarray, provenance: Provenance | None = None) -> None:
    """Write one shard atomically: temporary file, fsync, rename, fsync of the directory.

    A killed writer leaves at most a hidden temporary file, never a truncated `.bin` that looks complete.
    `tokens` must be uint16 (callers convert, and check the range, once). With `provenance`, words
    3..10 carry it (its crc32 field is computed here; the one passed in is ignored).
    """
    path = Path(path)
    tokens = np.ascontiguousarray(tokens)
    assert tokens.dtype == TOKEN_DTYPE and tokens.ndim == 1, (tokens.dtype, tokens.shape)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, len(tokens)
    if provenance is not None:
        u = header.view("<u4")
        u[3] = EXT_MARK
        u[4] = provenance.fingerprint
        header[5] = provenance.capacity
        u[6], u[7] = provenance.next_unit & 0xFFFFFFFF, provenance.next_unit >> 32
        header[8] = provenance.next_offset
        u[9] = zlib.crc32(memoryview(tokens).cast("B"))
        header[10] = int(provenance.final)
    # never through a symlink planted at the temporary name; no temporary file left on failure
    write_atomic(path, (header.tobytes(), memoryview(tokens).cast("B")), tmp=_tmp_path(path))
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems (and Windows) cannot open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_tokens(path: Path, vocab_size: int, header: ShardHeader | None = None) -> None:
    """Scan a shard's tokens: every id < vocab_size and, when our writer made it, the crc32 matches.

    Reads the file in chunks (a 100M-token shard never sits in memory twice). Raises ShardError.
    """
    header = header or read_header(path)
    crc = 0
    with ShardReader(path, header.num_tokens) as reader:
        for start, chunk in reader.chunks():
            top = int(chunk.max())
            if top >= vocab_size:
                at = start + int(np.argmax(chunk >= vocab_size))
                raise ShardError(f"{path} holds token id {int(chunk[at - start])} at position {at}, outside the "
                                 f"vocabulary of {vocab_size}; it was made with another tokenizer: " + _fix_hint(path))
            crc = zlib.crc32(memoryview(chunk).cast("B"), crc)
    if header.provenance is not None and crc != header.provenance.crc32:
        raise ShardError(f"{path} fails its checksum (the token bytes changed after writing); " + _fix_hint(path))


def find_shards(directory: Path, split: str) -> list[Path]:
    """The split's shard files in `directory`, in index order. Raises DataError if they mix datasets."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for p in Path(directory).iterdir():
        parsed = parse_shard_name(p.name)
        if parsed is not None and parsed[1] == split:
            found.setdefault(parsed[0], []).append((parsed[2], p))
    if len(found) > 1:
        raise DataError(f"{directory} mixes {split} shards of several datasets ({', '.join(sorted(found))}); "
                        "give each dataset its own --dir")
    return [p for _, p in sorted(next(iter(found.values()), []))]


@dataclass
class SplitSummary:
    shards: int = 0
    tokens: int = 0


def verify_dir(directory: Path, vocab_size: int) -> tuple[dict[str, SplitSummary], list[str]]:
    """Check every shard in `directory`: header, size, token range and (ours) checksum.

    Returns ({split: summary of the good shards}, [one-line problem per bad shard]). Missing directory
    or no shards at all raise DataError.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory; prepare shards with "
                        f"`python data_prep/download.py --dataset pydoc --dir {directory}`")
    summary = {s: SplitSummary() for s in SPLITS}
    problems: list[str] = []
    names = sorted(p for p in directory.iterdir() if parse_shard_name(p.name) is not None)
    if not names:
        raise DataError(f"{directory} holds no shards (*_val_NNNNNN.bin / *_train_NNNNNN.bin); prepare them with "
                        f"`python data_prep/download.py --dataset pydoc --dir {directory}`")
    for p in names:
        try:
            header = read_header(p)
            check_tokens(p, vocab_size, header)
        except ShardError as e:
            problems.append(str(e))
            continue
        split = parse_shard_name(p.name)[1]  # type: ignore[index]
        summary[split].shards += 1
        summary[split].tokens += header.num_tokens
    return summary, problems
