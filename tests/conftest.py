"""Shared fixtures. Everything runs on CPU with tiny models; nothing downloads."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    os.open, which every reader here (torch.load, DCP, the scans, gpt2.safe_read) goes through.
    Yields the paths refused, in order."""
    import builtins
    import io

    root, refused = str(Path(under).resolve()), []
    real_open, real_os_open = builtins.open, os.open

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

    builtins.open = io.open = open_  # type: ignore[assignment]
    os.open = os_open  # type: ignore[assignment]
    try:
        yield refused
    finally:
        builtins.open = io.open = real_open  # type: ignore[assignment]
        os.open = real_os_open  # type: ignore[assignment]


@dataclass(frozen=True)
class FailingMount:
    """A FUSE mirror of `source` at `mount` whose reads fail (EIO) while `switch` exists."""
    source: Path
    mount: Path
    switch: Path


@pytest.fixture
def failing_mount(tmp_path: Path) -> Iterator[FailingMount]:
    """Mount tests/failing_fs.py over a fresh folder, reads cached as usual; unmount after the test.
    Skips where the kernel offers no FUSE (/dev/fuse); a missing fusepy or libfuse2 skips, or fails
    under CI=true."""
    with _failing_mount(tmp_path, direct=False) as fs:
        yield fs


@pytest.fixture
def failing_mount_direct(tmp_path: Path) -> Iterator[FailingMount]:
    """`failing_mount` with direct_io: no read is served from the page cache."""
    with _failing_mount(tmp_path, direct=True) as fs:
        yield fs


@contextmanager
def _failing_mount(tmp_path: Path, direct: bool) -> Iterator[FailingMount]:
    import subprocess
    import sys
    import time

    from slurm_util import in_ci

    def missing(reason: str) -> None:
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)

    if not os.path.exists("/dev/fuse"):
        pytest.skip("the kernel offers no FUSE here (/dev/fuse)")
    probe = subprocess.run([sys.executable, "-c", "import fuse"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        missing(f"needs fusepy and libfuse2 ({probe.stderr.strip().splitlines()[-1]}); run `make setup fuse-lib`")
    fs = FailingMount(tmp_path / "source", tmp_path / "mount", tmp_path / "switch")
    fs.source.mkdir()
    fs.mount.mkdir()
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("failing_fs.py")), str(fs.source),
                               str(fs.mount), str(fs.switch), *(["direct"] if direct else [])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(fs.mount):
            if server.poll() is not None or time.monotonic() > deadline:
                out = server.stdout.read().decode() if server.poll() is not None and server.stdout else ""
                missing(f"could not mount a FUSE file system at {fs.mount}: {out.strip() or 'timed out'}")
            time.sleep(0.05)
        yield fs
    finally:
        fs.switch.unlink(missing_ok=True)
        if os.path.ismount(fs.mount):
            subprocess.run(["umount", "-l", str(fs.mount)], capture_output=True, timeout=60)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout:
            server.stdout.close()
