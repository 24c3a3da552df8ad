"""One writer per run (gpt2/checkpoint/lease.py): a second writer refused, expired and requeued leases taken
over, the heartbeat, and a zombie whose lease was taken over committing nothing.

The slow test runs DDP as 2 gloo processes; as a script this file is one rank of such a run:
tests/test_resume.py's worker plus one test-only hook:
- GPT2_TEST_HOLD_AT_STEP=s, GPT2_TEST_HOLD_MARKER=path, GPT2_TEST_HOLD_RELEASE=path: rank 0 stops
  inside the save of step s, right before the commit, touches the marker and waits until the
  release file exists (the test changes the run directory meanwhile).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_checkpoint / test_resume, also as a script


# ---- the lease, in one process --------------------------------------------------------------------------
def _held_by(run: Path, **fields: object) -> None:
    holder = {"host": "node-a", "pid": 4242, "job_id": "100", "restart": 0, "heartbeat": time.time(), "token": "t"}
    holder.update(fields)
    run.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run / ".lease.lock")):  # as a live writer does: never between a heartbeat's read and write
        (run / "LEASE.json").write_text(json.dumps(holder))


@pytest.fixture
def job_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No job identity from the environment the tests run in."""
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
                "GPT2_RESTART_COUNT", "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_second_writer_is_refused_naming_the_holder(tmp_path: Path, job_env: pytest.MonkeyPatch) -> None:
    from gpt2.checkpoint.lease import Lease, LeaseHeld

    monkeypatch = job_env
    monkeypatch.setenv("SLURM_JOB_ID", "200")
    _held_by(tmp_path)
    with pytest.raises(LeaseHeld) as err:
        Lease(tmp_path).acquire()
    assert "host node-a pid 4242 (job 100, restart 0)" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("SLURM_JOB_ID", "100")  # the same job, not a later attempt of it: still refused
    with pytest.raises(LeaseHeld):
        Lease(tmp_path).acquire()


@pytest.mark.parametrize("case", ["expired", "requeue", "array requeue", "dead pid"])
def test_lease_takeover(case: str, tmp_path: Path, job_env: pytest.MonkeyPatch, warnings: list[str]) -> None:
    from gpt2.checkpoint.lease import EXPIRY_S, LEASE, Lease

    monkeypatch = job_env
    if case == "expired":
        _held_by(tmp_path, heartbeat=time.time() - EXPIRY_S - 5)
        needle = "heartbeat is"
    elif case == "requeue":
        _held_by(tmp_path)  # fresh heartbeat, another node
        monkeypatch.setenv("SLURM_JOB_ID", "100")
        monkeypatch.setenv("GPT2_RESTART_COUNT", "1")
        needle = "a requeued attempt of job 100 (restart 1) replaces restart 0"
    elif case == "array requeue":
        _held_by(tmp_path, job_id="100_3")
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
        needle = "a requeued attempt of job 100_3"
    else:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        _held_by(tmp_path, host=socket.gethostname(), pid=dead.pid, pidns=os.readlink("/proc/self/ns/pid"))
        needle = f"pid {dead.pid} no longer exists on this host"
    lease = Lease(tmp_path).acquire()
    try:
        assert any("taking over the lease" in w and needle in w for w in warnings), warnings
        held = json.loads((tmp_path / LEASE).read_text())
        assert held["pid"] == os.getpid() and held["token"] == lease.mine.token
        lease.check("committing")  # it is ours now
    finally:
        lease.release()
    assert not (tmp_path / LEASE).exists()


@pytest.mark.parametrize("damage", ["fifo", "deep", "pid 1e999", "future heartbeat"])
def test_a_damaged_lease_file_is_unleased_never_a_hang_or_a_traceback(damage: str, tmp_path: Path,
                                                                      job_env: pytest.MonkeyPatch,
                                                                      warnings: list[str]) -> None:
    """Found by fuzzing: a FIFO hung the start, deep nesting and 1e999 were tracebacks, and a heartbeat
    in the future held the run directory for ever."""
    from gpt2.checkpoint.lease import LEASE, Lease

    path = tmp_path / LEASE
    if damage == "fifo":
        os.mkfifo(path)
    elif damage == "deep":
        path.write_text("[" * 100_000)
    else:
        _held_by(tmp_path, **({"pid": 1e999} if damage == "pid 1e999" else {"heartbeat": 1e18}))
        if damage == "pid 1e999":
            path.write_text(path.read_text().replace("Infinity", "1e999"))
    lease = Lease(tmp_path).acquire()  # unreadable: the directory is unleased, and now ours
    try:
        assert any("is unreadable" in w for w in warnings), warnings
        assert json.loads(path.read_text())["token"] == lease.mine.token
    finally:
        lease.release()


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path: Path, job_env: pytest.MonkeyPatch) -> None:
    from gpt2.checkpoint.lease import LEASE, Lease

    lease = Lease(tmp_path, heartbeat_s=0.05).acquire()
    try:
        first = json.loads((tmp_path / LEASE).read_text())["heartbeat"]
        deadline = time.monotonic() + 60
        while json.loads((tmp_path / LEASE).read_text())["heartbeat"] == first:
            assert time.monotonic() < deadline, "the heartbeat thread never refreshed the lease"
            time.sleep(0.05)
        _held_by(tmp_path)  # taken over
        while lease.lost is None:
            assert time.monotonic() < deadline, "the heartbeat thread never noticed the takeover"
            time.sleep(0.05)
        assert lease.lost.pid == 4242 and json.loads((tmp_path / LEASE).read_text())["pid"] == 4242  # not rewritten
    finally:
        lease.release()
    assert json.loads((tmp_path / LEASE).read_text())["pid"] == 4242  # release never removes another's lease


def test_zombie_does_not_commit(tmp_path: Path, job_env: pytest.MonkeyPatch) -> None:
    """In one process: writer A's lease is taken over by a requeued attempt. A's next save is
    refused at its start (the live writer's .tmp of that step is left alone), and a takeover
    during A's write is caught before the commit."""
    from test_checkpoint import FakeBackend, manager, save

    from gpt2.checkpoint.lease import Lease, LeaseLost

    job_env.setenv("SLURM_JOB_ID", "100")
    root = tmp_path / "checkpoints"
    m = manager(root)
    m.lease = Lease(tmp_path).acquire()

    class TakenOverWhileWriting(FakeBackend):
        def stage(self, ckpt_dir: Path, copy: bool) -> object:
            _held_by(tmp_path, restart=1)  # the requeued attempt on node-a takes the lease now
            return super().stage(ckpt_dir, copy)

    try:
        save(m, 1)
        with pytest.raises(LeaseLost, match=r"not committing step_00000002: .*host node-a pid 4242 \(job 100, "
                                            r"restart 1\).*stale writer"):
            m.save(2, TakenOverWhileWriting(2.0), meta={"config": {}}, trainer_state={"step": 2, "tokens": 0,
                                                                                        "data": {}})
        live = root / "step_00000003.tmp"  # the new holder's save of step 3, in progress
        live.mkdir()
        (live / "model.pt").write_bytes(b"being written")
        with pytest.raises(LeaseLost, match=r"not starting step_00000003: .*host node-a pid 4242"):
            save(m, 3)
        assert (live / "model.pt").read_bytes() == b"being written"
    finally:
        m.lease.release()
    assert json.loads((tmp_path / "LEASE.json").read_text())["pid"] == 4242  # release left the new holder's lease
    assert (root / "latest").read_text().strip() == "step_00000001" and not (root / "step_00000002").exists()


# ---- real processes ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_args(pydoc_shards: Path) -> list[str]:
    from test_trust import SMALL

    return [*SMALL, f"dataset.train_dataset.data_root={pydoc_shards}", f"dataset.val_dataset.data_root={pydoc_shards}"]


@pytest.mark.slow
def test_one_writer_per_run_with_real_processes(base_args: list[str], tmp_path: Path) -> None:
    """A (2 ranks, job 4242) is held before its first commit. C (another job) is refused naming A.
    A requeued attempt takes the lease; A's commit is then refused (a zombie), and a later attempt
    of job 4242 takes over at once and trains."""
    import test_resume
    from test_trust import _start, _tail

    run = tmp_path / "run"
    marker, release = tmp_path / "held", tmp_path / "release"
    args = [*base_args, "trainer=ddp", f"run.dir={run}", "trainer.config.max_steps=1",
            "trainer.config.hang_timeout_s=0"]
    procs = _start(2, args, tmp_path / "a", script=Path(__file__), SLURM_JOB_ID="4242", GPT2_RESTART_COUNT="0", GPT2_TEST_HOLD_AT_STEP="1",
                   GPT2_TEST_HOLD_MARKER=str(marker), GPT2_TEST_HOLD_RELEASE=str(release))
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _tail(tmp_path / "a")
            time.sleep(0.2)
        holder = json.loads((run / "LEASE.json").read_text())
        assert holder["pid"] == procs[0].pid and holder["job_id"] == "4242"

        second = test_resume.start(1, args, tmp_path / "c", SLURM_JOB_ID="9999")
        assert test_resume.wait(second, tmp_path / "c") == [2], _tail(tmp_path / "c")
        err = [ln for ln in (tmp_path / "c" / "out0.txt").read_text().splitlines() if ln.startswith("error: ")]
        assert len(err) == 1 and f"host {socket.gethostname()} pid {procs[0].pid} (job 4242, restart 0)" in err[0]
        assert not list(run.glob("checkpoints/step_0*[0-9]")), "the refused writer touched the checkpoints"

        _held_by(run, host="node-b", pid=1, job_id="4242", restart=1)  # a requeued attempt took it over
        release.touch()
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes[0] == 2 and codes[1] != 0, (codes, _tail(tmp_path / "a"))
    text = (tmp_path / "a" / "out0.txt").read_text()
    assert "error: not committing step_00000001: the lease of" in text and "stale writer" in text
    assert not (run / "checkpoints" / "step_00000001").exists() and not (run / "checkpoints" / "latest").exists()

    later = test_resume.start(1, args, tmp_path / "d", SLURM_JOB_ID="4242", GPT2_RESTART_COUNT="2")
    assert test_resume.wait(later, tmp_path / "d") == [0], _tail(tmp_path / "d")
    # before the run's log file exists: the line goes to the job's console output
    assert "a requeued attempt of job 4242 (restart 2) replaces restart 1" in (tmp_path / "d" / "out0.txt").read_text()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (run / "LEASE.json").exists()  # released at the end


# ---- the worker (runs in the rank processes) -------------------------------------------------
def _worker(argv: list[str]) -> int:
    import test_resume

    from gpt2.checkpoint import manager as checkpoint

    hold = int(os.environ.get("GPT2_TEST_HOLD_AT_STEP", "0"))
    if hold:
        commit = checkpoint.CheckpointManager._commit

        def held_commit(self: checkpoint.CheckpointManager, tmp: Path, final: Path, step: int, *args: object) -> None:
            if step == hold:
                Path(os.environ["GPT2_TEST_HOLD_MARKER"]).write_text(str(tmp))
                release = Path(os.environ["GPT2_TEST_HOLD_RELEASE"])
                while not release.exists():
                    time.sleep(0.1)
            commit(self, tmp, final, step, *args)

        checkpoint.CheckpointManager._commit = held_commit  # type: ignore[method-assign]
    return test_resume._worker(argv)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
