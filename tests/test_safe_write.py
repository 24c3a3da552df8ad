"""Every small file the project rewrites goes through gpt2/safe_write.py: a symlink planted at its
temporary name is replaced, never written through (a checkpoint commit once overwrote a file
outside the run that way), and no temporary file outlives a failure."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gpt2.safe_write import file_lock, write_atomic, write_new


def _config_yaml(d: Path) -> tuple[Path, Path]:
    from gpt2.compose import load_config
    from gpt2.config import save_resolved

    save_resolved(load_config(["model=tiny"]), d / "config.yaml")
    return d / "config.yaml", d / "config.yaml.tmp"


def _wandb_id(d: Path) -> tuple[Path, Path]:
    from gpt2.logs import wandb_run_id

    wandb_run_id(d)
    return d / "wandb_id.txt", d / "wandb_id.txt.tmp"


def _lease(d: Path) -> tuple[Path, Path]:
    from gpt2.checkpoint.lease import Lease

    lease = Lease(d).acquire()
    lease.release()
    return d / "LEASE.json", d / "LEASE.json.tmp"


def _metrics(d: Path) -> tuple[Path, Path]:
    from gpt2.metrics_file import discard_replayed

    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "restart": 0}\n{"step": 2, "loss": 1.0, "restart": 0}\n')
    discard_replayed(d / "metrics.jsonl", 1)
    return d / "metrics.jsonl", d / ".metrics.jsonl.tmp"


def _record(d: Path) -> tuple[Path, Path]:
    from launch.record import atomic_write

    atomic_write(d / "record.jsonl", "{}\n")
    return d / "record.jsonl", d / f".record.jsonl.{os.getpid()}.tmp"


def _progress(d: Path) -> tuple[Path, Path]:
    from gpt2.watchdog import _write_json

    _write_json(d / "progress.json", {"step": 1})
    return d / "progress.json", d / f".progress.json.{os.getpid()}.tmp"


def _shard(d: Path) -> tuple[Path, Path]:
    import numpy as np

    from gpt2 import shards

    path = d / shards.shard_name("fw", "train", 1)
    shards.write_shard(path, np.arange(10, dtype=np.uint16))
    assert shards.read_header(path).num_tokens == 10
    return path, shards._tmp_path(path)


WRITERS: dict[str, Callable[[Path], tuple[Path, Path]]] = {
    "config.yaml": _config_yaml, "wandb_id.txt": _wandb_id, "LEASE.json": _lease, "metrics.jsonl": _metrics,
    "record.jsonl": _record, "a progress report": _progress, "a token shard": _shard,
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_symlink_at_the_temporary_name_is_never_written_through(name: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT", "GPT2_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    probe, run = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    run.mkdir()
    tmp = run / WRITERS[name](probe)[1].name  # the temporary name this writer uses, planted in a fresh directory
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    tmp.symlink_to(victim)
    target, _ = WRITERS[name](run)
    assert victim.read_text() == "precious\n"
    assert not os.path.lexists(tmp) and not target.is_symlink()
    assert target.is_file() or name == "LEASE.json"  # (a released lease removes its file)


def test_write_new_replaces_what_has_the_name_and_write_atomic_leaves_nothing_on_failure(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "f").symlink_to(victim)
    write_new(tmp_path / "f", b"new")
    assert victim.read_text() == "precious" and (tmp_path / "f").read_bytes() == b"new"
    (tmp_path / "d").mkdir()  # renaming a file over a directory fails: no temporary file stays
    with pytest.raises(OSError) as err:
        write_atomic(tmp_path / "d", "text")
    assert err.value.filename == str(tmp_path / "d") and not os.path.lexists(tmp_path / "d.tmp")


def _checkpoint_lock(d: Path):
    import torch

    from gpt2.checkpoint.manager import CheckpointManager
    from gpt2.config import CheckpointSettings
    from gpt2.distributed import DistInfo

    return CheckpointManager(d, CheckpointSettings(), DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))).lock


def _lease_lock(d: Path):
    from gpt2.checkpoint.lease import Lease

    return Lease(d).lock


def _record_lock(d: Path):
    from launch.record import SweepRecord

    return SweepRecord(d)._lock


LOCKS = {".lock": _checkpoint_lock, ".lease.lock": _lease_lock, "record.jsonl.lock": _record_lock}


@pytest.mark.parametrize("name", list(LOCKS))
def test_a_symlink_planted_at_a_lock_name_is_removed_not_a_traceback_at_every_save(name: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(victim)
    with LOCKS[name](run):  # filelock never follows it: before, every acquire failed with ELOOP
        pass
    assert victim.read_text() == "precious\n" and not (run / name).is_symlink()


def test_file_lock_leaves_a_held_lock_file_alone(tmp_path: Path) -> None:
    with file_lock(tmp_path / "x.lock"):  # a lock file in use is never removed
        inode = (tmp_path / "x.lock").stat().st_ino
        file_lock(tmp_path / "x.lock")
        assert (tmp_path / "x.lock").stat().st_ino == inode


def test_appends_never_go_through_a_symlink_nor_block_on_a_fifo(tmp_path: Path) -> None:
    """metrics.jsonl and decisions.jsonl grow by appending: a symlink planted there is ELOOP (one
    line at the door: remove it), a FIFO is refused at once instead of blocking the writer."""
    import errno

    from gpt2.compose import load_config
    from gpt2.logs import MetricsLogger
    from gpt2.safe_write import open_append

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(victim)
    cfg = load_config(["model=tiny", "wandb.mode=disabled", f"run.dir={run}"])
    metrics = MetricsLogger(cfg, run, 0, None, 0)  # (a resume would first replace the link: discard_replayed)
    with pytest.raises(OSError) as err:
        metrics.log({"step": 1, "loss": 2.0})
    assert err.value.errno == errno.ELOOP and victim.read_text() == "precious\n"
    metrics.close()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError) as err:
        open_append(tmp_path / "fifo")  # no reader: refused at once, never blocking
    assert err.value.errno in (errno.ENXIO, errno.EINVAL)
    with open_append(tmp_path / "new.jsonl") as f:
        f.write("a\n")
    with open_append(tmp_path / "new.jsonl") as f:
        f.write("b\n")
    assert (tmp_path / "new.jsonl").read_text() == "a\nb\n"


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_a_rank_log_is_never_written_through_a_symlink_nor_blocks_on_a_fifo(planted: str, tmp_path: Path) -> None:
    """loguru would open logs/rank0.log itself, following a symlink and blocking on a FIFO: the
    log is opened by open_append, and what it refuses is one line at the door."""
    from loguru import logger

    from gpt2.errors import os_error_line
    from gpt2.logs import setup_logging

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "rank0.log"
    log.symlink_to(victim) if planted == "symlink" else os.mkfifo(log)
    try:
        with pytest.raises(OSError) as err:
            setup_logging(tmp_path, 0)
    finally:
        logger.remove()
        logger.add(sys.stderr)
    line = os_error_line(err.value)
    want = "a symbolic link where a file was expected" if planted == "symlink" else "not a regular file (a FIFO"
    assert line is not None and line.startswith(f"{log}: {want}"), line
    assert victim.read_text() == "precious\n"
