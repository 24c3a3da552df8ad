"""A launcher killed between sbatch (or a local controller's start) and the sweep record naming the
job: the next submission adopts what it had started instead of starting it twice (launch/intent.py).
The kill is real (the launcher exits at that point, GPT2_SUBMIT_EXIT_AFTER_SUBMIT); SLURM is the
fake one here (tests/fake_slurm) and the real local cluster in tests/test_slurm_e2e.py; the local
executor is real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from slurm_runs import TINY, write_experiment

from gpt2.errors import UserError
from launch import executors as ex
from launch import intent, record, slurm
from launch import sweep as sw
from tests.fake_slurm import install_fake_slurm

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "tests" / "golden" / "golden_exp.yaml"  # 4 jobs: 2 lrs x 2 depths
JOBS = 4


def sweep_py(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fake(tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    """(the submit arguments, the environment with fake SLURM, the sweep folder)."""
    data = tmp_path / "data"
    data.mkdir()
    env = {**install_fake_slurm(tmp_path / "fake"), "RUNS_DIR": str(tmp_path / "runs")}
    args = [str(EXP), "cluster=local", "resources.gpus_per_node=0", "resources.tasks_per_node=1",
            "resources.nodes=1", "resources.cpus_per_task=1", "resources.mem=null", "resources.time=30",
            f"dataset.train_dataset.data_root={data}", f"dataset.val_dataset.data_root={data}"]
    return args, env, tmp_path / "runs" / "golden_exp"


def sbatches(tmp_path: Path) -> list[dict]:
    log = tmp_path / "fake" / "state" / "sbatch.log"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []


def queue(tmp_path: Path) -> list[str]:
    path = tmp_path / "fake" / "state" / "queue"
    return path.read_text().splitlines() if path.is_file() else []


def killed(args: list[str], env: dict[str, str], sweep: Path) -> None:
    res = sweep_py(args, {**env, intent.EXIT_AFTER_SUBMIT: "1"})
    assert res.returncode == 9, res.stdout + res.stderr
    assert (sweep / intent.INTENT).is_file()
    assert all(r.job_id is None for r in record.SweepRecord(sweep).read().values())  # nothing recorded


def test_a_launcher_killed_after_sbatch_leaves_jobs_the_next_submission_adopts(
        tmp_path: Path, fake: tuple[list[str], dict[str, str], Path]) -> None:
    args, env, sweep = fake
    killed(args, env, sweep)
    assert len(sbatches(tmp_path)) == 1 and len(queue(tmp_path)) == JOBS  # one array: all four out there
    ahead = intent.read(sweep)[0]
    assert ahead is not None and len(ahead.rows) == JOBS and not record.SweepRecord(sweep).read()  # a new sweep
    again = sweep_py(args, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "adopted them" in again.stderr and "none is submitted twice" in again.stderr
    assert len(sbatches(tmp_path)) == 1  # no second sbatch
    recs = record.SweepRecord(sweep).read()
    first = sbatches(tmp_path)[0]["id"]
    # array task i is the launcher's i-th job, with the overrides it was submitted with
    assert [(recs[r.job].job_id, recs[r.job].array_index, recs[r.job].overrides) for r in ahead.rows] == \
        [(f"{first}_{i}", i, r.overrides) for i, r in enumerate(ahead.rows)]
    assert {r.submissions for r in recs.values()} == {1} and not (sweep / intent.INTENT).exists()
    script = (tmp_path / "fake" / "state" / f"script_{first}.sh").read_text()
    assert f"#SBATCH --comment=gpt2-submission:{ahead.token}:0\n" in script
    third = sweep_py(args, env)  # and from now on the sweep is an ordinary one
    assert third.returncode == 0 and "not submitted again: 4 job(s)" in third.stdout, third.stdout + third.stderr
    assert len(sbatches(tmp_path)) == 1


def test_jobs_the_killed_launcher_never_submitted_are_submitted_once(
        tmp_path: Path, fake: tuple[list[str], dict[str, str], Path]) -> None:
    args, env, sweep = fake
    env = {**env, "FAKE_MAX_ARRAY_SIZE": "2"}  # two arrays of two: the kill comes after the first
    killed(args, env, sweep)
    assert [len(b["ids"]) for b in sbatches(tmp_path)] == [2]
    again = sweep_py(args, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [len(b["ids"]) for b in sbatches(tmp_path)] == [2, 2]  # the other two, once
    recs = record.SweepRecord(sweep).read()
    ids = [i for b in sbatches(tmp_path) for i in b["ids"]]
    assert sorted(r.job_id for r in recs.values()) == sorted(ids) and {r.submissions for r in recs.values()} == {1}


def test_a_job_that_already_left_the_queue_is_found_by_its_state(
        tmp_path: Path, fake: tuple[list[str], dict[str, str], Path]) -> None:
    args, env, sweep = fake
    killed(args, env, sweep)
    first = sbatches(tmp_path)[0]["id"]
    gone = [line for line in queue(tmp_path) if line.startswith(f"{first}_1|")]
    (tmp_path / "fake" / "state" / "queue").write_text("".join(f"{x}\n" for x in queue(tmp_path) if x not in gone))
    job = intent.read(sweep)[0].rows[1].job  # array task 1: it ran, wrote its id, and finished
    record.update_state(sweep / job, state=record.COMPLETED, job_id=f"{first}_1", executor="slurm")
    again = sweep_py(args, env)
    assert again.returncode == 0, again.stdout + again.stderr
    recs = record.SweepRecord(sweep).read()
    assert recs[job].job_id == f"{first}_1" and recs[job].state == record.COMPLETED
    assert len(sbatches(tmp_path)) == 1 and {r.submissions for r in recs.values()} == {1}


def test_status_after_an_interrupted_submission_shows_its_jobs(
        tmp_path: Path, fake: tuple[list[str], dict[str, str], Path]) -> None:
    args, env, sweep = fake
    killed(args, env, sweep)
    res = sweep_py(["status", str(sweep), "--json"], env)
    assert res.returncode == 0 and "adopted them" in res.stderr, res.stdout + res.stderr
    first = sbatches(tmp_path)[0]["id"]
    shown = [json.loads(line) for line in res.stdout.splitlines()]
    assert sorted(r["job_id"] for r in shown) == [f"{first}_{i}" for i in range(JOBS)]
    assert {r["state"] for r in shown} == {record.PENDING} and not (sweep / intent.INTENT).exists()


def test_cancel_after_an_interrupted_submission_cancels_its_jobs(
        tmp_path: Path, fake: tuple[list[str], dict[str, str], Path]) -> None:
    args, env, sweep = fake
    killed(args, env, sweep)
    res = sweep_py(["cancel", str(sweep)], env)
    assert res.returncode == 0 and "cancelled 4 job(s)" in res.stdout, res.stdout + res.stderr
    first = sbatches(tmp_path)[0]["id"]
    cancelled = (tmp_path / "fake" / "state" / "scancel.log").read_text().split()
    assert sorted(cancelled) == [f"{first}_{i}" for i in range(JOBS)] and not queue(tmp_path)


def test_a_launcher_interrupted_inside_sbatch_keeps_its_line_and_sbatch_refusing_drops_it(
        tmp_path: Path, fake: tuple[list[str], dict[str, str], Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    args, env, sweep = fake
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    real = ex.submit_slurm

    def interrupted(*a: Any, **kw: Any) -> Iterator[list[ex.Submitted]]:
        next(real(*a, **kw))  # sbatch accepted the array; Ctrl-C before the launcher saw its ids
        raise KeyboardInterrupt
        yield []

    def refused(*a: Any, **kw: Any) -> Iterator[list[ex.Submitted]]:
        raise slurm.CommandError("sbatch refused the submission: QOSMaxSubmitJobPerUserLimit")
        yield []

    monkeypatch.setattr(ex, "submit_slurm", refused)
    assert sw.main(args) == 1 and "QOSMaxSubmitJobPerUserLimit" in capsys.readouterr().err
    assert not (sweep / intent.INTENT).exists() and not list(sweep.glob(f"*/{record.STATE}"))  # nothing out there
    monkeypatch.setattr(ex, "submit_slurm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sw.main(args)
    assert (sweep / intent.INTENT).is_file() and len(sbatches(tmp_path)) == 1
    monkeypatch.setattr(ex, "submit_slurm", real)
    assert sw.main(args) == 0 and "adopted them" in capsys.readouterr().err
    assert len(sbatches(tmp_path)) == 1 and {r.submissions for r in record.SweepRecord(sweep).read().values()} == {1}


def test_squeue_failing_keeps_the_line_and_submits_nothing(tmp_path: Path) -> None:
    row = record.JobRecord(job="a", overrides=["x=1"], config_hash="h", executor="slurm")
    it = intent.begin(tmp_path, "slurm", [row])
    with pytest.raises(UserError, match="squeue failed, so what it submitted cannot be told: try again"):
        intent.recover(tmp_path, {}, queue=lambda: None)
    assert intent.read(tmp_path)[0] == it  # kept for the next try


def test_only_this_submissions_token_is_adopted(tmp_path: Path) -> None:
    rows = [record.JobRecord(job=n, overrides=[f"x={n}"], config_hash=n, executor="slurm") for n in "abc"]
    it = intent.begin(tmp_path, "slurm", rows)
    tagged = [("7_0", it.comment(1)), ("7_1", it.comment(1)),  # an array of rows 1 and 2
              ("8", intent.slurm_comment("0" * 16, 0)),  # another submission's
              ("9", "a user's own comment"), ("10_3", it.comment(1)),  # a task past the rows: ignored
              # found by fuzzing, each a ValueError that stopped status and cancel: numbers int() cannot read
              ("11", f"{intent.TAG}:{it.token}:{'9' * 5000}"), ("12_²", it.comment(1)), ("²", it.comment(0)),
              ("13", f"{intent.TAG}:{it.token}:²")]
    records: dict[str, record.JobRecord] = {}
    adopted, warnings = intent.recover(tmp_path, records, queue=lambda: tagged)
    assert adopted == {"b", "c"} and "adopted them (b, c)" in warnings[0]
    assert (records["b"].job_id, records["b"].array_index, records["c"].job_id) == ("7_0", 0, "7_1")
    assert records["b"].overrides == ["x=b"] and records["b"].submitted_at == it.time


def test_a_crafted_line_is_never_adopted_into_the_record(tmp_path: Path) -> None:
    row = vars(record.JobRecord(job="a", overrides=["x=1"], config_hash="h", executor="slurm"))
    it = intent.begin(tmp_path, "slurm", [record.JobRecord(job="a", overrides=["x=1"], config_hash="h")])
    text = json.dumps({"token": it.token, "executor": "slurm", "time": it.time, "jobs": [{**row, "overrides": "x=1"}]})
    (tmp_path / intent.INTENT).write_text(text)
    records: dict[str, record.JobRecord] = {}
    adopted, warnings = intent.recover(tmp_path, records, queue=lambda: [("7", it.comment(0))])
    assert not adopted and not records and "'overrides' is \"x=1\", not list[str]" in warnings[0]


def test_a_local_controller_is_found_by_its_environment(tmp_path: Path) -> None:
    rows = [record.JobRecord(job=n, overrides=[], config_hash=n, executor="local") for n in "ab"]
    it = intent.begin(tmp_path, "local", rows)
    live = [("4242", f"{it.token}:1"), ("4343", "another:0")]
    records: dict[str, record.JobRecord] = {}
    assert intent.recover(tmp_path, records, controllers=lambda: live)[0] == {"b"}
    assert records["b"].job_id == "4242" and "a" not in records


def test_a_damaged_line_is_reported_and_the_submission_goes_on(
        tmp_path: Path, fake: tuple[list[str], dict[str, str], Path]) -> None:
    args, env, sweep = fake
    sweep.mkdir(parents=True)
    (sweep / intent.INTENT).write_text('{"token": "ab", "jobs": [')
    res = sweep_py(args, env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cannot be read (JSONDecodeError: " in res.stderr and "removed it: if `squeue` shows jobs" in res.stderr
    assert len(sbatches(tmp_path)) == 1 and not (sweep / intent.INTENT).exists()


@pytest.mark.slow
def test_local_controllers_of_a_killed_launcher_are_adopted_not_started_again(tmp_path: Path,
                                                                              pydoc_shards: Path) -> None:
    env = {"RUNS_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    data = {"dataset.train_dataset.data_root": str(pydoc_shards), "dataset.val_dataset.data_root": str(pydoc_shards)}
    exp = [str(write_experiment(tmp_path / "local_two.yaml", {**TINY, **data, "trainer.config.max_steps": 4},
                                {"gpus_per_node": 0, "tasks_per_node": 1}, grid={"trainer.config.lr": [1.0e-3, 2.0e-3]},
                                executor="local"))]
    sweep = tmp_path / "runs" / "local_two"
    killed(exp, env, sweep)  # its two controllers run on
    token = intent.read(sweep)[0].token
    assert sorted(v for _, v in intent.local_controllers() if v.startswith(token)) == [f"{token}:0", f"{token}:1"]
    again = sweep_py(exp, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "adopted them" in again.stderr and "not submitted again: 2 job(s)" in again.stdout
    recs = record.SweepRecord(sweep).read()
    deadline = time.monotonic() + 240
    while not all((record.read_state(sweep / n) or record.RunState()).state == record.COMPLETED for n in recs):
        assert time.monotonic() < deadline, {n: record.read_state(sweep / n) for n in recs}
        time.sleep(1)
    controllers = sorted(p.name for p in (sweep / "logs").iterdir() if p.name.isdigit())
    assert sorted(r.job_id for r in recs.values()) == controllers  # two controllers ever, both recorded
    for name, rec in recs.items():
        steps = [json.loads(x)["step"] for x in (sweep / name / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in x]
        assert steps == [1, 2, 3, 4] and rec.submissions == 1, (name, steps)
