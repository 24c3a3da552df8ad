"""Requeue drill: interrupt a real SLURM run K times and check that it resumes step for step.

    python launch/drill.py jobs/X.yaml [key=value ...] [-k 3] [--seed 0]
                           [--kinds usr2,preempt,stop,kill,raise,node]
                           [--atol 0] [--min-gap 10] [--name NAME] [--reference SWEEP_DIR]
                           [--high-partition P] [--blocker-args "..."] [--no-release] [--timeout 3600]
                           [--executor slurm|local] [--storm [--every 20]]
    make drill EXP=X ARGS="..."

`--storm` replaces the planned interruptions by a preemption storm: a usr2 every `--every` steps
(seeded jitter of a quarter of it), as on a cluster that preempts a job every minute or so. The
same table follows, then the goodput of the drilled run and of the reference (launch/goodput.py)
and where each attempt's start-up went. `--executor local` runs both on the local executor
instead of SLURM (usr2 then goes to rank 0's process; stop, kill and raise work too).

1. The experiment (one job: pin sweep axes with overrides) runs once, uninterrupted, through
   `launch/sweep.py --executor slurm`: the reference (`--reference SWEEP_DIR` reuses one).
2. It is submitted again (with `resources.max_failures` raised to the number of planned failures
   when it is lower and not given) and interrupted K times at random steps (seeded), each by one of
   - usr2: `scancel --signal=USR2`, what SLURM sends before a time limit;
   - preempt: a job in a higher-priority partition (`sbatch -p <high> -w <its nodes> --exclusive`)
     that makes SLURM preempt it; on a cluster without one, usr2 only;
   and, without warning (the failures: gpt2/watchdog.py notices, launch/job.py judges and requeues,
   the run resumes from its last committed checkpoint and trains the steps since again):
   - stop: SIGSTOP to the last rank (a hung process); kill: SIGKILL to it (a crash). The pid comes
     from the rank's progress record (`<run>/progress/rank<K>.json`), which must be of a process
     of this machine: the local cluster, whose nodes all run here. Both need a job of 2 ranks
     (`resources.tasks_per_node=2`): a lone rank has no peer to notice;
   - raise: a RuntimeError in the last rank at the start of its step, through the fault knob
     `GPT2_FAULT=raise@<step>:<rank>/<restart>` in the drilled submission's environment (sbatch
     exports the submitter's environment; `/<restart>` makes only that attempt raise); one per drill;
   - node: the job's (last) node set DOWN (`scontrol update nodename=X state=down`): SLURM ends the
     attempt with NODE_FAIL and requeues it, the next attempt notes the failure; the node is
     resumed as soon as the job is back in the queue (on a 1-node job of the local cluster the
     next attempt runs on the other node).
   The first interruptions aim at a checkpoint write (the signal goes out when the
   `step_N.tmp/` directory of a periodic save appears; usr2, which arrives at once) and at an
   evaluation (it goes out as the step before an eval step is logged; preempt), the rest at plain
   training steps. After each stop the drill reads what happened (the step saved, how long the
   save took, where the request really landed), lets the requeued job start at once
   (`scontrol update StartTime=now`) and waits until it has resumed.
3. It compares the per-step train losses (and val losses) with the reference and prints a table:
   for each interruption where it landed, the seconds from the injection to its detection (the
   first failure report; polite kinds and node: the requeue), what detected it and whom it blamed,
   the rule that requeued it (state.json's recorded failure; polite kinds: timeout or preemption)
   and the step it resumed from. Steps a failure makes the run train again must match too.

This file is the driver: it submits, watches, signals and waits, and decides only from structured
records (state.json, metrics.jsonl, checkpoint MANIFEST.json, the sweep manifest, `scontrol`
fields), never from log lines. Every SLURM command goes through launch/slurm.py; planning,
reading the records, comparing and the report are pure and live in launch/drill_plan.py.

Exit codes: 0 the runs agree; 1 a mismatch, a resume at the wrong step, or a run that failed;
2 bad input. Every step is logged for the comparison (trainer.config.log_interval=1 is added).
Losses must match exactly by default (`--atol 0`): that holds on CPU with a fixed thread count;
on GPUs whose kernels are not bitwise reproducible, pass a tolerance.

The preempting job asks for whole nodes: on a shared cluster it also preempts other jobs of the
low partition on them (give the drilled job whole nodes, or use `--kinds usr2`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2.config import fixed_interval
from gpt2.errors import EXIT_USER_ERROR, UserError
from gpt2.watchdog import first_failure, pid_namespace, read_progress
from launch import drill_plan as dp
from launch import executors, goodput, record, slurm
from launch.experiment import ROOT, Composer, load_experiment, runs_root

EXIT_MISMATCH = 1
# A job released (StartTime=now) within the second SLURM requeued it can be started with a
# credential of that same second, which the node still holds as revoked: "Killing non-startable
# batch job: Job credential revoked", and the job ends FAILED. Seen after a failure's requeue.
RELEASE_AFTER_S = 2.0
SLURM_CHECK_S = 2.0  # how often the waits ask scontrol whether SLURM ended the job behind our back


class DrillError(RuntimeError):
    """A run failed or did not do what the drill waited for; str() says which log to read."""


@dataclass
class Run:
    """One submitted sweep of one job, read through its records."""

    sweep: Path
    job: str
    job_id: str
    run_dir: Path
    ckpt_root: Path

    @classmethod
    def of(cls, sweep: Path) -> Run:
        records = list(record.SweepRecord(sweep).read().values())
        if len(records) != 1 or not records[0].job_id:
            raise DrillError(f"{sweep} should hold one submitted job, it holds {len(records)}")
        rec = records[0]
        run_dir = sweep / rec.job
        return cls(sweep, rec.job, rec.job_id, run_dir, Path(rec.checkpoint_dir or run_dir / "checkpoints"))

    def state(self) -> record.RunState:
        return record.read_state(self.run_dir) or record.RunState()

    def rows(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        return dp.parse_rows(path.read_text()) if path.is_file() else []

    def rows_all(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl, events (an attempt's start and end) included."""
        return goodput.read_rows(self.run_dir / "metrics.jsonl")

    def last_step(self) -> int:
        return int(record.last_metrics(self.run_dir).get("step", 0))

    def saving(self, step: int) -> bool:
        """Whether the checkpoint of `step` is being written (its uncommitted `step_N.tmp/`)."""
        return (self.ckpt_root / f"step_{step:08d}.tmp").exists()

    def checkpoint_manifest(self, step: int) -> dict[str, Any] | None:
        try:
            return json.loads((self.ckpt_root / f"step_{step:08d}" / dp.CHECKPOINT_MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def progress(self, rank: int) -> dict[str, Any] | None:
        """The rank's progress record (gpt2/watchdog.py: pid, host, restart, step, phase)."""
        return read_progress(self.run_dir).get(rank)

    def where(self) -> str:
        return f"see `python launch/sweep.py logs {self.sweep} {self.job} --err` and {self.run_dir}/logs/rank0.log"


@dataclass
class Drill:
    experiment: str
    overrides: list[str]
    name: str
    high: str | None
    ckpt_interval: int
    eval_interval: int
    timeout_s: float = 3600.0
    release: bool = True
    blocker_args: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    downed: list[str] = field(default_factory=list)  # nodes the drill set DOWN, resumed on the way out
    out: Callable[[str], None] = print

    @staticmethod
    def finished(run: Run, st: record.RunState) -> bool:
        """While waiting for a stop: True if the run completed instead; DrillError if it ended otherwise."""
        if st.state in record.FINAL and st.state != record.COMPLETED:
            raise DrillError(f"{run.sweep} ended {st.state} after an interruption ({st.message}): {run.where()}")
        return st.state == record.COMPLETED

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    # -- submission and waiting --
    executor = "slurm"

    def submit(self, sweep_name: str, fault: str | None = None) -> Run:
        """Submit through launch/sweep.py; `fault`: GPT2_FAULT for the job (sbatch exports the
        submitter's environment), else none at all."""
        cmd = [sys.executable, str(ROOT / "launch" / "sweep.py"), self.experiment, *self.overrides,
               "--executor", self.executor, "--name", sweep_name, "--detach"]
        env = {k: v for k, v in os.environ.items() if k != "GPT2_FAULT"} | ({"GPT2_FAULT": fault} if fault else {})
        proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise DrillError(f"submission failed ({' '.join(map(shlex.quote, cmd[1:]))}):\n{proc.stdout}{proc.stderr}")
        run = Run.of(runs_root() / sweep_name)
        self.out(f"submitted {run.sweep} (job {run.job_id})")
        return run

    def ended_behind_our_back(self, run: Run, st: record.RunState) -> None:
        """DrillError when SLURM ended the job while state.json says it is not over (a start that
        failed before the job entry ran, a requeue that never reached SLURM)."""
        job = slurm.show_job(run.job_id)
        if st.state not in record.FINAL and job.get("JobState") in dp.ENDED_STATES:
            time.sleep(SLURM_CHECK_S)  # the job entry may be writing its final state right now
            st = run.state()
            if st.state not in record.FINAL:
                raise DrillError(f"SLURM ended job {run.job_id} {job.get('JobState')} (reason {job.get('Reason')}) "
                                 f"while state.json says {st.state}: {run.where()} and the SLURM controller's log")

    def wait_done(self, run: Run) -> None:
        end = self.deadline()
        checked = time.monotonic()
        while True:
            st = run.state()
            if st.state == record.COMPLETED:
                return
            if st.state in record.FINAL:
                raise DrillError(f"{run.sweep} ended {st.state} ({st.message}): {run.where()}")
            if time.monotonic() - checked > SLURM_CHECK_S:
                checked = time.monotonic()
                self.ended_behind_our_back(run, st)
            if self.release and dp.waits_for_begin_time(slurm.show_job(run.job_id)):
                slurm.release(run.job_id)  # a requeue nobody planned (the time limit?): no waiting
            if time.monotonic() > end:
                raise DrillError(f"{run.sweep} not done after {self.timeout_s:.0f} s: {run.where()}")
            time.sleep(0.5)

    def wait_running(self, run: Run, restarts: int) -> None:
        """Until the job runs an attempt after `restarts` stops and has trained a step in it."""
        end = self.deadline()
        checked = time.monotonic()
        while not dp.is_training(st := run.state(), run.rows(), restarts):
            if st.state in record.FINAL:
                raise DrillError(f"{run.sweep} ended {st.state} while the drill waited: {run.where()}")
            if time.monotonic() - checked > SLURM_CHECK_S:
                checked = time.monotonic()
                self.ended_behind_our_back(run, st)
            if time.monotonic() > end:
                raise DrillError(f"{run.sweep} did not start training: {run.where()}")
            time.sleep(0.2)

    # -- one interruption --
    def fire(self, run: Run, it: dp.Interruption) -> bool:
        """Wait for the aimed moment and send the signal; False when the run finished first. A
        raise is in the job already (GPT2_FAULT): nothing to send."""
        if it.kind == "raise":
            return True
        end = self.deadline()
        checked = 0.0
        while not dp.ready(it, run.last_step(), it.aim == "checkpoint" and run.saving(it.target)):
            if time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                if run.state().state in record.FINAL:
                    return False
            if time.monotonic() > end:
                raise DrillError(f"{run.sweep} did not reach step {it.target}: {run.where()}")
            time.sleep(0.005)
        it.fired_step = run.last_step()
        it.injected = time.time()
        if it.kind == "usr2":
            slurm.signal_job(run.job_id, "USR2")
        elif it.kind in dp.PEER_KINDS:
            assert it.rank is not None
            job = slurm.show_job(run.job_id)
            hosts = {socket.gethostname(), *slurm.hostnames(job.get("NodeList", ""))}
            pid, why = dp.signal_pid(run.progress(it.rank), hosts, run.state().restarts, pid_namespace())
            if pid is None:
                raise DrillError(f"cannot {it.kind} rank {it.rank}: {why}")
            it.injected = time.time()
            os.kill(pid, signal.SIGSTOP if it.kind == "stop" else signal.SIGKILL)
        elif it.kind == "node":
            nodes = slurm.hostnames(slurm.show_job(run.job_id).get("NodeList", ""))
            it.node = nodes[-1]
            it.injected = time.time()
            slurm.set_node_state(it.node, "DOWN", "drill")
            self.downed.append(it.node)
        else:
            assert self.high is not None
            job = slurm.show_job(run.job_id)
            self.blockers.append(slurm.submit_blocker(self.high, job["NodeList"], job["NumNodes"],
                                                      f"{self.name}-blocker", self.blocker_args))
        return True

    def wait_stop(self, run: Run, restarts_before: int, kind: str = "usr2") -> record.RunState | None:
        """The REQUEUED state once the stop is recorded and the job is back in the queue; None if
        it finished instead. After NODE_FAIL nobody of the job records anything: SLURM's queue
        says it. The state is the one seen here: by the time the caller reads state.json again a
        requeued job may already run again and have replaced it."""
        end = self.deadline()
        while True:
            st = run.state()
            if self.finished(run, st):
                return None
            # scontrol only once state.json says REQUEUED: it confirms the job is back in the queue
            if kind == "node" and slurm.show_job(run.job_id).get("JobState") in dp.QUEUED_STATES:
                return st
            if st.state == record.REQUEUED:
                job = slurm.show_job(run.job_id)
                if dp.is_stopped(st, restarts_before, job):
                    return st
                if dp.requeue_lost(st, restarts_before, job):
                    raise DrillError(f"state.json says REQUEUED ({st.message}) but SLURM ended job {run.job_id} "
                                     f"{job.get('JobState')}: the requeue never reached SLURM; {run.where()}")
            if time.monotonic() > end:
                raise DrillError(f"{run.sweep} did not stop after the signal: {run.where()}")
            time.sleep(0.2)

    def observe(self, run: Run, it: dp.Interruption, before: record.RunState, st: record.RunState) -> None:
        """Read the stop's records (its REQUEUED state `st`, metrics.jsonl, checkpoint manifests)
        into `it`."""
        step = st.step or 0
        commits = {c: dp.commit_time(run.checkpoint_manifest(c)) for c in (step - 1, step) if c > 0}
        dp.assess_stop(it, st, before, run.rows(), commits, self.ckpt_interval, self.eval_interval)

    def interrupt(self, run: Run, it: dp.Interruption, done: int) -> bool:
        """Run one interruption; False when the run finished before it could stop."""
        self.wait_running(run, restarts=done)
        if run.last_step() >= it.target:
            it.note = f"the run was already past step {it.target} when the drill was ready"
        before = run.state()
        stopped = self.wait_stop(run, before.restarts, it.kind) if self.fire(run, it) else None
        if stopped is None:
            it.note = "the run finished before this interruption stopped it"
            return False
        requeued_at = time.time()
        if it.kind in dp.POLITE:
            self.observe(run, it, before, stopped)
        if it.node is not None:
            self.resume_node(it.node)
        if self.release:
            time.sleep(max(0.0, RELEASE_AFTER_S - (time.time() - requeued_at)))
            slurm.release(run.job_id)
        self.wait_running(run, restarts=done + 1)
        if it.kind in dp.FAILURES:
            dp.assess_failure(it, before, run.state(), run.rows(), first_failure(run.run_dir, before.restarts),
                              requeued_at)
        it.resumed = dp.resumed_step(run.rows(), run.state().restarts)
        dp.note_resume(it)
        self.out(f"  interruption {it.index} ({it.kind}, aimed at {it.aim} {it.target}): stopped at step "
                 f"{it.stop_step}, hit {it.hit}, detected in {it.detect_s} s, resumed at {it.resumed}")
        return True

    def resume_node(self, node: str) -> None:
        """Bring a node the drill set DOWN back (`state=RESUME`); a refusal is noted, not fatal: the
        clean-up tries again and says what is left to do."""
        try:
            slurm.set_node_state(node, "RESUME")
            self.downed.remove(node)
        except slurm.CommandError as exc:
            self.out(f"  note: could not resume node {node} yet ({exc})")

    def cleanup(self, runs: list[Run]) -> None:
        """Cancel the blockers and any run still going (through the launcher, so it stays down)."""
        slurm.cancel_quietly(self.blockers)
        for node in list(self.downed):
            self.resume_node(node)
        for node in self.downed:
            self.out(f"node {node} is still {slurm.node_state(node) or 'DOWN'}: bring it back with "
                     f"`scontrol update nodename={node} state=resume` (or restart its slurmd)")
        for run in runs:
            if run.state().state not in record.FINAL:
                subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "cancel", str(run.sweep)],
                               cwd=ROOT, capture_output=True, timeout=120, check=False)


class LocalDrill(Drill):
    """The drill on the local executor (one controller per job on this machine, no SLURM): a usr2
    goes to rank 0's process (from its progress record); a stop is the REQUEUED state.json with
    a higher restart count, after which the controller restarts the ranks itself. SIGKILL and
    SIGSTOP to a rank work as on SLURM; preempt and node need SLURM."""

    executor = "local"

    def ended_behind_our_back(self, run: Run, st: record.RunState) -> None:
        if st.state not in record.FINAL and not executors.local_alive(run.job_id, run.sweep):
            time.sleep(SLURM_CHECK_S)  # the controller may have written its final state as it left
            if run.state().state not in record.FINAL:
                raise DrillError(f"the local controller of {run.sweep} (pid {run.job_id}) is gone while "
                                 f"state.json says {run.state().state}: {run.where()}")

    def fire(self, run: Run, it: dp.Interruption) -> bool:
        if it.kind != "usr2":
            return super().fire(run, it)
        end = self.deadline()
        while not dp.ready(it, run.last_step(), False):
            if run.state().state in record.FINAL:
                return False
            if time.monotonic() > end:
                raise DrillError(f"{run.sweep} did not reach step {it.target}: {run.where()}")
            time.sleep(0.005)
        pid, why = dp.signal_pid(run.progress(0), {socket.gethostname()}, run.state().restarts, pid_namespace())
        if pid is None:
            raise DrillError(f"cannot signal rank 0: {why}")
        it.fired_step, it.injected = run.last_step(), time.time()
        os.kill(pid, signal.SIGUSR2)  # one rank is enough: all ranks agree on a stop at the step boundary
        return True

    def wait_stop(self, run: Run, restarts_before: int, kind: str = "usr2") -> record.RunState | None:
        end = self.deadline()
        while True:
            st = run.state()
            if self.finished(run, st):
                return None
            if st.restarts > restarts_before:  # REQUEUED (or the next attempt running already)
                return st
            if time.monotonic() > end:
                raise DrillError(f"{run.sweep} did not stop after the signal: {run.where()}")
            time.sleep(0.05)


def print_goodput(drilled: Run, ref: Run) -> None:
    """The drilled run's goodput ledger, the reference's beside it, and where start-up went."""
    for what, r in (("drilled", drilled), ("reference", ref)):
        rec = record.SweepRecord(r.sweep).read().get(r.job)
        led = goodput.run_ledger(r.run_dir, rec.submitted_at if rec else None)
        print(f"{what:<9} {goodput.format_ledger(led) if led else 'goodput -: no metrics'}")
    n, parts = goodput.startup_breakdown(drilled.rows_all())
    if n:
        print(f"start-up per attempt ({n} attempts, mean s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))


def check_reference(ref: Run, overrides: list[str], experiment: str) -> None:
    """A reused reference must be a completed, uninterrupted run of the same submission."""
    meta = record.read_sweep_meta(ref.sweep)
    if Path(meta["experiment"]).resolve() != Path(experiment).resolve() or meta["cli_overrides"] != overrides:
        raise UserError(f"--reference {ref.sweep} ran {meta['experiment']} with {meta['cli_overrides']}, "
                        f"not this experiment with {overrides}")
    st = ref.state()
    if st.state != record.COMPLETED or st.restarts:
        raise UserError(f"--reference {ref.sweep} is {st.state} with {st.restarts} restart(s): it must be a "
                        f"completed, uninterrupted run")


# ---- entry point -----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/drill.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="jobs/X.yaml (or X); it must expand into one job")
    p.add_argument("overrides", nargs="*", help="key=value config overrides and resources.KEY=VALUE")
    p.add_argument("-k", type=int, default=3, help="interruptions (default 3)")
    p.add_argument("--seed", type=int, default=0, help="where they land and in which order (default 0)")
    p.add_argument("--kinds", default="usr2,preempt",
                   help="from usr2,preempt (polite stops) and stop,kill,raise,node (failures) (default usr2,preempt)")
    p.add_argument("--atol", type=float, default=0.0, help="allowed |loss difference| (default 0: exact)")
    p.add_argument("--min-gap", type=int, default=10, help="steps between interruptions (default 10)")
    p.add_argument("--name", help="sweep name (default drill-<experiment>-<time>; the reference adds -ref)")
    p.add_argument("--reference", type=Path, help="a finished uninterrupted sweep of the same experiment to reuse")
    p.add_argument("--high-partition", help="partition whose jobs preempt the drilled one (default: found "
                                            "with scontrol, by PriorityTier)")
    p.add_argument("--blocker-args", default="", help="extra sbatch arguments for the preempting job "
                                                       "(account, qos)")
    p.add_argument("--no-release", action="store_true", help="let requeued jobs wait SLURM's own delay")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds any one wait may take")
    p.add_argument("--storm", action="store_true", help="a preemption storm: a usr2 every --every steps "
                                                        "(-k, --kinds and --min-gap are not used)")
    p.add_argument("--every", type=int, default=20, help="steps between the storm's interruptions (default 20)")
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                   help="slurm (default: the local cluster or a real one) or local (no SLURM; usr2, stop, kill)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except (DrillError, slurm.CommandError) as exc:  # before UserError: a CommandError is one too
        print(f"drill failed: {exc}", file=sys.stderr)
        return EXIT_MISMATCH
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # the runs were cancelled on the way out
        print("drill interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if args.k < 1 or not kinds or any(k not in dp.KINDS for k in kinds) or args.min_gap < 1 or args.atol < 0:
        raise UserError(f"want -k >= 1, --kinds from {','.join(dp.KINDS)}, --min-gap >= 1 and --atol >= 0 "
                        f"(got -k {args.k}, --kinds {args.kinds}, --min-gap {args.min_gap}, --atol {args.atol:g})")
    overrides = list(args.overrides)
    if dp.LOG_EVERY_STEP not in overrides:
        overrides.append(dp.LOG_EVERY_STEP)
    exp = load_experiment(args.experiment, overrides)
    if len(exp.jobs) != 1:
        raise UserError(f"{exp.path} expands into {len(exp.jobs)} jobs: pin its sweep axes with overrides "
                        f"(one job per drill)")
    cfg = Composer().compose(exp.jobs[0].overrides)
    s = cfg.trainer.config
    # interval auto: no interval saves to aim at (the storm's business is the interval, not a save)
    ckpt_interval, eval_interval = fixed_interval(s.checkpoint_strategy.config) or 0, s.eval_interval
    if args.storm:
        kinds = ("usr2",)
    if args.executor == "local" and (bad := [k for k in kinds if k in ("preempt", "node")]):
        raise UserError(f"--kinds {','.join(bad)} need SLURM: use --executor slurm, or usr2,stop,kill,raise")
    high = args.high_partition
    if "preempt" in kinds and high is None:
        from launch.experiment import load_profile

        part = load_profile(exp.cluster).partition(exp.resources.partition)
        mine = exp.resources.partition or (part.name if part else "")
        high = dp.choose_high_partition(slurm.show_partitions(), mine) if mine else None
        if high is None:
            print(f"note: no partition preempts '{mine or 'the default partition'}' here: usr2 interruptions only")
            kinds = tuple(k for k in kinds if k != "preempt") or ("usr2",)
    world = exp.resources.world_size
    if world < 2 and any(k in dp.PEER_KINDS for k in kinds):
        raise UserError(f"--kinds {','.join(k for k in kinds if k in dp.PEER_KINDS)} need a job of 2 ranks or more "
                        f"(resources.tasks_per_node=2): a lone rank has no peer to notice it; this one has {world}")
    plan = dp.plan_storm(s.max_steps, args.every, args.seed) if args.storm else \
        dp.plan_interruptions(args.k, args.seed, s.max_steps, ckpt_interval, eval_interval, kinds, args.min_gap)
    for it in plan:
        if it.kind in ("stop", "kill", "raise"):
            it.rank = world - 1
    fault = dp.fault_env(plan)
    failures = sum(it.kind in dp.FAILURES for it in plan)
    if failures > exp.resources.max_failures and not any(o.startswith("resources.max_failures=") for o in overrides):
        overrides.append(f"resources.max_failures={failures}")  # each failure is counted against it
    stops = sum(it.kind == "usr2" for it in plan)  # the local executor counts a usr2 as a time-out
    if args.executor == "local" and stops >= exp.resources.max_timeouts \
            and not any(o.startswith("resources.max_timeouts=") for o in overrides):
        overrides.append(f"resources.max_timeouts={stops + 1}")
    name = args.name or f"drill-{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"drill of {exp.path}: {len(plan)} interruption(s), seed {args.seed}, {s.max_steps} steps, checkpoint "
          f"every {ckpt_interval or '-'}, eval every {eval_interval or '-'}"
          + (f", preempting partition '{high}'" if "preempt" in kinds else ""))
    for it in plan:
        print(f"  planned {it.index}: {it.kind} aimed at {it.aim} of step {it.target}"
              + (f" (rank {it.rank})" if it.rank is not None else ""))
    if fault:
        print(f"  the drilled job runs with GPT2_FAULT={fault}")

    kind = LocalDrill if args.executor == "local" else Drill
    drill = kind(str(exp.path.resolve()), overrides, name, high if "preempt" in kinds else None,
                 ckpt_interval, eval_interval, timeout_s=args.timeout,
                 release=not args.no_release and args.executor == "slurm", blocker_args=shlex.split(args.blocker_args))
    runs: list[Run] = []
    try:
        if args.reference:
            ref = Run.of(args.reference)
            check_reference(ref, drill.overrides, str(exp.path))
            print(f"reference: {ref.sweep} (reused)")
        else:
            ref = drill.submit(f"{name}-ref")
            runs.append(ref)
            drill.wait_done(ref)
            if ref.state().restarts:
                raise DrillError(f"the reference {ref.sweep} was interrupted itself ({ref.state().message}): "
                                 f"run the drill again")
            print(f"reference done at step {ref.last_step()}")
        drilled = drill.submit(name, fault)
        runs.append(drilled)
        done = 0
        for it in plan:
            if not drill.interrupt(drilled, it, done):
                break
            done += 1
        drill.wait_done(drilled)
    finally:
        drill.cleanup(runs)
    st = drilled.state()
    rows = drilled.rows()
    cmp = dp.compare(ref.rows(), rows, args.atol)
    print(f"\ndrill of {exp.path}: reference {ref.sweep}, drilled {drilled.sweep}")
    print(dp.format_table(plan))
    unplanned = dp.unplanned_restarts(plan, rows, st.restarts)
    if unplanned:
        print(f"  restarts the drill did not cause (time limit?): {', '.join(unplanned)}")
    print(f"restarts: {st.restarts} ({st.timeouts} counted as time-outs, {st.preemptions} as preemptions, "
          f"{st.failures} as failures)")
    print_goodput(drilled, ref)
    print(dp.format_summary(plan, cmp, args.atol))  # its verdict is the last line
    return 0 if not dp.problems(plan, cmp, args.atol) else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
