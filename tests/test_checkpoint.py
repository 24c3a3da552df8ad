"""The commit protocol, verification, fallback, retention, leftovers, RNG state, compatibility
refusal and the stop request, in one process with a fake backend (no process group)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import failing_storage

from gpt2.checkpoint import manager as ck
from gpt2.checkpoint.manager import CheckpointError, CheckpointManager, check_compatible, step_name
from gpt2.checkpoint.writer import TorchFiles
from gpt2.config import CheckpointSettings
from gpt2.distributed import DistInfo
from gpt2.preemption import SIGTERM, TIME_BUDGET, USR2, StopRequest

SOLO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class FakeBackend:
    """Writes a model and an optimizer file, like DDP, holding `value` everywhere."""

    name = "ddp"

    def __init__(self, value: float = 0.0):
        self.value = value

    def stage(self, ckpt_dir: Path, copy: bool) -> TorchFiles:
        return TorchFiles({"model.pt": {"w": torch.full((64, 64), self.value)},
                           "optimizer.pt": {"state": {0: {"m": torch.full((64,), self.value)}},
                                            "param_groups": [{"params": [0]}]}})


def manager(root: Path, **kw: object) -> CheckpointManager:
    return CheckpointManager(root, CheckpointSettings(**kw), SOLO)  # type: ignore[arg-type]


def save(m: CheckpointManager, step: int, **meta: object) -> Path:
    return m.save(step, FakeBackend(float(step)), meta={"config": {"model.config.n_layer": 2}, "wandb_id": "abc",
                                                         **meta},
                  trainer_state={"step": step, "tokens": 10 * step, "data": {"windows_consumed": step}},
                  background=False)


def test_save_commits_a_whole_checkpoint(tmp_path: Path) -> None:
    m = manager(tmp_path)
    path = save(m, 7, config_hash="h1")
    assert path == tmp_path / "step_00000007" and path.is_dir()
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "latest").read_text().strip() == "step_00000007"
    man = json.loads((path / "MANIFEST.json").read_text())
    assert man["format_version"] == ck.FORMAT_VERSION and man["step"] == 7 and man["backend"] == "ddp"
    assert man["world_size"] == 1 and man["config_hash"] == "h1" and man["wandb_id"] == "abc"
    assert man["trainer_state"]["data"] == {"windows_consumed": 7}
    assert man["rng"]["files"] == ["rank_00000.pt"]
    assert set(man["files"]) == {"model.pt", "optimizer.pt", "rank_00000.pt"}
    for rel, info in man["files"].items():
        assert info["size"] == (path / rel).stat().st_size
        assert info["sha256"] == ck._sha256(path / rel)[1]
    assert m.verify(path) is None
    assert m.last_save_bytes == sum(i["size"] for i in man["files"].values()) and m.last_save_s > 0


def test_find_latest_none_on_first_start(tmp_path: Path) -> None:
    assert manager(tmp_path / "absent").find_latest() is None
    assert manager(tmp_path).find_latest() is None


def test_verify_reports_what_is_wrong(tmp_path: Path) -> None:
    m = manager(tmp_path)
    path = save(m, 1)
    model = path / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes (in the tensor data, not the zip directory)
    model.write_bytes(bytes(data))
    assert "model.pt fails its sha256" in (ck.verify(path) or "")
    assert ck.verify(path, checksums=False) is None  # sizes only: huge runs can skip hashing
    model.write_bytes(bytes(data[:-1]))
    assert "model.pt has" in (ck.verify(path, checksums=False) or "")
    model.unlink()
    assert "model.pt is missing" in (ck.verify(path) or "")
    (path / "MANIFEST.json").write_text("{not json")
    assert "unreadable MANIFEST.json" in (ck.verify(path) or "")
    (path / "MANIFEST.json").unlink()
    assert "no MANIFEST.json" in (ck.verify(path) or "")


def test_fallback_to_older_checkpoint_logs_why(tmp_path: Path, warnings: list[str]) -> None:
    m = manager(tmp_path)
    save(m, 2)
    newest = save(m, 4)
    with open(newest / "optimizer.pt", "r+b") as f:  # a flipped byte in the newest checkpoint
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    resume = m.find_latest()
    assert resume is not None and resume.step == 2 and resume.path.name == "step_00000002"
    assert resume.trainer_state["tokens"] == 20
    assert any("step_00000004: optimizer.pt fails its sha256 check" in w for w in warnings), warnings


@pytest.mark.parametrize(("rel", "checksums"), [
    ("MANIFEST.json", True),
    ("model.pt", False),  # without checksums its first read is the pickle scan
    ("rank_00000.pt", False),  # the RNG state's content check
    ("model.pt", True),  # the sha256 read
])
@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE])
def test_a_storage_error_is_not_damage(rel: str, checksums: bool, code: int, tmp_path: Path,
                                       warnings: list[str]) -> None:
    """A read the file system fails (a dying disk, a stale NFS handle) says nothing about the file:
    no fallback, no quarantine; the error goes up as itself (the job is retried) and, once the file
    system answers again, the newest checkpoint is the one resumed from."""
    m = manager(tmp_path, verify_checksums=checksums)
    save(m, 2)
    newest = save(m, 4)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with failing_storage(newest / rel, code) as refused, pytest.raises(OSError) as info:
        m.find_latest()
    assert info.value.errno == code and refused, refused
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing moved
    assert not any("damaged" in w or "quarantine" in w for w in warnings), warnings
    assert (resume := m.find_latest()) is not None and resume.path == newest
    with failing_storage(newest / "rank_00000.pt", code), pytest.raises(OSError):
        m.restore_rng(resume)  # and so is a read while loading


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_storage_error_inside_dcp_is_raised_as_itself(tmp_path: Path) -> None:
    """DCP gathers each rank's failure into one CheckpointException; a storage error among them is
    raised as the OSError it is (gpt2.backends.fsdp), not called an unreadable checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from gpt2.checkpoint import safe_load

    state = {"w": torch.arange(8.0)}
    dcp.save(state, checkpoint_id=str(tmp_path))  # no process group: one rank
    (shard,) = tmp_path.glob("*.distcp")
    with failing_storage(shard, errno.EIO), pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(8)}, checkpoint_id=str(tmp_path))
    err = safe_load.dcp_storage_failure(info.value)
    assert isinstance(err, OSError) and err.errno == errno.EIO and err.filename == str(shard)
    assert safe_load.dcp_read_failure(info.value) is None  # never an "unreadable" one-liner
    failure = CheckpointException("x", {0: (ValueError("Size mismatch"), None)})  # a damaged file's
    assert safe_load.dcp_storage_failure(failure) is None


def test_a_storage_error_is_one_line_and_a_retry(capsys: pytest.CaptureFixture[str]) -> None:
    from gpt2.errors import EXIT_FAILURE, report

    assert report(OSError(errno.ESTALE, "Stale file handle", "/shared/ckpt/step_00000004/model.pt")) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err == ("error: /shared/ckpt/step_00000004/model.pt: a storage error (ESTALE: stale file handle); nothing "
                   "was changed or set aside: retry when the file system answers again (a job of a sweep is "
                   "requeued by itself)\n")


def test_leftover_tmp_is_removed(tmp_path: Path, warnings: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    m = manager(tmp_path)
    save(m, 2)

    def die(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt  # stands for a process killed between the files and the manifest

    monkeypatch.setattr(CheckpointManager, "_commit", die)
    with pytest.raises(KeyboardInterrupt):
        save(m, 4)
    monkeypatch.undo()
    assert (tmp_path / "step_00000004.tmp" / "model.pt").is_file()
    resume = m.find_latest()
    assert resume is not None and resume.step == 2
    assert not (tmp_path / "step_00000004.tmp").exists()
    assert any("removing unfinished checkpoint step_00000004.tmp" in w for w in warnings)


def test_only_damaged_checkpoints_is_an_error(tmp_path: Path) -> None:
    m = manager(tmp_path)
    path = save(m, 3)
    (path / "model.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        m.find_latest()


def test_retention_keeps_last_n_and_every_mth(tmp_path: Path) -> None:
    m = manager(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 10):
        save(m, step)
    assert ck.committed_steps(tmp_path) == [4, 8, 9]


def test_resave_replaces_and_newer_abandoned_checkpoints_go(tmp_path: Path) -> None:
    m = manager(tmp_path, keep_last=2)
    save(m, 2)
    save(m, 4)
    (tmp_path / step_name(4) / "model.pt").write_bytes(b"damaged")
    resume = m.find_latest()
    assert resume is not None and resume.step == 2
    save(m, 3)  # the run continues from 2: step 4 belongs to an abandoned timeline
    assert ck.committed_steps(tmp_path) == [2, 3]
    path = save(m, 3)  # re-saving a step swaps the new copy in whole
    assert ck.verify(path) is None and not list(tmp_path.glob("*.tmp"))


def test_expected_save_time_is_a_guess_until_the_first_save(tmp_path: Path) -> None:
    m = manager(tmp_path)
    calls: list[int] = []

    def state_bytes() -> int:
        calls.append(1)
        return 300_000_000

    assert m.expected_save_s(state_bytes) == m.expected_save_s(state_bytes) == 3.0 and len(calls) == 1
    save(m, 1)
    assert m.expected_save_s(state_bytes) == m.last_save_s > 0


def test_rng_state_round_trip(tmp_path: Path) -> None:
    m = manager(tmp_path)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave numpy's cached gaussian set
    save(m, 1)
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    resume = m.find_latest()
    assert resume is not None and m.restore_rng(resume)
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


def test_rng_of_missing_rank_is_kept(tmp_path: Path) -> None:
    save(manager(tmp_path), 1)
    rank3 = CheckpointManager(tmp_path, CheckpointSettings(), DistInfo(3, 4, 3, torch.device("cpu")))
    resume = manager(tmp_path).find_latest()
    assert resume is not None and rank3.restore_rng(resume) is False


def _manifest(backend: str = "ddp", world: int = 2, **cfg: object) -> dict[str, object]:
    return {"backend": backend, "world_size": world, "config": {"model.config.n_layer": 2, "trainer.config.lr": 1e-3,
                                                                **cfg}}


def test_compatible_checkpoint_passes() -> None:
    compat = {"model.config.n_layer": 2, "trainer.config.lr": 1e-3}
    check_compatible(_manifest(), "ddp", compat, 4, Path("ck"))  # DDP reshards to any world size
    check_compatible(_manifest("fsdp"), "fsdp", compat, 1, Path("ck"))


def test_other_backend_is_refused() -> None:
    with pytest.raises(CheckpointError, match="written by trainer=fsdp, this run uses trainer=ddp"):
        check_compatible(_manifest("fsdp"), "ddp", {"model.config.n_layer": 2, "trainer.config.lr": 1e-3}, 2,
                         Path("ck"))


def test_other_model_shape_is_refused_saying_what_differs() -> None:
    compat = {"model.config.n_layer": 4, "trainer.config.lr": 1e-3, "z.extra": 1}
    with pytest.raises(CheckpointError) as err:
        check_compatible(_manifest(), "ddp", compat, 2, Path("ck"))
    msg = str(err.value)
    assert "model.config.n_layer: checkpoint 2, this run 4" in msg and "z.extra" in msg
    assert msg.index("model.config.n_layer") < msg.index("z.extra") and "\n" not in msg


def test_deepspeed_needs_the_same_world_size() -> None:
    compat = {"model.config.n_layer": 2, "trainer.config.lr": 1e-3}
    check_compatible(_manifest("deepspeed"), "deepspeed", compat, 2, Path("ck"))
    with pytest.raises(CheckpointError, match="saved by 2 DeepSpeed ranks, this run has 1"):
        check_compatible(_manifest("deepspeed"), "deepspeed", compat, 1, Path("ck"))


def test_resolve_accepts_run_dir_checkpoints_dir_and_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    m = manager(root)
    save(m, 1)
    newest = save(m, 2)
    assert ck.resolve(tmp_path / "run") == ck.resolve(root) == ck.resolve(newest) == newest
    (root / "step_00000003.tmp").mkdir()  # a save in progress: skipped, and left alone
    assert ck.resolve(tmp_path / "run") == newest and (root / "step_00000003.tmp").is_dir()
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.resolve(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        ck.resolve(tmp_path)


# ---- temporary names are never followed out of the run ---------------------------------------------
def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "outside" / "VICTIM.txt"
    victim.parent.mkdir()
    victim.write_text("precious\n")
    return victim


def test_commit_never_writes_through_a_symlink_at_a_temporary_name(tmp_path: Path) -> None:
    """`latest.tmp` (the pointer's temporary file) planted as a symlink to a file outside the run:
    the commit replaces the link itself, the file it pointed to keeps its bytes."""
    root = tmp_path / "ck"
    m = manager(root)
    save(m, 1)
    victim = _victim(tmp_path)
    (root / "latest.tmp").symlink_to(victim)
    save(m, 2)
    assert victim.read_text() == "precious\n"
    assert (root / "latest").read_text() == "step_00000002\n" and not (root / "latest").is_symlink()
    assert not os.path.lexists(root / "latest.tmp")


def test_save_removes_symlinks_named_like_its_directories(tmp_path: Path) -> None:
    """`step_X.tmp` and `step_X.old.tmp` planted as symlinks to a directory outside: removed
    themselves, never followed, and the save commits."""
    root = tmp_path / "ck"
    m = manager(root)
    save(m, 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    (root / "step_00000002.tmp").symlink_to(outside)
    save(m, 2)
    (root / "step_00000002.old.tmp").symlink_to(outside)
    save(m, 2)  # a re-save: the old copy goes aside under .old.tmp
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert ck.committed_steps(root) == [1, 2] and not list(root.glob("*.tmp"))
    # on start, a leftover `.old.tmp` is put back only if it is a directory of ours, not a link to one
    (outside / "MANIFEST.json").write_text("{}")
    (root / "step_00000003.old.tmp").symlink_to(outside)
    resume = m.find_latest()
    assert resume is not None and resume.step == 2 and not os.path.lexists(root / "step_00000003")
    assert not os.path.lexists(root / "step_00000003.old.tmp") and (outside / "keep.txt").is_file()


def test_latest_that_is_a_directory_is_named_in_the_error(tmp_path: Path) -> None:
    from gpt2.errors import os_error_line

    root = tmp_path / "ck"
    (root / "latest").mkdir(parents=True)
    with pytest.raises(OSError) as info:
        ck._write_atomic(root / "latest", "step_00000001\n")
    assert os_error_line(info.value) == f"{root / 'latest'}: is a directory, not a file"
    assert not os.path.lexists(root / "latest.tmp")


def test_kept_wandb_id_never_written_through_a_symlink(tmp_path: Path) -> None:
    from gpt2.train import _keep_wandb_id

    victim = _victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("wandb_id.tmp", "wandb_id.txt.tmp"):
        (run / name).symlink_to(victim)
    _keep_wandb_id(run, "abc123")
    assert victim.read_text() == "precious\n" and (run / "wandb_id.txt").read_text() == "abc123\n"


# ---- the stop request ---------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_signals_only_set_a_flag_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    clock = Clock()
    stop = StopRequest(now=clock).install()
    try:
        assert stop.agree() == 0 and not stop.requested() and stop.seconds_since_request() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.local_code() == SIGTERM
        clock.t += 2.5
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.agree() == USR2 and stop.reason(USR2) == "USR2"
        assert stop.seconds_since_request() == 2.5  # timed from the first request
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR2) is before


def test_time_budget_leaves_room_for_a_step_and_a_save() -> None:
    clock = Clock()
    stop = StopRequest(time_budget_s=60.0, now=clock)
    clock.t += 45
    assert stop.local_code() == 0
    stop.margin_s = 20.0  # one step and one save take about this long: stop now, not at 60 s
    assert stop.agree() == TIME_BUDGET and stop.reason(TIME_BUDGET) == "time_budget"
    assert StopRequest(time_budget_s=0.0, now=clock).local_code() == 0  # 0: no budget
