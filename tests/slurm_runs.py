"""Helpers of the end-to-end tests on the local SLURM cluster (tests/test_slurm_e2e.py): the tiny
experiment and its lengths, reading a run's records, the launcher as a user runs it, waiting for
states, and the uninterrupted references run with the local executor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from slurm_util import cancel, job_info, run

from launch import record

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
# LONG must outlast the first SLURM time-limit check after it starts (the warning comes 10-40 s
# after the start, see the time-out test): at the fastest step seen here, 41 ms with the spare core
# idle, 1200 steps are 49 s (450 were 23 s, and a CI run once finished before the warning). The
# time-out test cancels it, and its reference, a few steps after the resume, so it never runs to
# the end: more steps cost nothing. SHORT is for interruptions the test triggers itself.
LONG = {"trainer.config.max_steps": 6000, "trainer.config.checkpoint_strategy.config.interval": 400}
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
                     grid: dict[str, list[Any]] | None = None, points: list[dict[str, Any]] | None = None,
                     executor: str = "slurm") -> Path:
    exp: dict[str, Any] = {"cluster": "local", "executor": executor, "overrides": overrides,
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

    def losses_through(self, job: str, step: int, timeout: float = WAIT_S) -> dict[int, float]:
        """The losses of steps 1..`step`, once the reference has logged `step` (it may go on)."""
        wait_for_step(self.sweep, job, step, timeout)
        st = record.read_state(self.sweep / job)
        assert st is not None and st.restarts == 0, f"reference {job} was interrupted: {st}"
        return {s: loss for s, loss in losses(self.sweep / job).items() if s <= step}

    def stop(self) -> None:
        self.lc.sweep_py("cancel", str(self.sweep), ok=False)


def ref_job(point: dict[str, Any]) -> str:
    """The job name the launcher gives a `sweep.list` point of LONG or SHORT."""
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())
