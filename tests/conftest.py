"""Shared fixtures. Everything runs on CPU with tiny models; nothing downloads."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def pydoc_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shard directory made from CPython's built-in docs: one val shard, several train shards."""
    from data_prep.download import prepare

    out = tmp_path_factory.mktemp("pydoc_shards")
    prepare(dataset="pydoc", out_dir=out, shard_size=20_000, num_shards=None)
    return out


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """Messages logged (loguru) at WARNING or above while the test runs."""
    from loguru import logger

    seen: list[str] = []
    sink = logger.add(lambda msg: seen.append(msg.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


def billion_laughs(levels: int = 9, flow: bool = False) -> str:
    """YAML whose anchors repeat anchors: 10**levels values once its aliases are expanded, in a few
    hundred bytes (block style: one key per level; flow: one list, for a single-line value)."""
    lists = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lists += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    if flow:
        return f"[{', '.join(lists)}]"
    return "".join(f"l{i}: {text}\n" for i, text in enumerate(lists))


@contextmanager
def failing_storage(under: Path, errno_: int = errno.EIO) -> Iterator[list[str]]:
    """Every open of a path under `under` in this process fails with `errno_`, as a dying disk or a
    stale NFS mount does (the one state a healthy machine cannot reach): builtins.open, io.open and
    os.open, which every reader here (torch.load, DCP, the scans, gpt2.safe_read) goes through, and
    os.preadv, with which the token loader reads shards it opened before (gpt2.shards.ShardReader).
    Yields the paths refused, in order."""
    import builtins
    import io

    root, refused = str(Path(under).resolve()), []
    real_open, real_os_open, real_preadv = builtins.open, os.open, os.preadv

    def failing(path: object) -> None:
        if isinstance(path, (str, bytes, os.PathLike)) and not isinstance(path, int):
            p = os.path.realpath(os.fsdecode(path))
            if p == root or p.startswith(root + os.sep):
                refused.append(p)
                raise OSError(errno_, os.strerror(errno_), p)

    def open_(file: object, *args: object, **kwargs: object) -> object:
        failing(file)
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    def os_open(path: object, *args: object, **kwargs: object) -> int:
        failing(path)
        return real_os_open(path, *args, **kwargs)  # type: ignore[arg-type]

    def preadv(fd: int, buffers: object, offset: int) -> int:  # a file opened before: its reads fail too
        failing(os.readlink(f"/proc/self/fd/{fd}"))
        return real_preadv(fd, buffers, offset)  # type: ignore[arg-type]

    builtins.open = io.open = open_  # type: ignore[assignment]
    os.open, os.preadv = os_open, preadv  # type: ignore[assignment]
    try:
        yield refused
    finally:
        builtins.open = io.open = real_open  # type: ignore[assignment]
        os.open, os.preadv = real_os_open, real_preadv  # type: ignore[assignment]
