"""The job side: requeue decisions with a stand-in trainer and a fake `scontrol` (fast), then the
real thing on the local executor: a 2-process DDP job end to end, and a time-out that requeues
and resumes from the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpt2.config import TrainerConfig
from gpt2.errors import EXIT_FAILURE, EXIT_REQUEUE, UserError
from launch import record, slurm
from launch.failures import judge
from launch.job import (
    LOCAL_REQUEUE_CODE,
    JobEntry,
    TaskContext,
    after_stop,
    decide_failure,
    note_node_failure,
    run_in_process,
)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:  # what gpt2.train.run returns
    status: str
    step: int
    reason: str | None = None
    final_loss: float | None = None
    save_s: float | None = None


class Cfg:
    """The part of a Config the job side reads."""

    def __init__(self, run_dir: Path):
        self.run = type("Run", (), {"dir": str(run_dir)})()
        self.trainer = TrainerConfig()  # the checkpoint interval (a fixed one: no MTBI to export)


def entry(tmp_path: Path, executor: str = "slurm", **kw: object) -> JobEntry:
    return JobEntry(cfg=Cfg(tmp_path / "run"), sweep_dir=str(tmp_path), job="run", executor=executor,
                    time_limit_s=3600.0, signal_lead_s=120.0, **kw)  # type: ignore[arg-type]


def ctx(tmp_path: Path, rank: int = 0, restarts: int = 0) -> TaskContext:
    return TaskContext(rank=rank, world_size=2, job_id="77_3", restarts=restarts, run_dir=tmp_path / "run")


@pytest.fixture(autouse=True)
def environment_restored() -> Iterator[None]:
    """run_task exports a rank's variables into os.environ, as a job's process must; here that is the
    test process, and they leaked into later tests (another test's main.py wrote this one's
    GPT2_QUEUED_AT into its start rows)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def cluster_without_these_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM's queries about job 77_3 answer as a cluster that does not know it (what the local
    cluster says, quickly; with the cluster down, each squeue here waited 18 s for slurmctld)."""
    monkeypatch.setattr(slurm, "time_left_s", lambda job_id: None)
    monkeypatch.setattr(slurm, "job_state", lambda job_id: None)


@pytest.fixture
def requeued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(slurm, "requeue", calls.append)
    return calls


def test_time_out_requeues_the_array_task(tmp_path: Path, requeued: list[str]) -> None:
    code = after_stop(entry(tmp_path), ctx(tmp_path), Outcome("preempted", 40, "USR2", 3.2, 0.4), elapsed_s=3470)
    st = record.read_state(tmp_path / "run")
    assert code == EXIT_REQUEUE and requeued == ["77_3"]
    assert (st.state, st.restarts, st.timeouts, st.preemptions, st.step, st.stop_save_s) == (
        record.REQUEUED, 1, 1, 0, 40, 0.4)


def test_preemptions_never_use_up_time_out_retries(tmp_path: Path, requeued: list[str]) -> None:
    e = entry(tmp_path, max_timeouts=1)
    for i in range(5):  # SIGTERM, or USR2 long before the limit: preemptions
        reason, elapsed = ("SIGTERM", 3500) if i % 2 else ("USR2", 100)
        assert after_stop(e, ctx(tmp_path, restarts=i), Outcome("preempted", i, reason), elapsed) == EXIT_REQUEUE
    assert after_stop(e, ctx(tmp_path, restarts=5), Outcome("preempted", 9, "time_budget"), 10) == EXIT_REQUEUE
    st = record.read_state(tmp_path / "run")
    assert (st.state, st.preemptions, st.timeouts, len(requeued)) == (record.REQUEUED, 5, 1, 6)
    # the second time-out is over the cap: no requeue, a clear message, the checkpoint kept
    assert after_stop(e, ctx(tmp_path, restarts=6), Outcome("preempted", 10, "USR2"), 3490) == EXIT_REQUEUE
    st = record.read_state(tmp_path / "run")
    assert st.state == record.TIMEOUT and "max_timeouts=1" in st.message and len(requeued) == 6


def test_requeue_impossible_exits_non_zero_with_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    def no_scontrol(job_id: str) -> None:
        raise slurm.CommandError("scontrol: command not found")

    monkeypatch.setattr(slurm, "requeue", no_scontrol)
    code = after_stop(entry(tmp_path), ctx(tmp_path, restarts=2), Outcome("preempted", 12, "SIGTERM"), 50)
    st = record.read_state(tmp_path / "run")
    assert code == EXIT_REQUEUE and st.state == record.FAILED and st.restarts == 2
    assert "could not be requeued" in st.message and "resubmit" in st.message
    assert "could not be requeued" in capsys.readouterr().err


def test_requeue_disabled_and_cancel(tmp_path: Path, requeued: list[str]) -> None:
    code = after_stop(entry(tmp_path, requeue=False), ctx(tmp_path), Outcome("preempted", 5, "USR2"), 3490)
    assert code == EXIT_REQUEUE and record.read_state(tmp_path / "run").state == record.FAILED and not requeued
    record.update_state(tmp_path / "run", cancel_requested=True)
    assert after_stop(entry(tmp_path), ctx(tmp_path), Outcome("preempted", 6, "SIGTERM"), 10) == 0
    assert record.read_state(tmp_path / "run").state == record.CANCELLED and not requeued


def test_only_rank_zero_decides(tmp_path: Path, requeued: list[str]) -> None:
    assert after_stop(entry(tmp_path), ctx(tmp_path, rank=1), Outcome("preempted", 5, "USR2"), 3490) == 0
    assert record.read_state(tmp_path / "run") is None and not requeued
    assert after_stop(entry(tmp_path, "local"), ctx(tmp_path), Outcome("preempted", 5, "USR2"), 30) == LOCAL_REQUEUE_CODE


def test_sigterm_stops_a_local_job_for_good(tmp_path: Path) -> None:
    assert after_stop(entry(tmp_path, "local"), ctx(tmp_path), Outcome("preempted", 5, "SIGTERM"), 30) == 0
    st = record.read_state(tmp_path / "run")
    assert st.state == record.CANCELLED and "resubmit" in st.message and st.step == 5


def test_real_scontrol_seam_reports_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(slurm.CommandError, match="command not found"):
        slurm.requeue("1_2")


def test_debug_executor_requeues_in_process(tmp_path: Path) -> None:
    outcomes = [Outcome("preempted", 3, "time_budget", 5.0), Outcome("preempted", 6, "SIGTERM", 4.0),
                Outcome("done", 9, None, 3.0)]
    seen: list[str | None] = []

    def train(cfg: object) -> Outcome:
        seen.append(os.environ.get("GPT2_RESTART_COUNT"))
        return outcomes.pop(0)

    result = run_in_process(entry(tmp_path, "debug"), train_fn=train)
    st = record.read_state(tmp_path / "run")
    assert result == {"job": "run", "status": "done", "step": 9, "loss": 3.0}
    assert seen == ["0", "1", "2"]
    assert (st.state, st.restarts, st.timeouts, st.preemptions) == (record.COMPLETED, 2, 1, 1)


@pytest.mark.parametrize("compile", [True, False])
def test_a_compiled_job_keeps_its_compile_cache_in_the_sweep_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     compile: bool) -> None:
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(var, "restored after the test")
        monkeypatch.delenv(var)
    seen: list[tuple[str | None, str | None]] = []

    def train(cfg: object) -> Outcome:
        seen.append((os.environ.get("TORCHINDUCTOR_CACHE_DIR"), os.environ.get("TRITON_CACHE_DIR")))
        return Outcome("done", 1, None, 3.0)

    job = entry(tmp_path, "debug")
    job.cfg.trainer.config.compile = compile
    run_in_process(job, train_fn=train)
    cache = tmp_path.absolute() / ".compile-cache"
    assert seen == [(str(cache / "inductor"), str(cache / "triton")) if compile else (None, None)]
    if compile:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor writes there itself
        run_in_process(job, train_fn=train)
        assert seen[-1][0] == str(cache / "inductor")
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/scratch/mine")  # a user's own choice stands
        run_in_process(job, train_fn=train)
        assert seen[-1] == ("/scratch/mine", str(cache / "triton"))


def test_a_failing_trainer_records_failed(tmp_path: Path) -> None:
    """An exception with no report: retried once to tell, then the same error at the same step
    is deterministic and the job fails with the rule and the first traceback recorded."""
    calls = []

    def train(cfg: object) -> Outcome:
        calls.append(1)
        raise RuntimeError("disk full\nmore")

    with pytest.raises(RuntimeError):
        run_in_process(entry(tmp_path, "debug"), train_fn=train)
    st = record.read_state(tmp_path / "run")
    assert len(calls) == 2 and st.state == record.FAILED and st.failures == 1 and st.restarts == 1
    assert st.last_failure["rule"] == "deterministic: same RuntimeError at step None twice"
    assert "RuntimeError: disk full" in st.message and "deterministic" in st.message
    assert st.first_failure["rule"].startswith("transient: RuntimeError at step None, not seen before (1/3)")
    assert "raise RuntimeError" in st.first_failure["traceback"]


def _train(cfg: Cfg) -> Outcome:
    """gpt2.train.run for the jobs below: the job named "bad" has bad input, the other finishes."""
    if Path(cfg.run.dir).name == "bad":
        raise UserError("dataset.train_dataset.data_root /nowhere has no shards")
    return Outcome("done", 3, final_loss=1.5)


def test_debug_executor_runs_the_next_job_after_an_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's bad input (exit 2) ends that job only: the debug executor runs the next one."""
    import gpt2.train
    from launch import executors, sweep

    monkeypatch.setattr(gpt2.train, "run", _train)  # what the job calls, in this process
    jobs = ["bad", "good"]
    entries = [JobEntry(cfg=Cfg(tmp_path / name), sweep_dir=str(tmp_path), job=name, executor="debug",
                        time_limit_s=None, signal_lead_s=60.0)  # type: ignore[arg-type]
               for name in jobs]
    done = executors.submit_debug(entries, tmp_path / "logs" / "%j")
    rec = record.SweepRecord(tmp_path)
    with rec.locked():
        rec.write([record.JobRecord(job=name, overrides=[], config_hash="h", executor="debug", job_id=s.job_id)
                   for name, s in zip(jobs, done, strict=True)])
    record.write_sweep_meta(tmp_path, {"name": "s", "executor": "debug", "cluster": "local", "resources": {}})
    sw = sweep.Sweep(tmp_path, "s", "debug", None, None, {})  # type: ignore[arg-type]
    prepared = [sweep.Prepared(name, [], None, "h", None) for name in jobs]  # type: ignore[arg-type]
    assert sweep.run_debug_jobs(sw, list(zip(prepared, done, strict=True))) == 1  # one job did not complete
    err = capsys.readouterr().err
    assert "job bad exited with code 2" in err
    assert record.read_state(tmp_path / "bad").state == record.FAILED
    assert record.read_state(tmp_path / "good").state == record.COMPLETED


# ---- the real local executor -----------------------------------------------------------------


def local_experiment(tmp_path: Path, shards: Path, max_steps: int, time_min: int = 10,
                     lead_s: int | None = None) -> Path:
    path = tmp_path / "local_e2e.yaml"
    lead = f", signal_lead_s: {lead_s}" if lead_s else ""
    path.write_text(f"""
cluster: local
executor: local
overrides:
  model: tiny
  model.config.n_layer: 2
  model.config.n_head: 2
  model.config.n_embd: 32
  model.config.block_size: 64
  dataset.seq_len: 32
  dataset.train_dataset.data_root: {shards}
  dataset.val_dataset.data_root: {shards}
  trainer.config.batch_size: 2
  trainer.config.max_steps: {max_steps}
  trainer.config.warmup_steps: 2
  trainer.config.min_lr: 1.0e-5
  trainer.config.eval_interval: 0
  trainer.config.log_interval: 1
  trainer.config.checkpoint_strategy.config.interval: 0
  wandb.mode: disabled
resources: {{nodes: 1, gpus_per_node: 0, tasks_per_node: 2, time: {time_min}{lead}}}
""")
    return path


def launch(args: list[str], runs: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUNS_DIR": str(runs), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_local_executor_runs_two_process_ddp_to_the_end(tmp_path: Path, pydoc_shards: Path) -> None:
    runs = tmp_path / "runs"
    res = launch([str(local_experiment(tmp_path, pydoc_shards, max_steps=6))], runs)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "main: final loss" in res.stdout and "COMPLETED" in res.stdout
    run = runs / "local_e2e" / "main"
    st = record.read_state(run)
    assert st.state == record.COMPLETED and st.step == 6 and st.restarts == 0
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert (run / "logs" / "rank0.log").is_file() and (run / "logs" / "rank1.log").is_file()  # two ranks
    rec = record.SweepRecord(runs / "local_e2e").read()["main"]
    assert rec.state == record.COMPLETED and rec.last_step == 6 and rec.checkpoint
    again = launch([str(local_experiment(tmp_path, pydoc_shards, max_steps=6))], runs)  # idempotent
    assert again.returncode == 0 and "not submitted again: 1 job(s) (1 COMPLETED)" in again.stdout


@pytest.mark.slow
def test_a_compiled_job_writes_its_compiled_graphs_into_the_sweep_folder(tmp_path: Path, pydoc_shards: Path) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    runs = tmp_path / "runs"
    # the launcher's environment as a shell where torch has compiled before leaves it: inductor's
    # own per-node default written in (so this test is the same alone or after other compiling tests)
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}, "RUNS_DIR": str(runs),
           "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": default_cache_dir()}
    res = subprocess.run([sys.executable, "launch/sweep.py", str(local_experiment(tmp_path, pydoc_shards, max_steps=2)),
                          "--executor", "debug", "trainer.config.compile=true"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    cache = runs / "local_e2e" / ".compile-cache" / "inductor"
    graphs = [p for p in (cache / "fxgraph").rglob("*") if p.is_file()]
    assert graphs, sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))[:20]  # where a requeue finds them


@pytest.mark.slow
def test_local_time_out_requeues_and_resumes(tmp_path: Path, pydoc_shards: Path) -> None:
    """Time limit 2 min with the warning 90 s before it: the controller sends USR2 at ~30 s, every
    rank saves, rank 0 exits with the requeue code, the controller restarts the ranks, they resume
    from the checkpoint. Then `cancel` stops the second attempt (SIGTERM, another save). The 90 s
    lead leaves room for a slow start and save on a busy machine: a save that overruns the
    limit is killed, as SLURM would."""
    runs = tmp_path / "runs"
    exp = local_experiment(tmp_path, pydoc_shards, max_steps=100_000, time_min=2, lead_s=90)
    res = launch([str(exp), "--detach"], runs, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    sweep_dir, run = runs / "local_e2e", runs / "local_e2e" / "main"
    deadline = time.time() + 300
    log = run / "logs" / "rank0.log"
    while time.time() < deadline:
        st = record.read_state(run)
        if st and st.restarts >= 1 and log.exists() and "resumed from" in log.read_text():
            break
        time.sleep(1)
    else:
        pytest.fail(f"no requeue+resume within the deadline; state {record.read_state(run)}")
    st = record.read_state(run)
    assert st.timeouts == 1 and st.preemptions == 0
    pid = record.SweepRecord(sweep_dir).read()["main"].job_id
    err = (sweep_dir / "logs" / pid / f"{pid}_0_log.err").read_text()
    assert f"timeout at step {st.step} (USR2); restart 1" in err
    first_stop = st.step
    assert launch(["cancel", str(sweep_dir)], runs).returncode == 0
    while time.time() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.5)
    final = record.read_state(run)
    assert final.state == record.CANCELLED and final.step is not None and final.step > first_stop
    steps = [m["step"] for m in metrics(run) if "loss" in m]
    assert steps[0] == 1 and first_stop + 1 in steps and steps == sorted(steps)  # resumed, not restarted
    assert steps.count(first_stop + 1) == 1


# ---- failures: the rules, the record, blame and exclusion ------------------------------------


def report(kind: str, rank: int = 1, host: str = "n2", step: int | None = 40, restart: int = 0, t: float = 100.0,
           exc_type: str | None = None, message: str = "", blamed_host: str | None = None) -> dict:
    """A failure report in the format gpt2.watchdog writes (see the contract in launch/job.py)."""
    return {"kind": kind, "rank": rank, "host": host, "restart": restart, "time": t, "step": step,
            "phase": "forward", "blamed_rank": rank, "blamed_host": blamed_host or host, "exc_type": exc_type,
            "message": message, "traceback": f"Traceback...\n{exc_type}: {message}" if exc_type else None,
            "detected_after_s": 5.0}


def write_report(run_dir: Path, rep: dict) -> None:
    folder = run_dir / "failures"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"restart{rep['restart']}-rank{rep['rank']}.json").write_text(json.dumps(rep))


@pytest.mark.parametrize(("failure", "previous", "before", "want"), [
    (report("hang"), None, 0, (True, "transient: hang (1/3)", True)),
    (report("peer_lost"), None, 1, (True, "transient: peer lost (2/3)", True)),
    (report("comm_error", exc_type="DistBackendError"), None, 0, (True, "transient: comm error (1/3)", True)),
    (report("preflight"), None, 0, (True, "transient: preflight (1/3)", True)),
    # the shared file system failed: retried, but no node is blamed for it
    (report("storage_error", exc_type="OSError"), report("storage_error", exc_type="OSError"), 1,
     (True, "transient: storage error (2/3)", False)),
    ({"kind": "node_fail"}, None, 0, (True, "transient: NODE_FAIL (1/3)", True)),
    (report("exception", exc_type="RuntimeError", message="CUDA error: uncorrectable ECC error encountered"),
     report("exception", exc_type="RuntimeError"), 0, (True, "transient: hardware error (RuntimeError) (1/3)", True)),
    (report("exception", exc_type="RuntimeError", message="CUDA error: device-side assert triggered"),
     report("exception", exc_type="RuntimeError"), 0, (False, "deterministic: same RuntimeError at step 40 twice", False)),
    (report("exception", exc_type="ValueError"), report("exception", exc_type="ValueError", step=39), 0,
     (True, "transient: ValueError at step 40, not seen before (1/3)", False)),
    (report("exception", exc_type="ValueError"), report("hang"), 2,
     (True, "transient: ValueError at step 40, not seen before (3/3)", False)),
    (report("hang"), None, 3, (False, "max_failures reached: hang (4/3)", True)),
])
def test_judge_rules(failure: dict, previous: dict | None, before: int, want: tuple[bool, str, bool]) -> None:
    v = judge(failure, previous, before, max_failures=3)
    assert (v.requeue, v.rule, v.blame) == want


def test_judge_bad_input_is_never_retried() -> None:
    v = judge(report("exception", exc_type="UserError"), None, 0, 3, bad_input=True)
    assert (v.requeue, v.rule, v.counted) == (False, "bad input", False)


def test_a_hang_requeues_on_slurm_and_a_twice_blamed_host_is_excluded(
        tmp_path: Path, requeued: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    excluded: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(slurm, "exclude_nodes", lambda jid, hosts: excluded.append((jid, list(hosts))))
    run = tmp_path / "run"
    write_report(run, report("peer_lost", rank=0, host="n1", blamed_host="n2", t=101.0))
    write_report(run, report("hang", rank=1, host="n2", t=100.0))  # earlier: the cause
    e = entry(tmp_path, max_failures=2)
    assert decide_failure(e, ctx(tmp_path), report=report("peer_lost", rank=0, host="n1", blamed_host="n2")) \
        == EXIT_FAILURE
    assert decide_failure(e, ctx(tmp_path, rank=1), report=report("hang")) == EXIT_FAILURE  # decided already
    st = record.read_state(run)
    assert (st.state, st.failures, st.restarts) == (record.REQUEUED, 1, 1) and requeued == ["77_3"]
    assert st.last_failure["kind"] == "hang" and st.last_failure["rank"] == 1 and st.last_failure["hosts"] == ["n2"]
    assert st.last_failure["rule"] == "transient: hang (1/2)" and excluded == [("77_3", [])]
    assert record.read_nodes(tmp_path)["n2"].blames[0]["event"] == "run/0"

    write_report(run, report("hang", rank=1, host="n2", restart=1))
    assert decide_failure(e, ctx(tmp_path, restarts=1), report=report("hang", restart=1)) == EXIT_FAILURE
    assert record.excluded_hosts(tmp_path) == ["n2"] and excluded[-1] == ("77_3", ["n2"])
    write_report(run, report("hang", rank=1, host="n2", restart=2))
    assert decide_failure(e, ctx(tmp_path, restarts=2), report=report("hang", restart=2)) == 1
    st = record.read_state(run)
    assert st.state == record.FAILED and st.failures == 3 and st.last_failure["rule"] == "max_failures reached: hang (3/2)"
    assert len(requeued) == 2 and st.first_failure["restart"] == 0


def test_the_ledger_excludes_after_two_blames_and_a_person_clears_it(tmp_path: Path) -> None:
    assert record.blame(tmp_path, "a/0", ["n1"], "a", "hang", "m") == []
    assert record.blame(tmp_path, "a/0", ["n1", "n2"], "a", "node_fail", "m") == []  # the same event: replaced
    assert {h: len(b.blames) for h, b in record.read_nodes(tmp_path).items()} == {"n1": 1, "n2": 1}
    assert record.blame(tmp_path, "b/3", ["n1"], "b", "hang", "m") == ["n1"]
    assert record.excluded_hosts(tmp_path) == ["n1"]
    assert record.clear_host(tmp_path, "n1") and record.excluded_hosts(tmp_path) == []
    assert not record.clear_host(tmp_path, "n9")
    (tmp_path / record.NODES).write_text("{not json")
    assert record.excluded_hosts(tmp_path) == []  # damaged: nothing excluded, nothing locked


def test_bad_input_fails_with_its_rule(tmp_path: Path) -> None:
    def train(cfg: object) -> Outcome:
        raise UserError("dataset.train_dataset.data_root /nowhere has no shards")

    with pytest.raises(SystemExit) as exc:
        run_in_process(entry(tmp_path, "debug"), train_fn=train)
    st = record.read_state(tmp_path / "run")
    assert exc.value.code == 2 and st.state == record.FAILED and st.last_failure["rule"] == "bad input"
    assert st.message == "dataset.train_dataset.data_root /nowhere has no shards" and st.failures == 0


def test_a_transient_failure_requeues_locally_and_resumes(tmp_path: Path) -> None:
    """The local executor's requeue code, in process: a communication error, then done."""
    run = tmp_path / "run"

    def train(cfg: object) -> Outcome:
        restart = int(os.environ["GPT2_RESTART_COUNT"])
        if restart == 0:
            write_report(run, report("comm_error", rank=0, host="here", exc_type="DistBackendError", t=time.time()))
            raise RuntimeError("Connection reset by peer")
        return Outcome("done", 9, None, 2.0)

    assert run_in_process(entry(tmp_path, "debug"), train_fn=train)["status"] == "done"
    st = record.read_state(run)
    assert (st.state, st.failures, st.restarts) == (record.COMPLETED, 1, 1)
    assert st.last_failure["rule"] == "transient: comm error (1/3)" and st.last_failure["hosts"] == ["here"]


def test_node_fail_counts_once_and_blames_the_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "attempts", lambda jid: [("NODE_FAIL", "n[1-2]"), ("RUNNING", "n[1-2]")])
    monkeypatch.setattr(slurm, "hostnames", lambda nl: ["n1", "n2"])
    monkeypatch.setattr(slurm, "node_state", lambda node: "IDLE")  # both back by now: both are blamed
    e = entry(tmp_path, max_failures=1)
    # a surviving rank counted the lost connection of attempt 0 already
    record.update_state(tmp_path / "run", failures=1, last_failure={"kind": "comm_error", "restart": 0, "step": 7})
    assert note_node_failure(e, ctx(tmp_path, restarts=1)) is None
    st = record.read_state(tmp_path / "run")
    assert st.failures == 1 and st.last_failure["kind"] == "node_fail" and st.last_failure["hosts"] == ["n1", "n2"]
    assert st.last_failure["rule"] == "transient: NODE_FAIL (1/1)" and st.last_failure["step"] == 7
    assert note_node_failure(e, ctx(tmp_path, restarts=1)) is None and record.read_state(tmp_path / "run").failures == 1
    # nobody noticed attempt 1's NODE_FAIL: counted now, over max_failures: the job does not train
    assert note_node_failure(e, ctx(tmp_path, restarts=2)) == 1
    st = record.read_state(tmp_path / "run")
    assert st.state == record.FAILED and st.failures == 2 and "max_failures reached: NODE_FAIL (2/1)" in st.message
    assert record.excluded_hosts(tmp_path) == ["n1", "n2"]


@pytest.mark.parametrize("states, lost, blamed", [
    ({"n1": "ALLOCATED", "n2": "DOWN+NOT_RESPONDING"}, [], ["n2"]),  # SLURM knows which one died
    ({"n1": "IDLE+DRAIN", "n2": "MIXED", "n3": "FAILING"}, [], ["n1", "n3"]),
    ({"n1": "IDLE", "n2": "IDLE"}, [], ["n1", "n2"]),  # back already: no way to tell, all of them
    ({"n1": "IDLE", "n2": "DOWN"}, ["n1"], ["n1"]),  # a surviving rank saw n1 go: its word wins
])
def test_node_fail_blames_the_nodes_slurm_has_out_of_service(
        states: dict[str, str], lost: list[str], blamed: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a rank's report, a NODE_FAIL of a multi-node attempt is blamed on the nodes SLURM
    has out of service now, not on every node of it (a healthy neighbour blamed twice is excluded)."""
    nodes = sorted(states)
    monkeypatch.setattr(slurm, "attempts", lambda jid: [("NODE_FAIL", ",".join(nodes)), ("RUNNING", "n9")])
    monkeypatch.setattr(slurm, "hostnames", lambda nl: nl.split(","))
    monkeypatch.setattr(slurm, "node_state", lambda node: states[node])
    e = entry(tmp_path, max_failures=3)
    if lost:
        (tmp_path / "run" / "failures").mkdir(parents=True, exist_ok=True)  # as gpt2.watchdog names it
        (tmp_path / "run" / "failures" / "restart0-rank0.json").write_text(json.dumps(
            {"kind": "peer_lost", "restart": 0, "rank": 0, "time": time.time(), "blamed_host": lost[0]}))
    assert note_node_failure(e, ctx(tmp_path, restarts=1)) is None
    assert record.read_state(tmp_path / "run").last_failure["hosts"] == blamed


def test_a_job_slurm_requeued_already_is_not_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NODE_FAIL: SLURM requeues the job and sends SIGTERM; the trainer saves and `scontrol requeue`
    answers "Job is pending execution": the job is requeued, not FAILED."""
    def pending(job_id: str) -> None:
        raise slurm.CommandError("scontrol requeue 9: exit 1: Job is pending execution for job 9")

    monkeypatch.setattr(slurm, "requeue", pending)
    monkeypatch.setattr(slurm, "job_state", lambda jid: "COMPLETING")  # what scontrol shows meanwhile
    code = after_stop(entry(tmp_path), ctx(tmp_path), Outcome("preempted", 26, "SIGTERM"), 50)
    st = record.read_state(tmp_path / "run")
    assert code == EXIT_REQUEUE and st.state == record.REQUEUED and st.restarts == 1


def test_reports_of_an_earlier_submission_are_not_this_attempts(tmp_path: Path, requeued: list[str]) -> None:
    write_report(tmp_path / "run", report("hang", t=100.0))  # same restart count, long before this attempt
    c = TaskContext(rank=0, world_size=2, job_id="78", restarts=0, run_dir=tmp_path / "run", started=5000.0)
    assert decide_failure(entry(tmp_path), c, report=report("peer_lost", rank=0, host="n1", t=5001.0)) == EXIT_FAILURE
    assert record.read_state(tmp_path / "run").last_failure["kind"] == "peer_lost"


def test_the_fatal_hook_requeues_from_the_watchdog_thread(tmp_path: Path, requeued: list[str]) -> None:
    """gpt2's watchdog calls the hook (decide_failure) from its own thread, where signal.signal
    raises: the SLURM requeue must happen all the same (found by `make drill --kinds stop`)."""
    import threading

    c = TaskContext(rank=0, world_size=2, job_id="79", restarts=0, run_dir=tmp_path / "run", started=5000.0)
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(
        decide_failure(entry(tmp_path), c, report=report("peer_lost", rank=0, host="n1", t=5001.0))))
    t.start()
    t.join(30)
    assert codes == [EXIT_FAILURE] and requeued == ["79"]
    assert record.read_state(tmp_path / "run").state == record.REQUEUED
