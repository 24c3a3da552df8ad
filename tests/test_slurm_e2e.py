"""End to end on the local SLURM cluster, everything through `launch/sweep.py --executor slurm`.

What each test proves (issue 7):

1. a 2-job sweep runs as one array to COMPLETED; sweep record, `status`, `logs`, checkpoints and
   metrics agree, and submitting the sweep again submits nothing;
2. a 2-node job (one task per node) trains with DDP over gloo, and its per-step losses equal a
   2-process run on one machine (so the ranks really averaged their gradients);
3. a real time-out: a job with a 1-minute limit gets SLURM's USR2 while training, saves,
   requeues itself, resumes at the step it saved and finishes; per-step losses equal an
   uninterrupted local run of the same config;
4. real preemption: a job sent to the `high` partition preempts a training job, which saves
   within GraceTime, requeues, resumes at the step it saved and finishes with the same losses;
5. `cancel` stops a job for good (saved, not requeued), and `resubmit --failed` brings back a
   job killed with SIGKILL from its last periodic checkpoint, leaving the cancelled one alone;
   the steps it recomputes reproduce the losses it had logged before the kill;
6. a dead node (issue 13): n2 set DOWN under a 2-node job; SLURM requeues it (NODE_FAIL, no signal),
   `status` never says FAILED while it waits, the node comes back, the job resumes from its last
   checkpoint with the losses of an uninterrupted run, and the failure is counted and blamed;
7. exclusion: a node blamed twice is excluded from the sweep's submission (sbatch --exclude) and
   from a requeue (scontrol update ExcNodeList), and the job runs on the other node.

References run with the local executor in the background while the SLURM jobs run. Every job a
test submits is cancelled when the test ends, passed or not. OMP_NUM_THREADS=1 everywhere, so
losses can be compared bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from slurm_util import bring_back, cancel, job_info, require_slurm, run, sbatch, start_now

from launch import record

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SWEEP_PY = ROOT / "launch" / "sweep.py"

# A model small enough that a step costs ~0.1 s of one core.
TINY: dict[str, Any] = {
    "model": "tiny",
    "model.config.n_layer": 2,
    "model.config.n_embd": 64,
    "model.config.n_head": 2,
    "model.config.block_size": 64,
    "dataset.seq_len": 32,
    "trainer.config.batch_size": 2,
    "trainer.config.warmup_steps": 5,
    "trainer.config.lr": 1.0e-3,
    "trainer.config.min_lr": 1.0e-4,
    "trainer.config.eval_interval": 0,
    "trainer.config.log_interval": 1,
    "wandb.mode": "disabled",
}
# LONG must outlast the first SLURM time-limit check after it starts (see the time-out test);
# SHORT is for interruptions the test triggers itself.
LONG = {"trainer.config.max_steps": 450, "trainer.config.checkpoint_strategy.config.interval": 150}
SHORT = {"trainer.config.max_steps": 60, "trainer.config.checkpoint_strategy.config.interval": 20}
PAIR = {"trainer.config.max_steps": 10, "trainer.config.checkpoint_strategy.config.interval": 5}
DRILL = {"trainer.config.max_steps": 80, "trainer.config.checkpoint_strategy.config.interval": 20}
WAIT_S = 600.0  # per wait; generous: the machine may be shared


# ---- reading a run -----------------------------------------------------------------------------


def rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss; a row written by a later attempt supersedes an earlier one."""
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


def last_step(run_dir: Path) -> int:
    row = record.last_metrics(run_dir)
    return int(row.get("step", 0))


def rank0_log(run_dir: Path) -> str:
    path = run_dir / "logs" / "rank0.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def stops(run_dir: Path) -> list[tuple[int, str, float]]:
    """(step, reason, seconds from the request to the commit) of every stop the trainer logged."""
    out = []
    for line in rank0_log(run_dir).splitlines():
        if "| stopping at step " in line:
            msg = line.split("| stopping at step ", 1)[1]  # "12 (USR2): checkpoint committed 0.31 s after ..."
            step, rest = msg.split(" ", 1)
            secs = float(rest.split("committed ", 1)[1].split(" s", 1)[0])
            out.append((int(step), rest[1:].split(")", 1)[0], secs))
    return out


def resumes(run_dir: Path) -> list[int]:
    """The step of every `resumed from ... at step N` line."""
    return [int(line.rsplit(" at step ", 1)[1].split()[0]) for line in rank0_log(run_dir).splitlines()
            if "| resumed from " in line]


def kill_ranks(job: str) -> None:
    """SIGKILL the training processes of a running SLURM job (all on this machine).

    Not `scancel --signal=KILL`: SLURM turns that into a normal cancel (SIGTERM first), which the
    trainer answers with a save.
    """
    raw = job_info(job)["JobId"]
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and f"SLURM_JOB_ID={raw}".encode() in environ:
            os.kill(int(proc.name), signal.SIGKILL)
            killed += 1
    assert killed, f"no training process of job {job} (SLURM_JOB_ID={raw}) found"


def sacct_attempts(job_id: str) -> list[dict[str, str]]:
    """Every attempt of a job (sacct -D), oldest first; [] while accounting has not caught up."""
    out = run(["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "JobID,State,Timelimit,NodeList,NNodes"])
    keys = ("id", "state", "timelimit", "nodes", "nnodes")
    return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]


def wait_for_sacct(job_id: str, final: str, timeout: float = 60) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        attempts = sacct_attempts(job_id)
        if attempts and attempts[-1]["state"].split()[0] == final:
            return attempts
        assert time.monotonic() < deadline, f"sacct for {job_id}: {attempts}, wanted a last attempt {final}"
        time.sleep(1)


def assert_resumed_exactly(run_dir: Path, stop_step: int) -> None:
    """The attempt after a stop at `stop_step` continued from it: no step lost, none repeated."""
    assert stop_step in resumes(run_dir), f"no resume at step {stop_step}: {resumes(run_dir)}"
    train = [r for r in rows(run_dir) if "loss" in r]
    first_after = next(r for r in train if r["restart"] >= 1)
    assert first_after["step"] == stop_step + 1, f"first row after the restart: {first_after}"
    assert [r["step"] for r in train] == list(range(1, len(train) + 1)), "a step was lost or repeated"


# ---- the launcher, as a user runs it -------------------------------------------------------------


def write_experiment(path: Path, overrides: dict[str, Any], resources: dict[str, Any],
                     grid: dict[str, list[Any]] | None = None, points: list[dict[str, Any]] | None = None) -> Path:
    exp: dict[str, Any] = {"cluster": "local", "executor": "slurm", "overrides": overrides,
                           "resources": {"time": 20, **resources}}
    sweep = {k: v for k, v in (("grid", grid), ("list", points)) if v}
    if sweep:
        exp["sweep"] = sweep
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


@dataclass
class Launcher:
    """`launch/sweep.py` in a subprocess with RUNS_DIR pointing at this test's directory."""

    root: Path
    data: Path
    extra_ids: list[str] = field(default_factory=list)  # jobs submitted outside the launcher

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "RUNS_DIR": str(self.root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}

    def overrides(self, *parts: dict[str, Any]) -> dict[str, Any]:
        data = {"dataset.train_dataset.data_root": str(self.data), "dataset.val_dataset.data_root": str(self.data)}
        out = {**TINY, **data}
        for p in parts:
            out.update(p)
        return out

    def sweep_py(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, str(SWEEP_PY), *args], cwd=ROOT, env=self.env, text=True,
                              capture_output=True, timeout=300)
        if ok:
            assert proc.returncode == 0, f"sweep.py {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def submit(self, experiment: Path, *args: str) -> Path:
        self.sweep_py(str(experiment), *args)
        return self.root / experiment.stem

    def status(self, sweep: Path) -> dict[str, dict[str, Any]]:
        out = self.sweep_py("status", str(sweep), "--json").stdout
        return {r["job"]: r for r in map(json.loads, out.splitlines())}

    def cleanup(self, timeout: float = 90) -> None:
        """Stop every SLURM job this launcher started, for good.

        A plain scancel is not enough: the trainer takes its SIGTERM for a preemption and the job
        requeues itself. `sweep.py cancel` marks the runs first; whatever still comes back to the
        queue is cancelled again while it waits there.
        """
        ids = list(self.extra_ids)
        for rec_file in self.root.glob(f"*/{record.RECORD}"):
            self.sweep_py("cancel", str(rec_file.parent), ok=False)
            ids += [r.job_id for r in record.SweepRecord(rec_file.parent).read().values()
                    if r.executor == "slurm" and r.job_id]
        deadline = time.monotonic() + timeout
        while ids and time.monotonic() < deadline:
            cancel(ids)
            time.sleep(2)
            queued = run(["squeue", "-h", "-r", "-o", "%i"]).split()
            ids = [i for i in ids if i in queued]


def job_id(sweep: Path, job: str) -> str:
    rec = record.SweepRecord(sweep).read()[job]
    assert rec.job_id, f"{job} of {sweep} has no job id"
    return rec.job_id


def diagnostics(sweep: Path, job: str) -> str:
    """The tails of a job's logs, for failure messages."""
    rec = record.SweepRecord(sweep).read().get(job)
    parts = [f"state.json: {record.read_state(sweep / job)}", f"rank0.log:\n{rank0_log(sweep / job)[-2500:]}"]
    if rec and rec.job_id:
        for f in sorted((sweep / "logs" / rec.job_id).glob("*_log.err")):
            parts.append(f"{f.name}:\n{f.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts)


def wait_for_run(sweep: Path, job: str, states: set[str], timeout: float = WAIT_S) -> record.RunState:
    """Poll the run's state.json (written by the job itself) until it is in `states`."""
    deadline = time.monotonic() + timeout
    while True:
        st = record.read_state(sweep / job)
        if st is not None and st.state in states:
            return st
        if st is not None and st.state in record.FINAL:
            pytest.fail(f"{job} ended {st.state}, wanted {sorted(states)}\n{diagnostics(sweep, job)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{job} still {st.state if st else 'absent'} after {timeout:.0f} s\n{diagnostics(sweep, job)}")
        time.sleep(0.5)


def wait_for_step(sweep: Path, job: str, step: int, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while last_step(sweep / job) < step:
        st = record.read_state(sweep / job)
        if st is not None and st.state in record.FINAL:
            pytest.fail(f"{job} ended {st.state} before step {step}\n{diagnostics(sweep, job)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{job} not at step {step} after {timeout:.0f} s\n{diagnostics(sweep, job)}")
        time.sleep(0.2)


def wait_for_requeue(job: str, timeout: float = 120) -> dict[str, str]:
    """Wait until SLURM holds the job back after a requeue (PENDING, reason BeginTime)."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            return info
        assert info.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), \
            f"job {job} ended {info.get('JobState')} instead of being requeued"
        assert time.monotonic() < deadline, f"job {job} not requeued after {timeout:.0f} s: {info.get('JobState')}"
        time.sleep(0.3)


def wait_for_status(lc: Launcher, sweep: Path, job: str, state: str, timeout: float = 60) -> dict[str, Any]:
    """Poll `sweep.py status --json` (a second each) until `job` shows `state`; all records."""
    deadline = time.monotonic() + timeout
    while (records := lc.status(sweep))[job]["state"] != state:
        assert time.monotonic() < deadline, f"status still says {records[job]['state']} for {job}, wanted {state}"
        time.sleep(2)
    return records


@pytest.fixture(scope="module")
def data(pydoc_shards: Path) -> Path:
    require_slurm()
    return pydoc_shards


@pytest.fixture
def launcher(tmp_path: Path, data: Path) -> Iterator[Launcher]:
    """A runs root for this test; every SLURM job found in its sweep records is cancelled afterwards."""
    lc = Launcher(tmp_path / "runs", data)
    try:
        yield lc
    finally:
        lc.cleanup()


# ---- uninterrupted references, with the local executor ----------------------------------------


class LocalReference:
    """A sweep run with `--executor local --detach`; `losses(job)` waits for it to complete."""

    def __init__(self, lc: Launcher, experiment: Path):
        self.lc = lc
        self.sweep = lc.submit(experiment, "--executor", "local", "--detach")

    def losses(self, job: str, timeout: float = WAIT_S) -> dict[int, float]:
        wait_for_run(self.sweep, job, {record.COMPLETED}, timeout)
        st = record.read_state(self.sweep / job)
        assert st is not None and st.restarts == 0, f"reference {job} was interrupted: {st}"
        return losses(self.sweep / job)

    def stop(self) -> None:
        self.lc.sweep_py("cancel", str(self.sweep), ok=False)


def _reference(tmp_path_factory: pytest.TempPathFactory, data: Path, name: str, overrides: dict[str, Any],
               resources: dict[str, Any], points: list[dict[str, Any]] | None = None) -> Iterator[LocalReference]:
    tmp = tmp_path_factory.mktemp(name)
    lc = Launcher(tmp / "runs", data)
    ref = LocalReference(lc, write_experiment(tmp / f"{name}.yaml", lc.overrides(overrides), resources, points=points))
    try:
        yield ref
    finally:
        ref.stop()


@pytest.fixture(scope="module")
def reference_w1(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[LocalReference]:
    """World size 1, jobs LONG and SHORT (named by `ref_job`). Started on first use, it trains on
    the spare core while the SLURM test that asked for it waits on the cluster."""
    yield from _reference(tmp_path_factory, data, "ref-w1", {}, {"tasks_per_node": 1}, points=[LONG, SHORT])


@pytest.fixture(scope="module")
def reference_w2(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[LocalReference]:
    """World size 2 (two processes on this machine), job "main" with PAIR."""
    yield from _reference(tmp_path_factory, data, "ref-w2", PAIR, {"tasks_per_node": 2})


@pytest.fixture(scope="module")
def reference_w2_drill(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[LocalReference]:
    """World size 2, job "main" with DRILL: the node-failure drill's uninterrupted twin."""
    yield from _reference(tmp_path_factory, data, "ref-w2-drill", DRILL, {"tasks_per_node": 2})


def ref_job(point: dict[str, Any]) -> str:
    """The job name the launcher gives a `sweep.list` point of LONG or SHORT."""
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())


# ---- 1. a sweep ----------------------------------------------------------------------------------


def test_two_job_sweep_completes_and_is_recorded(launcher: Launcher, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "pair_sweep.yaml", launcher.overrides(PAIR), {"tasks_per_node": 1},
                           grid={"trainer.config.lr": [1.0e-3, 2.0e-3]})
    sweep = launcher.submit(exp)
    names = ["lr=0.001", "lr=0.002"]
    ids = [job_id(sweep, n) for n in names]
    assert len({i.split("_")[0] for i in ids}) == 1, f"not one array: {ids}"
    for name in names:
        wait_for_run(sweep, name, {record.COMPLETED})

    status = launcher.status(sweep)
    table = launcher.sweep_py("status", str(sweep)).stdout
    assert "2 COMPLETED" in table.splitlines()[0], table
    recs = record.SweepRecord(sweep).read()
    for name in names:
        assert status[name]["state"] == recs[name].state == record.COMPLETED
        assert status[name]["last_step"] == 10 and status[name]["restarts"] == 0
        assert status[name]["checkpoint"] == "step_00000010"
        run_dir = sweep / name
        assert sorted(losses(run_dir)) == list(range(1, 11))
        assert (run_dir / "checkpoints" / "step_00000010" / "MANIFEST.json").is_file()
        assert (run_dir / "checkpoints" / "step_00000005" / "MANIFEST.json").is_file()
        assert (run_dir / "config.yaml").is_file()
    assert losses(sweep / names[0]) != losses(sweep / names[1])  # the axis reached the trainer
    for i in ids:
        assert wait_for_sacct(i, "COMPLETED")[-1]["id"] == i

    assert "done at step 10" in launcher.sweep_py("logs", str(sweep), "0", "--err", "-n", "0").stdout
    again = launcher.sweep_py(str(exp)).stdout
    assert "nothing to submit" in again and "2 COMPLETED" in again, again
    assert all(r.submissions == 1 for r in record.SweepRecord(sweep).read().values())


# ---- 2. two nodes ----------------------------------------------------------------------------


def test_two_node_job_trains_ddp_over_gloo(launcher: Launcher, tmp_path: Path,
                                           reference_w2: LocalReference) -> None:
    exp = write_experiment(tmp_path / "two_nodes.yaml", launcher.overrides(PAIR),
                           {"nodes": 2, "tasks_per_node": 1})
    sweep = launcher.submit(exp)
    jid = job_id(sweep, "main")
    wait_for_run(sweep, "main", {record.COMPLETED})

    attempt = wait_for_sacct(jid, "COMPLETED")[-1]
    assert attempt["nnodes"] == "2" and attempt["nodes"] == "n[1-2]", attempt
    run_dir = sweep / "main"
    manifest = json.loads((run_dir / "checkpoints" / "step_00000010" / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 2 and manifest["backend"] == "ddp"
    assert (run_dir / "logs" / "rank1.log").is_file()
    assert sorted(p.name for p in (sweep / "logs" / jid).glob("*_log.out")) == [f"{jid}_0_log.out", f"{jid}_1_log.out"]
    assert "world 2" in rank0_log(run_dir)
    # Two ranks that did not average gradients would drift apart from a real 2-process run.
    assert losses(run_dir) == reference_w2.losses("main")


# ---- 3. time-out --------------------------------------------------------------------------------


def test_time_out_saves_requeues_and_resumes_exactly(launcher: Launcher, tmp_path: Path,
                                                     reference_w1: LocalReference) -> None:
    """`--time=1` and USR2 20 s before the limit. slurmctld checks time limits every 30 s and sends
    the warning up to 30 s early, so it arrives 10-40 s after the start: LONG still trains then.

    Once a stop during training has been seen, the requeued job gets a longer limit, so the rest
    of the run is one more attempt instead of one per minute (that part is not under test).
    """
    exp = write_experiment(tmp_path / "timeout.yaml", launcher.overrides(LONG),
                           {"tasks_per_node": 1, "time": 1, "signal_lead_s": 20, "max_timeouts": 5})
    sweep = launcher.submit(exp)
    run_dir = sweep / "main"
    jid = job_id(sweep, "main")
    assert job_info(jid).get("TimeLimit") == "00:01:00"

    deadline = time.monotonic() + WAIT_S
    while True:  # each requeue: release it; after a stop in training, also lift the limit
        st = record.read_state(run_dir)
        if st is not None and st.state in record.FINAL:
            pytest.fail(f"ended {st.state} before a time-out stopped training: raise LONG's max_steps\n"
                        f"{diagnostics(sweep, 'main')}")
        info = job_info(jid)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            trained = bool(stops(run_dir))
            start_now(jid, *(["TimeLimit=10"] if trained else []))
            if trained:
                break
        assert time.monotonic() < deadline, f"no time-out after {WAIT_S:.0f} s\n{diagnostics(sweep, 'main')}"
        time.sleep(0.3)
    wait_for_run(sweep, "main", {record.COMPLETED})

    stop_step, reason, save_s = stops(run_dir)[0]
    assert reason == "USR2" and save_s < 20, stops(run_dir)  # saved well before SLURM's kill
    assert f"checkpoint step_{stop_step:08d} committed" in rank0_log(run_dir)
    assert_resumed_exactly(run_dir, stop_step)
    st = record.read_state(run_dir)
    assert st is not None and st.restarts >= 1 and st.timeouts + st.preemptions == st.restarts, st
    rec = launcher.status(sweep)["main"]
    assert rec["state"] == record.COMPLETED and rec["restarts"] == st.restarts and rec["last_step"] == 450
    attempts = wait_for_sacct(jid, "COMPLETED")
    assert len(attempts) >= 2 and attempts[0]["state"] == "REQUEUED" and attempts[0]["timelimit"] == "00:01:00", attempts
    assert losses(run_dir) == reference_w1.losses(ref_job(LONG))


# ---- 4. preemption ------------------------------------------------------------------------------


def test_preemption_saves_within_grace_time_and_resumes_exactly(launcher: Launcher, tmp_path: Path,
                                                                reference_w1: LocalReference) -> None:
    """The training job holds all 4 CPUs of its node, so a 1-CPU job in `high` on that node can
    only start by preempting it (and nothing else)."""
    exp = write_experiment(tmp_path / "preempt.yaml", launcher.overrides(SHORT),
                           {"tasks_per_node": 1, "cpus_per_task": 4})
    sweep = launcher.submit(exp)
    run_dir = sweep / "main"
    jid = job_id(sweep, "main")
    wait_for_step(sweep, "main", 5)
    node = job_info(jid)["NodeList"]
    blocker = sbatch(["-p", "high", "-w", node, "-n1", "--mem=64M", "--time=1", "--job-name=e2e-blocker",
                      "--output=/dev/null"], script="#!/bin/bash\nsleep 3\n", cwd=tmp_path)
    launcher.extra_ids.append(blocker)

    wait_for_requeue(jid)
    st = record.read_state(run_dir)
    assert st is not None and st.state == record.REQUEUED and st.preemptions == 1 and st.timeouts == 0, st
    rec = launcher.status(sweep)["main"]
    assert (rec["state"], rec["restarts"]) == (record.REQUEUED, 1), rec  # what a user sees while it waits
    start_now(jid)
    wait_for_run(sweep, "main", {record.COMPLETED})

    [(stop_step, reason, save_s)] = stops(run_dir)
    assert reason == "USR2" and save_s < 20, (reason, save_s)  # GraceTime=20 before SIGTERM
    assert_resumed_exactly(run_dir, stop_step)
    assert launcher.status(sweep)["main"]["state"] == record.COMPLETED
    attempts = wait_for_sacct(jid, "COMPLETED")
    assert attempts[0]["state"] in ("PREEMPTED", "REQUEUED"), attempts
    assert wait_for_sacct(blocker, "COMPLETED")[-1]["nodes"] == node
    assert losses(run_dir) == reference_w1.losses(ref_job(SHORT))


# ---- 5. cancel and resubmit --------------------------------------------------------------------


def test_cancel_then_resubmit_failed(launcher: Launcher, tmp_path: Path,
                                     reference_w1: LocalReference) -> None:
    exp = write_experiment(tmp_path / "ops.yaml", launcher.overrides(SHORT), {"tasks_per_node": 1},
                           grid={"trainer.config.lr": [1.0e-3, 2.0e-3]})
    sweep = launcher.submit(exp)
    killed, cancelled = "lr=0.001", "lr=0.002"  # `killed` has SHORT's exact config
    kid, cid = job_id(sweep, killed), job_id(sweep, cancelled)
    wait_for_step(sweep, killed, 25)  # past the checkpoint at step 20
    wait_for_step(sweep, cancelled, 3)

    out = launcher.sweep_py("cancel", str(sweep), cancelled).stdout
    assert f"cancelled 1 job(s) of {sweep}: {cancelled}" in out, out
    kill_ranks(kid)  # no save, no requeue: like the OOM killer or a node failure
    wait_for_sacct(kid, "FAILED")
    wait_for_sacct(cid, "CANCELLED")
    killed_at = last_step(sweep / killed)
    ckpt = record.latest_checkpoint(sweep / killed / "checkpoints")
    assert ckpt is not None
    ckpt_step = int(ckpt.split("_")[1])

    status = wait_for_status(launcher, sweep, killed, record.FAILED)  # SLURM lists it COMPLETING for a moment
    assert status[cancelled]["state"] == record.CANCELLED, status
    # cancel let the job save (SIGTERM) and did not requeue it
    [(c_step, c_reason, _)] = stops(sweep / cancelled)
    assert c_reason == "SIGTERM" and record.latest_checkpoint(sweep / cancelled / "checkpoints") == f"step_{c_step:08d}"
    assert len(sacct_attempts(cid)) == 1

    out = launcher.sweep_py("resubmit", str(sweep), "--failed").stdout
    assert "submitted 1 job(s)" in out and "not submitted again: 1 job(s) (1 CANCELLED)" in out, out
    wait_for_run(sweep, killed, {record.COMPLETED})
    records = record.SweepRecord(sweep).read()
    assert records[killed].submissions == 2 and records[killed].job_id != kid
    assert records[cancelled].submissions == 1 and records[cancelled].job_id == cid
    assert launcher.status(sweep)[cancelled]["state"] == record.CANCELLED

    assert resumes(sweep / killed) == [ckpt_step]
    # one row per step (gpt2/metrics_file.py): the steps after the checkpoint that the kill threw
    # away were trained again and replaced; a "discarded" row says which
    train = [r for r in rows(sweep / killed) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 61))
    discarded = [r["steps"] for r in rows(sweep / killed) if r.get("event") == "discarded"]
    assert discarded == ([[ckpt_step + 1, killed_at]] if killed_at > ckpt_step else []), discarded
    assert losses(sweep / killed) == reference_w1.losses(ref_job(SHORT))


# ---- 6. a dead node ------------------------------------------------------------------------------


def test_dead_node_is_requeued_by_slurm_never_shown_failed_and_resumes(
        launcher: Launcher, tmp_path: Path, reference_w2_drill: LocalReference) -> None:
    exp = write_experiment(tmp_path / "drill.yaml", launcher.overrides(DRILL), {"nodes": 2, "tasks_per_node": 1})
    sweep = launcher.submit(exp)
    run_dir = sweep / "main"
    jid = job_id(sweep, "main")
    wait_for_step(sweep, "main", 25)  # past the checkpoint at step 20
    try:
        run(["scontrol", "update", "nodename=n2", "state=down", "reason=drill"])
        deadline = time.monotonic() + 120
        while job_info(jid).get("JobState") != "PENDING":
            assert time.monotonic() < deadline, f"not requeued: {job_info(jid)}\n{diagnostics(sweep, 'main')}"
            time.sleep(0.3)
        for _ in range(3):  # the survivor's lost connection must never make it FAILED while it waits
            rec = launcher.status(sweep)["main"]
            assert rec["state"] == record.REQUEUED, f"{rec}\n{diagnostics(sweep, 'main')}"
            time.sleep(1)
    finally:
        bring_back("n2")
    deadline = time.monotonic() + WAIT_S
    while (info := job_info(jid)).get("JobState") == "PENDING":
        if info.get("Reason") == "BeginTime":
            start_now(jid)
        assert time.monotonic() < deadline, f"never started again: {info}"
        time.sleep(0.5)
    wait_for_run(sweep, "main", {record.COMPLETED})

    attempts = wait_for_sacct(jid, "COMPLETED")
    assert attempts[0]["state"] == "NODE_FAIL" and attempts[-1]["nnodes"] == "2", attempts
    # from the newest commit: the periodic one at step 20, or the save SLURM's SIGTERM asked for
    [resumed] = resumes(run_dir)
    assert resumed >= 20 and f"checkpoint step_{resumed:08d} committed" in rank0_log(run_dir), resumed
    st = record.read_state(run_dir)
    assert st is not None and st.failures == 1 and st.restarts >= 1, st
    assert st.last_failure["kind"] == "node_fail" and "n2" in st.last_failure["hosts"], st.last_failure
    assert st.last_failure["rule"] == "transient: NODE_FAIL (1/3)"
    assert "n2" in record.read_nodes(sweep) and record.excluded_hosts(sweep) == []
    rec = launcher.status(sweep)["main"]
    assert rec["state"] == record.COMPLETED and rec["failures"] == 1 and "NODE_FAIL" in rec["failure"]
    assert losses(run_dir) == reference_w2_drill.losses("main")


# ---- 7. exclusion of a twice-blamed node ------------------------------------------------------------


def test_twice_blamed_node_is_excluded_from_submission_and_requeue(
        launcher: Launcher, tmp_path: Path, reference_w1: LocalReference) -> None:
    """The blames are written into the sweep's ledger as two failures would; the exclusion itself
    goes through the real sbatch (a new submission) and scontrol (a requeue)."""
    exp = write_experiment(tmp_path / "exclude.yaml", launcher.overrides(SHORT), {"tasks_per_node": 1})
    sweep = launcher.root / "exclude"
    for event in ("a/0", "b/0"):
        record.blame(sweep, event, ["n1"], event[0], "hang", "hang on rank 0 on n1")
    launcher.submit(exp)
    jid = job_id(sweep, "main")
    assert job_info(jid).get("ExcNodeList") == "n1"
    wait_for_step(sweep, "main", 3)
    assert job_info(jid)["NodeList"] == "n2"

    launcher.sweep_py("nodes", str(sweep), "--clear", "n1")
    for event in ("c/0", "d/0"):
        record.blame(sweep, event, ["n2"], event[0], "peer_lost", "peer lost on n2")
    assert "n2" in launcher.sweep_py("nodes", str(sweep)).stdout
    run(["scancel", "--signal=USR2", jid])  # early in the limit: a preemption, requeued by the job
    wait_for_requeue(jid)
    deadline = time.monotonic() + 30  # the job updates ExcNodeList right after its requeue
    while (info := job_info(jid)).get("ExcNodeList") != "n2":
        assert time.monotonic() < deadline, f"{info.get('ExcNodeList')}\n{diagnostics(sweep, 'main')}"
        time.sleep(0.3)
    start_now(jid)
    wait_for_run(sweep, "main", {record.COMPLETED})

    attempts = wait_for_sacct(jid, "COMPLETED")
    assert attempts[0]["nodes"] == "n2" and attempts[-1]["nodes"] == "n1", attempts
    assert losses(sweep / "main") == reference_w1.losses(ref_job(SHORT))
