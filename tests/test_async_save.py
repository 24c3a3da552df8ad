"""Asynchronous checkpoints keep the guarantees of synchronous ones (issue 14, part 2).

In-process (world size 1): a save returns before its commit and is committed by a later
`poll()`; at most one save is in flight; a failed background write raises at the next poll; the
files are hashed as they are written; the host copy does not follow later in-place updates; a
re-save killed at any of its crash points keeps a committed copy.

Real processes (2 gloo ranks on CPU, launched like tests/test_resume.py, whose worker this file's
worker wraps): a stop request during an in-flight save, then a resume, gives the losses of an
uninterrupted run bit for bit (DDP, FSDP, DeepSpeed ZeRO-2); SIGKILL of every rank while a
background write or commit is held leaves the previous checkpoint valid and the next start
resumes from it; a full disk in the background write is one error line and exit 2 on every rank.
Test-only hooks (environment, applied by `_worker`, not in production code):
- GPT2_TEST_HOLD_AT_STEP=s, GPT2_TEST_HOLD_RANK=r, GPT2_TEST_HOLD_IN=write|commit: rank r holds
  inside the background write of step s (after its files are written) or inside rank 0's commit
  (before the manifest); GPT2_TEST_HOLD_MARKER=path is touched there, then it sleeps
  GPT2_TEST_HOLD_S seconds (default 600: the test kills it).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import test_resume as tr
import torch

from gpt2.checkpoint import manager as ck
from gpt2.checkpoint import writer
from gpt2.checkpoint.manager import CheckpointManager, step_name
from gpt2.checkpoint.writer import HostStager, TorchFiles, write_torch
from gpt2.config import CheckpointSettings
from gpt2.distributed import DistInfo
from gpt2.errors import UserError

SOLO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
META = {"config": {"model.config.n_layer": 2}, "wandb_id": None}


class Fake:
    """A backend whose files hold `value`; `before_write` runs in the writing thread first."""

    name = "ddp"

    def __init__(self, value: float, before_write: Any = None, on_stage: Any = None):
        self.value, self.before_write, self.on_stage = value, before_write, on_stage

    def stage(self, ckpt_dir: Path, copy: bool) -> Any:
        if self.on_stage is not None:
            self.on_stage()
        files = TorchFiles({"model.pt": {"w": torch.full((32, 32), self.value)}})
        if self.before_write is None:
            return files
        outer = self

        class Hooked:
            def write(self, d: Path) -> Any:
                outer.before_write()
                return files.write(d)

        return Hooked()


def manager(root: Path, **kw: Any) -> CheckpointManager:
    return CheckpointManager(root, CheckpointSettings(**kw), SOLO)


def save(m: CheckpointManager, step: int, backend: Any = None, background: bool = True) -> Path:
    return m.save(step, backend or Fake(float(step)), meta=META, background=background,
                  trainer_state={"step": step, "tokens": step, "data": {}})


# ---- in-process -------------------------------------------------------------------------------
def test_async_save_is_committed_by_a_later_poll(tmp_path: Path) -> None:
    go = threading.Event()
    m = manager(tmp_path)
    path = save(m, 5, Fake(5.0, before_write=go.wait))
    assert m.pending is not None and not path.exists() and (tmp_path / "step_00000005.tmp").is_dir()
    m.poll()  # the write is held: nothing to do yet
    assert m.pending is not None and not path.exists()
    go.set()
    m.wait()
    assert m.pending is None and ck.verify(path) is None
    assert torch.load(path / "model.pt", weights_only=True)["w"][0, 0] == 5.0
    assert (tmp_path / "latest").read_text().strip() == path.name and m.last_save_bytes > 0


def test_at_most_one_save_in_flight(tmp_path: Path) -> None:
    go = threading.Event()
    m = manager(tmp_path)
    save(m, 1, Fake(1.0, before_write=go.wait))
    seen: list[bool] = []
    threading.Timer(0.2, go.set).start()  # the second save must wait for this, not skip it
    save(m, 2, Fake(2.0, on_stage=lambda: seen.append(ck.verify(tmp_path / step_name(1)) is None)))
    assert seen == [True]  # step 1 was committed before step 2 was staged
    m.wait()
    assert ck.committed_steps(tmp_path) == [1, 2]


def test_background_disk_full_is_one_line_at_the_next_poll(tmp_path: Path) -> None:
    m = manager(tmp_path)
    save(m, 1, background=False)

    def full() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "step_00000002.tmp" / "model.pt"))

    save(m, 2, Fake(2.0, before_write=full))
    with pytest.raises(UserError, match=r"^checkpoint step_00000002 not saved: .*model.pt: the disk is full") as err:
        m.wait()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "step_00000002.tmp").exists() and m.pending is None
    resume = m.find_latest()
    assert resume is not None and resume.step == 1  # the previous checkpoint is untouched


def test_write_hashes_what_it_writes(tmp_path: Path) -> None:
    state = {"a": torch.randn(300, 1000), "b": [torch.arange(10), 3.5, "x"]}
    info = write_torch(state, tmp_path / "f.pt")
    assert info == {"size": (tmp_path / "f.pt").stat().st_size, "sha256": ck._sha256(tmp_path / "f.pt")[1]}
    back = torch.load(tmp_path / "f.pt", weights_only=True)
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["b"][0], state["b"][0])


def test_each_big_piece_goes_to_the_disk_as_it_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writeback of every hashed-aside piece starts right after its write (the real Linux call,
    accepted here), the ranges follow each other without a gap or an overlap, and the file is whole."""
    calls: list[tuple[int, int, int]] = []
    real = writer._SFR
    assert real is not None  # Linux: the call exists

    def spy(fd: int, offset: int, length: int, flags: int) -> int:
        rc = real(fd, offset, length, flags)
        calls.append((offset, length, rc))
        return rc

    monkeypatch.setattr(writer, "_SFR", spy)
    state = {f"t{i}": torch.randn(600_000) for i in range(4)}  # 2.4 MB each: hashed aside
    info = write_torch(state, tmp_path / "f.pt")
    assert len(calls) == 4 and all(rc == 0 for *_, rc in calls)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(calls, calls[1:]))  # in order, never twice
    assert sum(length for _, length, _ in calls) >= 4 * 2_400_000 and calls[-1][0] + calls[-1][1] <= info["size"]
    assert info["sha256"] == ck._sha256(tmp_path / "f.pt")[1]
    assert torch.equal(torch.load(tmp_path / "f.pt", weights_only=True)["t3"], state["t3"])


@pytest.mark.parametrize("refusal", ["no such call", "refused"])
def test_a_file_system_that_refuses_the_writeback_hint_still_gets_a_durable_whole_file(
        refusal: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without sync_file_range (not Linux) or with a file system that refuses it (gVisor, some network
    file systems), the save is the same file: the hint is only a head start for the fsync."""
    monkeypatch.setattr(writer, "_SFR", None if refusal == "no such call" else (lambda *a: -1))
    assert writer.start_writeback(0, 0, 1) is False
    state = {"a": torch.randn(700_000), "b": torch.arange(5)}
    info = write_torch(state, tmp_path / "f.pt")
    assert info == {"size": (tmp_path / "f.pt").stat().st_size, "sha256": ck._sha256(tmp_path / "f.pt")[1]}
    assert torch.equal(torch.load(tmp_path / "f.pt", weights_only=True)["a"], state["a"])


def test_host_copy_is_independent_and_keeps_tied_storages() -> None:
    w = torch.randn(8, 4)
    state = {"wte": w, "lm_head": w.detach(), "opt": {"m": torch.zeros(3), "lr": 0.1}}
    stager = HostStager()
    copy = stager.add(state, "f")
    stager.start()
    stager.fence()  # what the optimizer step waits for before changing the state
    w.add_(1.0)
    state["opt"]["m"].add_(1.0)
    stager.ready()
    assert not torch.equal(copy["wte"], w) and torch.equal(copy["opt"]["m"], torch.zeros(3))
    assert copy["wte"].data_ptr() == copy["lm_head"].data_ptr()  # one storage, as in the model
    assert copy["opt"]["lr"] == 0.1
    again = stager.add(state, "f")  # the next save reuses the buffers
    stager.start()
    stager.ready()
    assert again["wte"].data_ptr() == copy["wte"].data_ptr() and torch.equal(again["wte"], w)
    other = stager.add(state, "g")  # another tree of the same save: buffers of its own
    assert other["wte"].data_ptr() != copy["wte"].data_ptr()


def test_host_copy_pickles_like_the_live_state(tmp_path: Path) -> None:
    """Same records, byte for byte: tied weights, the param groups' shared betas, `_metadata`."""
    import zipfile

    from gpt2.checkpoint.safe_load import _stored_member

    def records(path: Path) -> list[tuple[str, bytes]]:  # our files have no CRC32: zipfile.read refuses them
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            return [(i.filename.split("/", 1)[1], _stored_member(f, i)) for i in z.infolist()
                    if not i.filename.endswith("serialization_id")]

    from gpt2.model import GPT, GPT2Config

    model = GPT(GPT2Config(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=128, pad_vocab_to=64))
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                             {"params": [p for p in model.parameters() if p.dim() < 2]}], betas=(0.9, 0.95))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    live = {"model": model.state_dict(), "opt": opt.state_dict()}
    stager = HostStager()
    host = stager.add(live)
    stager.start()
    stager.ready()
    for key in live:
        a, b = write_torch(live[key], tmp_path / f"live_{key}"), write_torch(host[key], tmp_path / f"host_{key}")
        assert a["size"] == b["size"]
        assert records(tmp_path / f"live_{key}") == records(tmp_path / f"host_{key}")


def test_failed_host_copy_fails_the_save_not_training() -> None:
    stager = HostStager()
    stager.add({"a": torch.zeros(4)})
    stager._queued[0] = (torch.zeros(5), stager._queued[0][1])  # a copy that cannot work
    stager.start()
    stager.fence()  # training goes on
    with pytest.raises(RuntimeError):
        stager.ready()  # the writer fails the save


@pytest.mark.parametrize("crash_at", ["old_aside", "new_in", "old_removed"])
def test_resave_killed_at_any_point_keeps_a_committed_copy(tmp_path: Path, crash_at: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    m = manager(tmp_path)
    save(m, 2, background=False)
    save(m, 3, background=False)
    rename, rmtree = Path.rename, shutil.rmtree

    def dying_rename(self: Path, target: Any) -> Any:
        if crash_at == "old_aside" and str(target).endswith(".old.tmp"):
            raise KeyboardInterrupt  # stands for SIGKILL before the old copy moves
        if crash_at == "new_in" and self.name.endswith(".tmp") and not self.name.endswith(".old.tmp"):
            raise KeyboardInterrupt  # the old copy is aside, the new one not yet in
        return rename(self, target)

    def dying_rmtree(path: Any, *a: Any, **kw: Any) -> None:
        if crash_at == "old_removed" and str(path).endswith(".old.tmp") and Path(path).exists():
            raise KeyboardInterrupt  # the new copy is in, the old one not yet gone
        rmtree(path, *a, **kw)

    monkeypatch.setattr(Path, "rename", dying_rename)
    monkeypatch.setattr(shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save(m, 3, Fake(33.0), background=False)
    monkeypatch.undo()
    resume = manager(tmp_path).find_latest()
    assert resume is not None and resume.step == 3 and ck.verify(resume.path) is None
    value = torch.load(resume.path / "model.pt", weights_only=True)["w"][0, 0]
    assert value == (33.0 if crash_at == "old_removed" else 3.0)
    assert not list(tmp_path.glob("*.tmp"))


# ---- real processes ---------------------------------------------------------------------------
def _worker(argv: list[str]) -> int:
    from gpt2.checkpoint import manager as checkpoint

    at = int(os.environ.get("GPT2_TEST_HOLD_AT_STEP", "0"))
    if at and int(os.environ["RANK"]) == int(os.environ.get("GPT2_TEST_HOLD_RANK", "0")):
        marker, hold_s = os.environ.get("GPT2_TEST_HOLD_MARKER"), float(os.environ.get("GPT2_TEST_HOLD_S", "600"))

        def hold(step: int) -> None:
            if step == at:
                if marker:
                    Path(marker).write_text(str(step))
                time.sleep(hold_s)

        if os.environ.get("GPT2_TEST_HOLD_IN", "write") == "write":
            write_local = checkpoint.CheckpointManager._write_local

            def held_write(self: checkpoint.CheckpointManager, job: Any, *args: Any) -> None:
                write_local(self, job, *args)
                hold(job.step)

            checkpoint.CheckpointManager._write_local = held_write  # type: ignore[method-assign]
        else:
            commit = checkpoint.CheckpointManager._commit

            def held_commit(self: checkpoint.CheckpointManager, tmp: Path, final: Path, step: int, *a: Any) -> None:
                hold(step)
                commit(self, tmp, final, step, *a)

            checkpoint.CheckpointManager._commit = held_commit  # type: ignore[method-assign]
    return tr._worker(argv)


def start(world: int, args: list[str], logdir: Path, **extra: str) -> list[subprocess.Popen[bytes]]:
    """tests/test_resume.py's `start`, with this file's worker."""
    logdir.mkdir(parents=True, exist_ok=True)
    port = tr._free_port()
    procs = []
    for r in range(world):
        with open(logdir / f"out{r}.txt", "ab") as out:
            procs.append(subprocess.Popen([sys.executable, __file__, *args], cwd=tr.ROOT,
                                          env=tr._env(r, world, port, extra), stdout=out, stderr=subprocess.STDOUT))
    return procs


def launch(world: int, args: list[str], logdir: Path, expect: int, **extra: str) -> None:
    codes = tr.wait(start(world, args, logdir, **extra), logdir)
    assert codes == [expect] * world, f"exit codes {codes}, expected {expect} on every rank\n{tr._tail(logdir)}"


@pytest.fixture(scope="module")
def runs(common: list[str], tmp_path_factory: pytest.TempPathFactory) -> tr.Runs:
    return tr.Runs(common, tmp_path_factory)


common = tr.common  # the module-scoped fixture: shards and the ZeRO-2 JSON
EVERY = tr.EVERY


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])
def test_stop_during_inflight_save_then_resume_is_bitwise_identical(backend: str, runs: tr.Runs,
                                                                    tmp_path: Path) -> None:
    """Saves every 2 steps; the save of step 2 is held 3 s in rank 0's background write while step 3
    runs and rank 1 gets the stop signal: the stop waits for step 2's commit, then saves step 3."""
    run = tmp_path / "run"
    args = [*runs.args(backend, run), f"{EVERY}=2"]
    launch(2, args, tmp_path / "first", tr.EXIT_REQUEUE, GPT2_TEST_SIGNAL_AT_STEP="3", GPT2_TEST_SIGNAL_RANK="1",
           GPT2_TEST_HOLD_AT_STEP="2", GPT2_TEST_HOLD_RANK="0", GPT2_TEST_HOLD_S="3")
    ckdir = run / "checkpoints"
    assert ck.committed_steps(ckdir) == [2, 3] and not list(ckdir.glob("*.tmp"))
    assert all(ck.verify(ckdir / step_name(s)) is None for s in (2, 3))
    assert "stopping at step 3 (USR2)" in tr.log_text(run)

    launch(2, args, tmp_path / "second", 0)
    assert f"resumed from {ckdir / step_name(3)} at step 3 (" in tr.log_text(run)
    base = runs.baseline(backend)
    assert tr.losses(run) == tr.losses(base)  # bitwise: the same floats
    a, b = tr.final_weights(run), tr.final_weights(base)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_stop_while_this_very_step_is_in_flight_saves_it_once(runs: tr.Runs, tmp_path: Path) -> None:
    """Saves every step; step 2's background write is held 3 s and the stop comes after step 2: the
    stop waits for that save instead of saving step 2 again; async and sync checkpoints agree."""
    for mode in ("async", "sync"):
        run = tmp_path / mode
        args = [*runs.args("ddp", run), f"{EVERY}=1",
                f"trainer.config.checkpoint_strategy.config.async_save={mode == 'async'}"]
        launch(2, args, tmp_path / f"out_{mode}", tr.EXIT_REQUEUE, GPT2_TEST_SIGNAL_AT_STEP="2",
               GPT2_TEST_SIGNAL_RANK="1", GPT2_TEST_HOLD_AT_STEP="2", GPT2_TEST_HOLD_RANK="0", GPT2_TEST_HOLD_S="3")
        assert ck.committed_steps(run / "checkpoints") == [1, 2]
        assert tr.log_text(run).count("checkpoint step_00000002 committed") == 1
    # the same state, whichever way it was written (the files' bytes differ: torch.save stamps each file
    # with a random serialization id, and python's and numpy's generators are seeded from the OS)
    saved = [tmp_path / m / "checkpoints" / step_name(2) for m in ("async", "sync")]
    sizes = [{k: v["size"] for k, v in json.loads((p / "MANIFEST.json").read_text())["files"].items()
              if not k.startswith("rank_")} for p in saved]
    assert sizes[0] == sizes[1] and set(sizes[0]) == {"model.pt", "optimizer.pt"}
    a, b = (torch.load(p / "model.pt", weights_only=True) for p in saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(p / "optimizer.pt", weights_only=True) for p in saved)
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


@pytest.mark.slow
@pytest.mark.parametrize("backend,where", [("ddp", "write"), ("fsdp", "write"), ("ddp", "commit")])
def test_sigkill_during_background_save_resumes_from_previous(backend: str, where: str, runs: tr.Runs,
                                                              tmp_path: Path) -> None:
    run, marker, k = tmp_path / "run", tmp_path / "held", 3
    args = [*runs.args(backend, run), f"{EVERY}=1"]
    procs = start(2, args, tmp_path / "first", GPT2_TEST_HOLD_AT_STEP=str(k),
                  GPT2_TEST_HOLD_RANK="1" if where == "write" else "0", GPT2_TEST_HOLD_IN=where,
                  GPT2_TEST_HOLD_MARKER=str(marker))
    tr.wait_for_marker(procs, marker, f"the save of step {k} never held", tmp_path / "first")
    for p in procs:
        p.send_signal(signal.SIGKILL)
    assert [p.wait() for p in procs] == [-signal.SIGKILL] * 2
    ckdir = run / "checkpoints"
    assert (ckdir / f"{step_name(k)}.tmp").is_dir() and not (ckdir / step_name(k)).exists()
    assert ck.verify(ckdir / step_name(k - 1)) is None  # the previous checkpoint is whole

    launch(2, args, tmp_path / "second", 0)
    text = tr.log_text(run)
    assert f"removing unfinished checkpoint {step_name(k)}.tmp" in text
    assert f"resumed from {ckdir / step_name(k - 1)} at step {k - 1} (" in text
    assert tr.losses(run) == tr.losses(runs.baseline(backend))


@pytest.mark.slow
def test_full_disk_in_background_write_is_one_line_on_every_rank(runs: tr.Runs, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")
    try:
        run = tmp_path / "run"
        args = [*runs.args("ddp", run), f"{EVERY}=2",
                f"trainer.config.checkpoint_strategy.config.checkpoint_dir={small}/ck"]
        launch(2, args, tmp_path / "out", 2)
        for r in range(2):
            lines = [x for x in (tmp_path / "out" / f"out{r}.txt").read_text().splitlines() if x.strip()]
            assert lines[-1].startswith("error: checkpoint step_00000002 not saved: "), lines[-5:]
            assert "disk is full" in lines[-1] and "Traceback" not in "\n".join(lines)
        assert not [p.name for p in (small / "ck").iterdir() if p.name.startswith("step_")]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False, capture_output=True)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
