"""The sweep directory against fake SLURM commands: idempotent and concurrent submission, arrays
chunked to MaxArraySize, status in SLURM's words, cancel, resubmit, logs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpt2.errors import UserError
from launch import record, sweep
from tests.fake_slurm import install_fake_slurm

ROOT = Path(__file__).resolve().parent.parent


class FakeCluster:
    def __init__(self, root: Path):
        self.env = install_fake_slurm(root)
        self.state = Path(self.env["FAKE_SLURM_DIR"])

    def sbatch_calls(self) -> list[dict]:
        log = self.state / "sbatch.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def set_queue(self, rows: dict[str, str]) -> None:
        (self.state / "queue").write_text("".join(f"{jid}|{st}|None\n" for jid, st in rows.items()))


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    c = FakeCluster(tmp_path / "fake")
    for k, v in c.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    return c


def experiment(tmp_path: Path, grid: str = "{trainer.config.lr: [3e-4, 1e-3], model.config.n_layer: [2, 4]}",
               parallelism: int = 8) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    path = tmp_path / "exp.yaml"
    path.write_text(f"""
cluster: local
executor: slurm
overrides:
  model: tiny
  dataset.train_dataset.data_root: {data}
  dataset.val_dataset.data_root: {data}
  trainer.config.min_lr: 1.0e-5
sweep: {{grid: {grid}}}
resources: {{nodes: 1, gpus_per_node: 0, tasks_per_node: 2, time: 10, array_parallelism: {parallelism}}}
""")
    return path


def sweep_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "exp"


def records(tmp_path: Path) -> dict[str, record.JobRecord]:
    return record.SweepRecord(sweep_dir(tmp_path)).read()


def test_concurrent_submissions_submit_each_job_once(cluster: FakeCluster, tmp_path: Path) -> None:
    exp = experiment(tmp_path)
    env = {**os.environ, "FAKE_SBATCH_DELAY": "1.0"}
    cmd = [sys.executable, "launch/sweep.py", str(exp)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    calls = cluster.sbatch_calls()
    assert len(calls) == 1 and len(calls[0]["ids"]) == 4  # one array of 4, submitted once
    recs = records(tmp_path)
    assert sorted(r.job_id for r in recs.values()) == sorted(calls[0]["ids"])
    assert sorted(r.array_index for r in recs.values()) == [0, 1, 2, 3]
    assert sum("not submitted again: 4 job(s) (4 PENDING)" in o for o, _ in outs) == 1


def test_rerun_is_idempotent_and_retries_only_failed(cluster: FakeCluster, tmp_path: Path) -> None:
    exp = str(experiment(tmp_path))
    assert sweep.main([exp]) == 0
    assert sweep.main([exp]) == 0
    assert len(cluster.sbatch_calls()) == 1
    recs = records(tmp_path)
    failed = next(iter(recs.values()))
    record.update_state(sweep_dir(tmp_path) / failed.job, state=record.FAILED, message="boom")
    cluster.set_queue({r.job_id: "PENDING" for r in recs.values() if r.job != failed.job})
    assert sweep.main([exp]) == 0
    calls = cluster.sbatch_calls()
    assert len(calls) == 2 and calls[1]["ids"] == [str(calls[1]["id"])]  # a single job, not an array
    again = records(tmp_path)[failed.job]
    assert again.submissions == 2 and again.job_id == str(calls[1]["id"]) and again.state == record.PENDING
    assert record.read_state(sweep_dir(tmp_path) / failed.job).state == record.PENDING


def test_changed_config_is_refused(cluster: FakeCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = str(experiment(tmp_path))
    assert sweep.main([exp]) == 0
    capsys.readouterr()
    assert sweep.main([exp, "model.config.n_embd=64"]) == 2
    assert "different config" in capsys.readouterr().err
    assert len(cluster.sbatch_calls()) == 1


def test_arrays_are_chunked_to_max_array_size(cluster: FakeCluster, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MAX_ARRAY_SIZE", "3")
    exp = experiment(tmp_path, grid="{run.seed: [1, 2, 3, 4, 5, 6, 7]}", parallelism=6)
    assert sweep.main([str(exp)]) == 0
    calls = cluster.sbatch_calls()
    assert [len(c["ids"]) for c in calls] == [3, 3, 1]
    script = (cluster.state / f"script_{calls[0]['id']}.sh").read_text()
    assert "#SBATCH --array=0-2%2" in script  # parallelism 6 shared by 3 arrays
    assert len(records(tmp_path)) == 7


def test_status_speaks_slurm(cluster: FakeCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sweep.main([str(experiment(tmp_path))]) == 0
    recs = list(records(tmp_path).values())
    d = sweep_dir(tmp_path)
    running, requeued, done, vanished = recs
    (d / running.job / "metrics.jsonl").write_text(
        '{"step": 10, "loss": 9.5, "tokens_per_s": 1234.0}\n{"step": 10, "val_loss": 9.9}\n')
    (d / running.job / "checkpoints").mkdir()
    (d / running.job / "checkpoints" / "latest").write_text("step_00000010\n")
    record.update_state(d / running.job, state=record.RUNNING)
    record.update_state(d / requeued.job, state=record.REQUEUED, restarts=1)
    record.update_state(d / done.job, state=record.COMPLETED, step=20, loss=8.0)
    record.update_state(d / vanished.job, state=record.RUNNING)
    cluster.set_queue({running.job_id: "RUNNING", requeued.job_id: "PENDING"})
    capsys.readouterr()
    assert sweep.main(["status", str(d), "--json"]) == 0
    rows = {r["job"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows[running.job]["state"] == "RUNNING" and rows[running.job]["last_step"] == 10
    assert rows[running.job]["checkpoint"] == "step_00000010" and rows[running.job]["tokens_per_s"] == 1234.0
    assert rows[requeued.job]["state"] == "REQUEUED" and rows[requeued.job]["restarts"] == 1
    assert rows[done.job]["state"] == "COMPLETED"
    assert rows[vanished.job]["state"] == "FAILED" and "left the queue" in rows[vanished.job]["message"]
    assert sweep.main(["status", str(d)]) == 0
    table = capsys.readouterr().out
    assert "JOB" in table and "STATE" in table and "RESTARTS" in table and "step_00000010" in table
    assert records(tmp_path)[done.job].state == "COMPLETED"  # the sweep record was refreshed too


def test_cancel_one_job(cluster: FakeCluster, tmp_path: Path) -> None:
    assert sweep.main([str(experiment(tmp_path))]) == 0
    recs = list(records(tmp_path).values())
    d = sweep_dir(tmp_path)
    assert sweep.main(["cancel", str(d), "1"]) == 0
    assert (cluster.state / "scancel.log").read_text().split() == [recs[1].job_id]
    st = record.read_state(d / recs[1].job)
    assert st.state == record.CANCELLED and st.cancel_requested
    after = records(tmp_path)
    assert after[recs[1].job].state == record.CANCELLED and after[recs[0].job].state == record.PENDING


def test_resubmit_failed_and_cancelled(cluster: FakeCluster, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert sweep.main([str(experiment(tmp_path))]) == 0
    recs = list(records(tmp_path).values())
    d = sweep_dir(tmp_path)
    record.update_state(d / recs[0].job, state=record.FAILED)
    record.update_state(d / recs[1].job, state=record.TIMEOUT, timeouts=4, cancel_requested=True)
    record.update_state(d / recs[2].job, state=record.CANCELLED)
    cluster.set_queue({recs[3].job_id: "RUNNING"})
    assert sweep.main(["resubmit", str(d)]) == 2
    assert "--failed" in capsys.readouterr().err
    assert sweep.main(["resubmit", str(d), "--failed"]) == 0
    calls = cluster.sbatch_calls()
    assert len(calls) == 2 and len(calls[1]["ids"]) == 2
    st = record.read_state(d / recs[1].job)
    assert st.state == record.PENDING and st.timeouts == 0 and not st.cancel_requested  # a fresh time-out budget
    cluster.set_queue({r.job_id: "PENDING" for r in records(tmp_path).values()})
    assert sweep.main(["resubmit", str(d), "--cancelled"]) == 0
    assert len(cluster.sbatch_calls()) == 3 and records(tmp_path)[recs[2].job].submissions == 2


def test_logs_shows_the_tail(cluster: FakeCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sweep.main([str(experiment(tmp_path))]) == 0
    rec = list(records(tmp_path).values())[2]
    folder = sweep_dir(tmp_path) / "logs" / rec.job_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{rec.job_id}_0_log.out").write_text("".join(f"line {i}\n" for i in range(100)))
    capsys.readouterr()
    assert sweep.main(["logs", str(sweep_dir(tmp_path)), rec.job, "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == ["line 97", "line 98", "line 99"]
    assert sweep.main(["logs", str(sweep_dir(tmp_path)), "zzz"]) == 2


def test_record_update_waits_for_the_lock(tmp_path: Path) -> None:
    m = record.SweepRecord(tmp_path)
    with m.locked():
        m.write([record.JobRecord(job="a", overrides=[], config_hash="h")])
        other = record.SweepRecord(tmp_path)  # a second lock object on the same file, as another process has
        assert other.update("a", timeout=0.2, state=record.RUNNING) is False
    assert m.update("a", state=record.RUNNING, last_step=3) is True
    assert m.read()["a"].state == record.RUNNING and m.read()["a"].last_step == 3
    assert m.update("missing", state=record.RUNNING) is False


def test_status_of_a_non_sweep_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sweep.main(["status", str(tmp_path)]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_a_sweep_from_before_the_rename_is_read_and_migrated(tmp_path: Path) -> None:
    """`manifest.jsonl` (the record's old name) is read as is; the next write moves it to `record.jsonl`."""
    (tmp_path / record.SWEEP_META).write_text('{"name": "x", "executor": "local", "cluster": "local", "resources": {}}')
    line = record.JobRecord(job="a", overrides=["x=1"], config_hash="h").to_json()
    (tmp_path / record.LEGACY_RECORD).write_text(line + "\n")
    record.read_sweep_meta(tmp_path)  # a sweep directory
    r = record.SweepRecord(tmp_path)
    assert r.exists() and list(r.read()) == ["a"]
    assert r.update("a", state=record.RUNNING) is True
    assert not (tmp_path / record.LEGACY_RECORD).exists()
    assert record.SweepRecord(tmp_path).read()["a"].state == record.RUNNING


# ---- damaged files never lock a sweep --------------------------------------------------------

COMMANDS = ("status", "cancel", "resubmit", "logs")

DAMAGES = {
    # name: (what to break, a word the warning must hold)
    "record_line": ("a torn line in record.jsonl", "line 5: not JSON"),
    "record_type": ("a record line whose overrides are not a list", "line 5: 'overrides'"),
    "sweep_json": ("sweep.json that is not JSON", "sweep.json is damaged"),
    "state_json": ("a state.json that is not JSON", "state.json: not JSON"),
    "state_type": ("a state.json whose restarts is text", "state.json: 'restarts'"),
    "metrics": ("a metrics.jsonl row whose loss is not a number", "non-number loss"),
    # found by fuzzing (each was a traceback, a hang or worse before):
    "record_huge_int": ("a record line with an integer of 5,000 digits", "line 5: not JSON (an integer of 5000"),
    "record_job_path": ("a record line whose job name climbs out of the sweep", "is not a plain name"),
    "record_job_id_option": ("a record line whose job id is an option of scancel", "is not a job id of the slurm"),
    "record_job_long": ("a record line whose job name is longer than a file name", "longer than a file name can be"),
    "record_job_file": ("a record line whose job names the sweep's own sweep.json (cancel: FileExistsError)",
                        "names a file of the sweep, not a run directory"),
    "sweep_executor": ("sweep.json naming an executor that does not exist", "sweep.json is damaged (executor"),
    "state_huge_int": ("a state.json with an integer of 5,000 digits", "state.json: not JSON"),
    "state_is_dir": ("a state.json that is a directory", "a directory, not a file"),
    "state_failure": ("a state.json whose last failure blames hosts as a number", None),
    "metrics_inf": ("metrics rows with Infinity for a restart and NaN for a time", None),
    "metrics_device": ("a metrics.jsonl that is a symlink to /dev/zero (a MemoryError)", "unreadable (not a regular"),
    "metrics_fifo": ("a FIFO named metrics.jsonl (status blocked forever)", "unreadable (not a regular file)"),
}
HUGE = "1" * 5000


def damage(d: Path, kind: str, job: str) -> None:
    if kind == "record_line":
        with (d / record.RECORD).open("a") as f:
            f.write('{"job": "torn", "overrides": [\n')
    elif kind == "record_type":
        with (d / record.RECORD).open("a") as f:
            f.write('{"job": "odd", "overrides": "lr=1", "config_hash": "h"}\n')
    elif kind == "sweep_json":
        (d / record.SWEEP_META).write_text('{"name": "exp", "exec')
    elif kind == "state_json":
        (d / job / record.STATE).write_text('{"state": "RUNN')
    elif kind == "state_type":
        (d / job / record.STATE).write_text('{"state": "RUNNING", "restarts": "two"}')
    elif kind == "metrics":
        (d / job / "metrics.jsonl").write_text('{"step": 5, "loss": 2.5, "tokens_per_s": 100.0}\n'
                                               '{"step": 6, "loss": "2.4!", "tokens_per_s": 100.0}\n')
    elif kind in ("record_huge_int", "record_job_path", "record_job_id_option", "record_job_long", "record_job_file"):
        line = {"record_huge_int": f'{{"job": "big", "overrides": [], "config_hash": "h", "restarts": {HUGE}}}',
                "record_job_long": f'{{"job": "{"x" * 300}", "overrides": [], "config_hash": "h", "state": "RUNNING"}}',
                "record_job_file": '{"job": "sweep.json", "overrides": [], "config_hash": "h", "state": "RUNNING"}',
                "record_job_path": '{"job": "../x", "overrides": [], "config_hash": "h", "state": "RUNNING"}',
                "record_job_id_option": '{"job": "evil", "overrides": [], "config_hash": "h", "executor": "slurm", '
                                        '"job_id": "--me", "state": "RUNNING"}'}[kind]
        with (d / record.RECORD).open("a") as f:
            f.write(line + "\n")
    elif kind == "sweep_executor":
        meta = json.loads((d / record.SWEEP_META).read_text())
        (d / record.SWEEP_META).write_text(json.dumps({**meta, "executor": "bogus"}))
    elif kind == "state_huge_int":
        (d / job / record.STATE).write_text(f'{{"state": "RUNNING", "restarts": {HUGE}}}')
    elif kind == "state_is_dir":
        (d / job / record.STATE).unlink(missing_ok=True)
        (d / job / record.STATE).mkdir(parents=True)
    elif kind == "state_failure":
        (d / job / record.STATE).write_text('{"state": "FAILED", "last_failure": {"kind": "hang", "hosts": 5}}')
    elif kind in ("metrics_device", "metrics_fifo"):
        (d / job / "metrics.jsonl").unlink(missing_ok=True)
        if kind == "metrics_fifo":
            os.mkfifo(d / job / "metrics.jsonl")
        else:
            (d / job / "metrics.jsonl").symlink_to("/dev/zero")
    elif kind == "metrics_inf":
        (d / job / "metrics.jsonl").write_text('{"step": 5, "loss": 2.5, "tokens_per_s": 100.0, "restart": 0, "time": 1}\n'
                                               '{"step": 6, "loss": NaN, "restart": Infinity, "time": NaN}\n')


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_file_never_locks_the_sweep(cluster: FakeCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              kind: str, command: str) -> None:
    assert sweep.main([str(experiment(tmp_path))]) == 0
    d = sweep_dir(tmp_path)
    recs = list(records(tmp_path).values())
    record.update_state(d / recs[1].job, state=record.FAILED, message="boom")  # something to resubmit
    damage(d, kind, recs[0].job)
    capsys.readouterr()
    argv = {"status": ["status", str(d)], "cancel": ["cancel", str(d)],
            "resubmit": ["resubmit", str(d), "--failed"], "logs": ["logs", str(d), recs[1].job]}[command]
    code = sweep.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if kind in ("sweep_json", "sweep_executor") and command == "resubmit":  # what to submit again is in sweep.json
        assert code == 2 and len(err.splitlines()) == 1 and "sweep.json is damaged" in err, err
        return
    if kind == "state_is_dir" and command == "cancel":  # cancelling writes the job's state.json: it cannot
        assert code == 0 and "cannot hold its state.json (Is a directory); cancelled in the record only" in err, err
    assert code == 0, err
    reads = {"status", "cancel", "resubmit"} if kind.startswith(("state", "metrics")) else set(COMMANDS)
    if kind == "sweep_executor":
        reads = {"status", "cancel", "logs"} - {"cancel"}  # cancel reads no sweep.json
    if command in reads and DAMAGES[kind][1] is not None:
        assert DAMAGES[kind][1] in err, err
        assert all(line.startswith("warning: ") for line in err.splitlines() if DAMAGES[kind][1] in line)
    if command == "status":
        assert recs[0].job in out and recs[1].job in out
    if kind == "metrics" and command == "status":
        assert records(tmp_path)[recs[0].job].last_step == 5  # the older row, not the damaged one
    if kind.startswith("record_"):  # the damaged line is kept for a person to fix, never dropped
        assert (d / record.RECORD).read_text().count('"job": "') == 5
    scancelled = (cluster.state / "scancel.log").read_text() if (cluster.state / "scancel.log").exists() else ""
    assert "--me" not in scancelled  # `scancel --me` would have cancelled every job of the user


SPECIAL_FILES = {  # a sweep's file: the commands that read it, and whether status says it could not
    "sweep.json": (("status", "cancel", "resubmit"), True),
    "{job}/state.json": (("status", "cancel", "logs"), True),
    "submitting.json": (("status", "cancel", "resubmit"), True),
    "{job}/metrics.jsonl": (("status",), True),
    # what is only shown is passed over in silence, as a damaged one always was
    "nodes.json": (("status", "nodes"), False),
    "{job}/checkpoints/latest": (("status",), False),
    "{job}/progress/rank0.json": (("status", "logs"), False),
    "{job}/failures/restart0-rank0.json": (("status", "logs"), False),
}


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging when the code under test blocks."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("name", list(SPECIAL_FILES))
def test_a_fifo_or_a_device_under_a_sweeps_file_name_never_hangs_nor_fills_memory(
        cluster: FakeCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, special: str) -> None:
    """Found by fuzzing: a FIFO under any of these names blocked status for ever, a symlink to
    /dev/zero was a MemoryError. Now each is an unreadable file: a warning, or one error line."""
    assert sweep.main([str(experiment(tmp_path))]) == 0
    d = sweep_dir(tmp_path)
    job = next(iter(records(tmp_path)))
    path = d / name.format(job=job)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    if special == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(special)
    commands, says = SPECIAL_FILES[name]
    for command in commands:
        capsys.readouterr()
        argv = {"status": ["status", str(d)], "cancel": ["cancel", str(d)], "resubmit": ["resubmit", str(d), "--failed"],
                "logs": ["logs", str(d), job, "--traceback"], "nodes": ["nodes", str(d)]}[command]
        with deadline(60):
            code = sweep.main(argv)
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err and code in (0, 2), (command, code, err)
        if code == 2:
            assert len(err.splitlines()) == 1 and err.startswith("error: ") and path.name in err, (command, err)
        if command == "status" and says:  # it says what it could not read
            assert "not a regular file" in err or "is damaged" in err, err


def test_a_record_that_is_no_regular_file_is_named_as_such(cluster: FakeCluster, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert sweep.main([str(experiment(tmp_path))]) == 0
    d = sweep_dir(tmp_path)
    (d / record.RECORD).unlink()
    os.mkfifo(d / record.RECORD)
    capsys.readouterr()
    with deadline(60):
        assert sweep.main(["status", str(d)]) == 2
    err = capsys.readouterr().err
    assert "record.jsonl is not a regular file" in err and len(err.splitlines()) == 1, err  # not "no sweep here"


def test_lock_timeout_never_advises_removing_the_lock(tmp_path: Path) -> None:
    from filelock import FileLock

    held = FileLock(str(tmp_path / record.RECORD) + ".lock")  # as a live launcher holds it
    with held, pytest.raises(UserError) as err:
        with record.SweepRecord(tmp_path).locked(timeout=0.2):
            pass
    msg = str(err.value).lower()
    assert "held" in msg and "wait" in msg
    assert not any(w in msg for w in ("remove", "delete", "rm "))


def test_local_alive_matches_the_exact_sweep(tmp_path: Path) -> None:
    """A controller of runs/exp2 is not one of runs/exp (a path prefix, not a parent)."""
    exp, exp2 = tmp_path / "exp", tmp_path / "exp2"
    for d in (exp, exp2):
        (d / "logs").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "submitit.local._local",
                             str(exp2 / "logs" / "1")])
    try:
        from launch.executors import local_alive

        assert local_alive(str(proc.pid), exp2)
        assert not local_alive(str(proc.pid), exp)
    finally:
        proc.kill()
        proc.wait()


def test_a_failed_job_slurm_still_holds_is_shown_requeued(cluster: FakeCluster, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """NODE_FAIL: a surviving rank wrote FAILED, but SLURM requeued the job itself: while it waits
    in the queue, status must not say FAILED (a user would resubmit a job that is queued)."""
    assert sweep.main([str(experiment(tmp_path, grid="{trainer.config.lr: [3e-4, 1e-3]}"))]) == 0
    held, gone = records(tmp_path).values()
    d = sweep_dir(tmp_path)
    lost = {"kind": "comm_error", "rank": 0, "host": "n1", "step": 12, "exc_type": "RuntimeError",
            "message": "Connection reset by peer", "rule": "transient: comm error (1/3)", "restart": 0, "hosts": ["n1"]}
    for rec in (held, gone):
        record.update_state(d / rec.job, state=record.FAILED, failures=1, message="rank 0: Connection lost",
                            last_failure=lost, first_failure={**lost, "traceback": "Traceback\nRuntimeError: reset"})
    cluster.set_queue({held.job_id: "PENDING"})
    capsys.readouterr()
    assert sweep.main(["status", str(d), "--json"]) == 0
    rows = {r["job"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows[held.job]["state"] == record.REQUEUED and "requeued by SLURM" in rows[held.job]["message"]
    assert rows[gone.job]["state"] == record.FAILED and rows[held.job]["failures"] == 1
    assert rows[held.job]["failure"] == ("comm_error on rank 0 on n1 at step 12: RuntimeError: Connection reset by "
                                         "peer; blamed n1; rule: transient: comm error (1/3)")
    assert sweep.main(["status", str(d)]) == 0
    assert f"{gone.job}: failure 1: comm_error on rank 0 on n1" in capsys.readouterr().out
    assert sweep.main(["logs", str(d), gone.job, "--traceback"]) == 0
    assert "RuntimeError: reset" in capsys.readouterr().out


def test_a_resubmission_excludes_a_twice_blamed_node(cluster: FakeCluster, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert sweep.main([str(experiment(tmp_path, grid="{trainer.config.lr: [3e-4, 1e-3]}"))]) == 0
    d = sweep_dir(tmp_path)
    first, other = records(tmp_path).values()
    assert "--exclude" not in (cluster.state / f"script_{cluster.sbatch_calls()[0]['id']}.sh").read_text()
    record.blame(d, "a/0", ["n1"], "a", "hang", "hang on rank 1 on n1 at step 4")
    record.blame(d, "b/0", ["n1", "n2"], "b", "node_fail", "NODE_FAIL")
    record.update_state(d / first.job, state=record.FAILED)
    cluster.set_queue({other.job_id: "PENDING"})  # `first` left the queue
    capsys.readouterr()
    assert sweep.main(["status", str(d)]) == 0
    assert "excluded nodes: n1 (2 blames)" in capsys.readouterr().out
    assert sweep.main(["resubmit", str(d), "--failed"]) == 0
    script = (cluster.state / f"script_{cluster.sbatch_calls()[-1]['id']}.sh").read_text()
    assert "#SBATCH --exclude=n1\n" in script
    capsys.readouterr()
    assert sweep.main(["nodes", str(d)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["HOST", "BLAMES", "EXCLUDED", "LAST", "FAILURE"]
    assert out[1].split()[:4] == ["n1", "2", "yes", "b:"] and out[2].split()[:3] == ["n2", "1", "no"]
    assert sweep.main(["nodes", str(d), "--clear", "n1"]) == 0
    assert record.excluded_hosts(d) == []
    assert sweep.main(["nodes", str(d), "--clear", "n7"]) == 2
    assert "no host 'n7'" in capsys.readouterr().err
