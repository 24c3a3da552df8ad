"""Requeue drill: interrupt a real SLURM run K times and check that it resumes step for step.

    python launch/drill.py jobs/X.yaml [key=value ...] [-k 3] [--seed 0] [--kinds usr2,preempt]
                           [--atol 0] [--min-gap 10] [--name NAME] [--reference SWEEP_DIR]
                           [--high-partition P] [--blocker-args "..."] [--no-release] [--timeout 3600]
    make drill EXP=X ARGS="..."

1. The experiment (one job: pin sweep axes with overrides) runs once, uninterrupted, through
   `launch/sweep.py --executor slurm`: the reference (`--reference SWEEP_DIR` reuses one).
2. It is submitted again and interrupted K times at random steps (seeded), each by one of
   - usr2: `scancel --signal=USR2`, what SLURM sends before a time limit;
   - preempt: a job in a higher-priority partition (`sbatch -p <high> -w <its nodes> --exclusive`)
     that makes SLURM preempt it; on a cluster without one, usr2 only.
   The first interruptions aim at a checkpoint write (the signal goes out when the
   `step_N.tmp/` directory of a periodic save appears; usr2, which arrives at once) and at an
   evaluation (it goes out as the step before an eval step is logged; preempt), the rest at plain
   training steps. After each stop the drill reads what happened (the step saved, how long the
   save took, where the request really landed), lets the requeued job start at once
   (`scontrol update StartTime=now`) and waits until it has resumed.
3. It compares the per-step train losses (and val losses) with the reference and prints a table.

Exit codes: 0 the runs agree; 1 a mismatch, a resume at the wrong step, or a run that failed;
2 bad input. Every step is logged for the comparison (trainer.config.log_interval=1 is added).
Losses must match exactly by default (`--atol 0`): that holds on CPU with a fixed thread count;
on GPUs whose kernels are not bitwise reproducible, pass a tolerance.

The preempting job asks for whole nodes: on a shared cluster it also preempts other jobs of the
low partition on them (give the drilled job whole nodes, or use `--kinds usr2`).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a script: make `gpt2`/`launch` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import json
import math
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2.errors import EXIT_USER_ERROR, UserError
from launch import record
from launch.executors import CommandError, run_cmd
from launch.experiment import ROOT, ConfigResolver, load_experiment, runs_root

KINDS = ("usr2", "preempt")
PHASES = ("checkpoint", "eval", "train")
LOG_EVERY_STEP = "trainer.config.log_interval=1"
CHECKPOINT_MANIFEST = "MANIFEST.json"  # gpt2.checkpoint.MANIFEST (importing that module loads torch)
EXIT_MISMATCH = 1


# ---- planning --------------------------------------------------------------------------------


@dataclass
class Interruption:
    """One planned interruption and, once it happened, what the run did about it."""

    index: int
    kind: str  # usr2 | preempt
    aim: str  # checkpoint | eval | train: what the request should land in
    target: int  # checkpoint: the save of this step; eval: the eval of this step; train: this step
    fired_step: int | None = None  # the newest logged step when the signal went out
    stop_step: int | None = None  # the step the trainer stopped and saved at
    reason: str | None = None  # the trainer's word: USR2 | SIGTERM | time_budget
    save_s: float | None = None  # from the request to the committed checkpoint
    hit: str | None = None  # where the request landed, from the evidence
    recorded: str | None = None  # what the job counted it as: timeout | preemption
    resumed: int | None = None  # the step the next attempt resumed from
    note: str = ""


def candidates(aim: str, max_steps: int, ckpt_interval: int, eval_interval: int, low: int) -> list[int]:
    """Steps an interruption of this aim can target; a request at the last step is not a stop."""
    steps = range(max(1, low), max_steps)
    if aim == "checkpoint":
        return [s for s in steps if ckpt_interval > 0 and s % ckpt_interval == 0]
    if aim == "eval":
        return [s for s in steps if eval_interval > 0 and s % eval_interval == 0 and s - 1 >= low]
    return [s for s in steps if not (ckpt_interval > 0 and s % ckpt_interval in (0, 1))
            and not (eval_interval > 0 and s % eval_interval in (0, eval_interval - 1))]


def plan_interruptions(k: int, seed: int, max_steps: int, ckpt_interval: int, eval_interval: int,
                       kinds: tuple[str, ...] = KINDS, min_gap: int = 10, tries: int = 2000) -> list[Interruption]:
    """K interruptions at random steps, in step order, at least `min_gap` steps apart.

    The first aims are a checkpoint write and an eval (when the run has them), the rest plain
    steps. With both kinds, usr2 (it arrives within milliseconds) takes the checkpoint write and
    preempt (the scheduler needs a moment) the eval; the others alternate from a random start.
    The same arguments give the same plan.
    """
    if k < 1:
        raise UserError(f"-k must be >= 1 (got {k})")
    if not kinds or any(x not in KINDS for x in kinds):
        raise UserError(f"--kinds must be a comma-separated subset of {','.join(KINDS)} (got {','.join(kinds)})")
    rng = random.Random(seed)
    aims = [a for a in ("checkpoint", "eval") if candidates(a, max_steps, ckpt_interval, eval_interval, min_gap)]
    aims = (aims + ["train"] * k)[:k]
    pools = {a: candidates(a, max_steps, ckpt_interval, eval_interval, min_gap) for a in set(aims)}
    for _ in range(tries):
        picks: list[tuple[int, str]] = []
        for aim in aims:
            free = [s for s in pools[aim] if all(abs(s - p) >= min_gap for p, _ in picks)]
            if not free:
                break
            picks.append((rng.choice(free), aim))
        if len(picks) == k:
            break
    else:
        raise UserError(f"cannot place {k} interruptions at least {min_gap} steps apart in {max_steps} steps "
                        f"(checkpoint every {ckpt_interval}, eval every {eval_interval}): lower -k or "
                        f"--min-gap, or raise trainer.config.max_steps")
    first = rng.randrange(len(kinds))
    fixed = {"checkpoint": "usr2", "eval": "preempt"} if set(kinds) == set(KINDS) else {}
    return [Interruption(index=i + 1, kind=fixed.get(aim, kinds[(first + i) % len(kinds)]), aim=aim, target=step)
            for i, (step, aim) in enumerate(sorted(picks))]


# ---- evidence --------------------------------------------------------------------------------


def parse_stops(log: str) -> list[tuple[int, str, float]]:
    """(step, reason, seconds from request to commit) for each `stopping at step` line of rank 0."""
    out = []
    for line in log.splitlines():
        _, sep, msg = line.partition("| stopping at step ")
        if not sep:
            continue
        try:  # "12 (USR2): checkpoint committed 0.31 s after the request, requeue me"
            step, rest = msg.split(" ", 1)
            reason = rest[1:].split(")", 1)[0]
            secs = float(rest.split("committed ", 1)[1].split(" s", 1)[0])
        except (ValueError, IndexError):
            continue
        out.append((int(step), reason, secs))
    return out


def parse_resumes(log: str) -> list[int]:
    """The step of each `resumed from <dir> at step N` line of rank 0."""
    out = []
    for line in log.splitlines():
        if "| resumed from " in line and " at step " in line:
            try:
                out.append(int(line.rsplit(" at step ", 1)[1].split()[0]))
            except (ValueError, IndexError):
                continue
    return out


def hit_phase(stop_step: int, eval_interval: int, val_logged: bool, request_time: float | None,
              save_windows: dict[int, tuple[float, float]]) -> str:
    """Where a stop request landed, from what the run left behind.

    eval: the run stopped at an eval step without logging that eval (it was cut short).
    checkpoint: the request came while a periodic save of the stop step or the one before was
    being written (`save_windows`: step -> (start, commit), wall-clock seconds; the trainer may
    check for requests before or after an interval save). Otherwise: train.
    """
    if eval_interval > 0 and stop_step % eval_interval == 0 and not val_logged:
        return "eval"
    if request_time is not None and any(start <= request_time <= end for step, (start, end) in save_windows.items()
                                        if step in (stop_step, stop_step - 1)):
        return "checkpoint"
    return "train"


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if isinstance(row, dict) and "step" in row:
            out.append(row)
    return out


# ---- comparison ------------------------------------------------------------------------------


@dataclass
class Comparison:
    steps: int  # train steps compared
    max_diff: float
    worst_step: int | None
    mismatched: list[int]  # |difference| > atol (or one side NaN)
    missing: list[int]  # in the reference, not in the drilled run
    extra: list[int]  # in the drilled run, not in the reference
    replayed: list[int]  # trained more than once in the drilled run
    val_steps: int
    val_max_diff: float
    val_mismatched: list[int]
    val_missing: list[int]  # evals the drilled run does not have (cut short by a stop)

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.extra or self.replayed or self.val_mismatched)


def _last_per_step(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if key in r}


def _diff(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b)


def compare(reference: list[dict[str, Any]], drilled: list[dict[str, Any]], atol: float = 0.0) -> Comparison:
    """Per-step train and val losses of the drilled run against the reference (last row per step)."""
    ref, got = _last_per_step(reference, "loss"), _last_per_step(drilled, "loss")
    diffs = {s: _diff(got[s], ref[s]) for s in ref if s in got}
    worst = max(diffs, key=lambda s: diffs[s]) if diffs else None
    counts: dict[int, int] = {}
    for r in drilled:
        if "loss" in r:
            counts[int(r["step"])] = counts.get(int(r["step"]), 0) + 1
    vref, vgot = _last_per_step(reference, "val_loss"), _last_per_step(drilled, "val_loss")
    vdiffs = {s: _diff(vgot[s], vref[s]) for s in vref if s in vgot}
    return Comparison(
        steps=len(diffs), max_diff=diffs[worst] if worst is not None else 0.0, worst_step=worst,
        mismatched=sorted(s for s, d in diffs.items() if d > atol),
        missing=sorted(set(ref) - set(got)), extra=sorted(set(got) - set(ref)),
        replayed=sorted(s for s, n in counts.items() if n > 1),
        val_steps=len(vdiffs), val_max_diff=max(vdiffs.values(), default=0.0),
        val_mismatched=sorted(s for s, d in vdiffs.items() if d > atol),
        val_missing=sorted(set(vref) - set(vgot)),
    )


def _steps(steps: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, steps[:limit]))
    return shown + (f" ... ({len(steps)} in all)" if len(steps) > limit else "")


def _cell(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def format_table(items: list[Interruption]) -> str:
    head = ("#", "KIND", "AIMED AT", "TARGET", "FIRED AT", "STOPPED AT", "HIT", "SAVE S", "RECORDED AS",
            "RESUMED AT")
    rows = [head] + [(str(i.index), i.kind, i.aim, _cell(i.target), _cell(i.fired_step), _cell(i.stop_step),
                      _cell(i.hit), _cell(i.save_s, ".2f"), _cell(i.recorded), _cell(i.resumed)) for i in items]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"  {i.index}: {i.note}" for i in items if i.note]
    return "\n".join(lines)


def problems(items: list[Interruption], cmp: Comparison, atol: float) -> list[str]:
    """Everything that makes the drill fail, one line each."""
    out = []
    for i in items:
        if i.stop_step is not None and i.resumed is not None and i.resumed != i.stop_step:
            out.append(f"interruption {i.index}: stopped and saved at step {i.stop_step} but resumed at {i.resumed}")
        if i.stop_step is not None and i.resumed is None:
            out.append(f"interruption {i.index}: stopped at step {i.stop_step} and never resumed")
    if cmp.missing:
        out.append(f"steps missing from the drilled run: {_steps(cmp.missing)}")
    if cmp.extra:
        out.append(f"steps the reference does not have: {_steps(cmp.extra)}")
    if cmp.replayed:
        out.append(f"steps trained more than once (a resume went back): {_steps(cmp.replayed)}")
    if cmp.mismatched:
        out.append(f"train loss differs by more than {atol:g} at {len(cmp.mismatched)} step(s), first at "
                   f"{cmp.mismatched[0]}: {_steps(cmp.mismatched)}")
    if cmp.val_mismatched:
        out.append(f"val loss differs by more than {atol:g} at step(s) {_steps(cmp.val_mismatched)}")
    return out


def format_summary(items: list[Interruption], cmp: Comparison, atol: float) -> str:
    lines = [f"train loss: {cmp.steps} steps compared, largest |difference| {cmp.max_diff:.3g}"
             + (f" (step {cmp.worst_step})" if cmp.worst_step is not None and cmp.max_diff > 0 else "")
             + f", tolerance {atol:g}"]
    val = f"val loss: {cmp.val_steps} evals compared, largest |difference| {cmp.val_max_diff:.3g}"
    if cmp.val_missing:
        val += f"; cut short by a stop and not run again: step {_steps(cmp.val_missing)}"
    lines.append(val)
    bad = problems(items, cmp, atol)
    lines += [f"MISMATCH: {p}" for p in bad]
    lines.append("FAIL" if bad else "PASS: the interrupted run matches the uninterrupted one step for step")
    return "\n".join(lines)


# ---- the cluster -----------------------------------------------------------------------------


def parse_kv(text: str) -> dict[str, str]:
    """`Key=Value Key=Value ...` (scontrol -o) as a dict; the first occurrence of a key wins."""
    out: dict[str, str] = {}
    for part in text.split():
        key, sep, value = part.partition("=")
        if sep and key not in out:
            out[key] = value
    return out


def choose_high_partition(partitions_text: str, job_partition: str) -> str | None:
    """The partition with the highest PriorityTier above `job_partition`'s, if that one can be
    preempted (its PreemptMode is not OFF); None otherwise. Input: `scontrol show partition -o`."""
    parts = [parse_kv(line) for line in partitions_text.splitlines() if line.strip()]
    mine = next((p for p in parts if p.get("PartitionName") == job_partition), None)
    if mine is None or mine.get("PreemptMode", "OFF").upper().startswith("OFF"):
        return None
    tier = int(mine.get("PriorityTier", "1"))
    higher = [p for p in parts if int(p.get("PriorityTier", "1")) > tier and p.get("State", "UP") == "UP"]
    if not higher:
        return None
    return max(higher, key=lambda p: int(p.get("PriorityTier", "1")))["PartitionName"]


class Slurm:
    """The few SLURM commands the drill runs (through launch.executors.run_cmd, a test seam)."""

    def __init__(self, run: Callable[..., str] = run_cmd):
        self.run = run

    def job(self, job_id: str) -> dict[str, str]:
        try:
            return parse_kv(self.run(["scontrol", "show", "job", "-o", job_id], timeout=30))
        except CommandError:
            return {}  # purged from the controller's memory

    def usr2(self, job_id: str) -> None:
        self.run(["scancel", "--signal=USR2", job_id], timeout=30)

    def preempt(self, job_id: str, partition: str, name: str, extra: list[str]) -> str:
        """Submit a short job that needs the drilled job's nodes, in `partition`; its id."""
        info = self.job(job_id)
        out = self.run(["sbatch", "--parsable", "-p", partition, "-w", info["NodeList"], "-N", info["NumNodes"],
                        "--exclusive", "--time=1", "-J", name, "-o", "/dev/null", *extra, "--wrap", "sleep 2"],
                       timeout=60)
        return out.strip().split(";")[0]

    def release(self, job_id: str) -> None:
        self.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], timeout=30)

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            try:
                self.run(["scancel", *job_ids], timeout=30)
            except CommandError:
                pass

    def partitions(self) -> str:
        return self.run(["scontrol", "show", "partition", "-o"], timeout=30)


# ---- running the drill -----------------------------------------------------------------------


class DrillError(RuntimeError):
    """A run failed or did not do what the drill waited for; str() says which log to read."""


@dataclass
class Run:
    """One submitted sweep of one job, watched through its files and `scontrol`."""

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

    def log(self) -> str:
        path = self.run_dir / "logs" / "rank0.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def state(self) -> record.RunState:
        return record.read_state(self.run_dir) or record.RunState()

    def last_step(self) -> int:
        return int(record.last_metrics(self.run_dir).get("step", 0))

    def where(self) -> str:
        return f"see `python launch/sweep.py logs {self.sweep} {self.job} --err` and {self.run_dir}/logs/rank0.log"


@dataclass
class Drill:
    experiment: str
    overrides: list[str]
    name: str
    slurm: Slurm
    high: str | None
    ckpt_interval: int
    eval_interval: int
    timeout_s: float = 3600.0
    release: bool = True
    blocker_args: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    out: Callable[[str], None] = print

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    # -- submission and waiting --
    def submit(self, sweep_name: str) -> Run:
        cmd = [sys.executable, str(ROOT / "launch" / "sweep.py"), self.experiment, *self.overrides,
               "--executor", "slurm", "--name", sweep_name]
        proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise DrillError(f"submission failed ({' '.join(map(shlex.quote, cmd[1:]))}):\n{proc.stdout}{proc.stderr}")
        run = Run.of(runs_root() / sweep_name)
        self.out(f"submitted {run.sweep} (job {run.job_id})")
        return run

    def wait_done(self, run: Run) -> None:
        end = self.deadline()
        while True:
            st = run.state()
            if st.state == record.COMPLETED:
                return
            if st.state in record.FINAL:
                raise DrillError(f"{run.sweep} ended {st.state} ({st.message}): {run.where()}")
            info = self.slurm.job(run.job_id)
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime" and self.release:
                self.slurm.release(run.job_id)  # a requeue nobody planned (the time limit?): no waiting
            if time.monotonic() > end:
                raise DrillError(f"{run.sweep} not done after {self.timeout_s:.0f} s: {run.where()}")
            time.sleep(0.5)

    def wait_running(self, run: Run, resumes: int) -> None:
        """Until the job trains: the trainer has logged `resumes` resumes and a step after them."""
        end = self.deadline()
        while not (len(parse_resumes(run.log())) >= resumes and run.last_step() > 0
                   and run.state().state == record.RUNNING):
            if run.state().state in record.FINAL:
                raise DrillError(f"{run.sweep} ended {run.state().state} while the drill waited: {run.where()}")
            if time.monotonic() > end:
                raise DrillError(f"{run.sweep} did not start training: {run.where()}")
            time.sleep(0.2)

    # -- one interruption --
    def ready(self, run: Run, it: Interruption) -> bool:
        step = run.last_step()
        if it.aim == "checkpoint":
            if (run.ckpt_root / f"step_{it.target:08d}.tmp").exists():
                return True
            if step > it.target:
                it.note = f"the save of step {it.target} was over before the drill saw it; fired late"
                return True
            return False
        if it.aim == "eval":
            return step >= it.target - 1
        return step >= it.target

    def fire(self, run: Run, it: Interruption) -> bool:
        """Wait for the aimed moment and send the signal; False when the run finished first."""
        end = self.deadline()
        checked = 0.0
        while not self.ready(run, it):
            if time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                if run.state().state in record.FINAL:
                    return False
            if time.monotonic() > end:
                raise DrillError(f"{run.sweep} did not reach step {it.target}: {run.where()}")
            time.sleep(0.005)
        it.fired_step = run.last_step()
        if it.kind == "usr2":
            self.slurm.usr2(run.job_id)
        else:
            assert self.high is not None
            self.blockers.append(self.slurm.preempt(run.job_id, self.high, f"{self.name}-blocker",
                                                    self.blocker_args))
        return True

    def wait_stop(self, run: Run, stops_before: int) -> bool:
        """True once the job stopped and is back in the queue; False if it finished instead."""
        end = self.deadline()
        while True:
            st = run.state()
            if st.state == record.COMPLETED:
                return False
            if st.state in record.FINAL:
                raise DrillError(f"{run.sweep} ended {st.state} after an interruption ({st.message}): {run.where()}")
            if len(parse_stops(run.log())) > stops_before and st.state == record.REQUEUED:
                info = self.slurm.job(run.job_id)
                if info.get("JobState") in ("PENDING", "REQUEUED", "REQUEUE_HOLD"):
                    return True
            if time.monotonic() > end:
                raise DrillError(f"{run.sweep} did not stop after the signal: {run.where()}")
            time.sleep(0.2)

    def observe(self, run: Run, it: Interruption, before: record.RunState) -> None:
        step, reason, save_s = parse_stops(run.log())[-1]
        it.stop_step, it.reason, it.save_s = step, reason, save_s
        st = run.state()
        it.recorded = ("timeout" if st.timeouts > before.timeouts
                       else "preemption" if st.preemptions > before.preemptions else "?")
        rows = read_rows(run.run_dir)
        attempt = [r for r in rows if r.get("restart", 0) == before.restarts]
        val_logged = any(r["step"] == step and "val_loss" in r for r in attempt)
        commit = {c: _mtime(run.ckpt_root / f"step_{c:08d}" / CHECKPOINT_MANIFEST) for c in (step - 1, step)}
        request_time = commit[step] - save_s if commit[step] is not None else None  # the stop's own commit
        windows = {}
        for c, end in commit.items():
            logged = [r["time"] for r in attempt if r["step"] == c and "time" in r]
            if self.ckpt_interval > 0 and c % self.ckpt_interval == 0 and end is not None and logged:
                windows[c] = (max(logged), end)  # an interval save starts after the step's rows
        it.hit = hit_phase(step, self.eval_interval, val_logged, request_time, windows)
        if it.hit != it.aim and not it.note:
            it.note = f"aimed at {it.aim}, the request landed in {it.hit}"

    def interrupt(self, run: Run, it: Interruption, done: int) -> bool:
        """Run one interruption; False when the run finished before it could stop."""
        self.wait_running(run, resumes=done)
        if run.last_step() >= it.target:
            it.note = f"the run was already past step {it.target} when the drill was ready"
        before = run.state()
        stops_before = len(parse_stops(run.log()))
        if not self.fire(run, it) or not self.wait_stop(run, stops_before):
            it.note = "the run finished before this interruption stopped it"
            return False
        self.observe(run, it, before)
        if self.release:
            self.slurm.release(run.job_id)
        self.wait_running(run, resumes=done + 1)
        it.resumed = parse_resumes(run.log())[-1]
        self.out(f"  interruption {it.index} ({it.kind}, aimed at {it.aim} {it.target}): stopped at step "
                 f"{it.stop_step}, hit {it.hit}, resumed at {it.resumed}")
        return True

    def cleanup(self, runs: list[Run]) -> None:
        """Cancel the blockers and any run still going (through the launcher, so it stays down)."""
        self.slurm.cancel(self.blockers)
        for run in runs:
            if run.state().state not in record.FINAL:
                subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "cancel", str(run.sweep)],
                               cwd=ROOT, capture_output=True, timeout=120, check=False)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


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
    p.add_argument("--kinds", default="usr2,preempt", help="usr2 and/or preempt (default both)")
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (DrillError, CommandError) as exc:
        print(f"drill failed: {exc}", file=sys.stderr)
        return EXIT_MISMATCH
    except KeyboardInterrupt:  # the runs were cancelled on the way out
        print("drill interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if args.k < 1 or not kinds or any(k not in KINDS for k in kinds) or args.min_gap < 1 or args.atol < 0:
        raise UserError(f"want -k >= 1, --kinds from {','.join(KINDS)}, --min-gap >= 1 and --atol >= 0 "
                        f"(got -k {args.k}, --kinds {args.kinds}, --min-gap {args.min_gap}, --atol {args.atol:g})")
    overrides = list(args.overrides)
    if LOG_EVERY_STEP not in overrides:
        overrides.append(LOG_EVERY_STEP)
    exp = load_experiment(args.experiment, overrides)
    if len(exp.jobs) != 1:
        raise UserError(f"{exp.path} expands into {len(exp.jobs)} jobs: pin its sweep axes with overrides "
                        f"(one job per drill)")
    cfg = ConfigResolver().resolve(exp.jobs[0].overrides)
    s = cfg.trainer.config
    ckpt_interval, eval_interval = s.checkpoint_strategy.config.interval, s.eval_interval
    slurm = Slurm()
    high = args.high_partition
    if "preempt" in kinds and high is None:
        from launch.experiment import load_profile

        part = load_profile(exp.cluster).partition(exp.resources.partition)
        mine = exp.resources.partition or (part.name if part else "")
        high = choose_high_partition(slurm.partitions(), mine) if mine else None
        if high is None:
            print(f"note: no partition preempts '{mine or 'the default partition'}' here: usr2 interruptions only")
            kinds = tuple(k for k in kinds if k != "preempt") or ("usr2",)
    plan = plan_interruptions(args.k, args.seed, s.max_steps, ckpt_interval, eval_interval, kinds, args.min_gap)
    name = args.name or f"drill-{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"drill of {exp.path}: {len(plan)} interruption(s), seed {args.seed}, {s.max_steps} steps, checkpoint "
          f"every {ckpt_interval or '-'}, eval every {eval_interval or '-'}"
          + (f", preempting partition '{high}'" if "preempt" in kinds else ""))
    for it in plan:
        print(f"  planned {it.index}: {it.kind} aimed at {it.aim} of step {it.target}")

    drill = Drill(str(exp.path.resolve()), overrides, name, slurm, high if "preempt" in kinds else None,
                  ckpt_interval, eval_interval, timeout_s=args.timeout, release=not args.no_release,
                  blocker_args=shlex.split(args.blocker_args))
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
        drilled = drill.submit(name)
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
    cmp = compare(read_rows(ref.run_dir), read_rows(drilled.run_dir), args.atol)
    print(f"\ndrill of {exp.path}: reference {ref.sweep}, drilled {drilled.sweep}")
    print(format_table(plan))
    planned = {i.stop_step for i in plan if i.stop_step is not None}
    unplanned = [f"step {step} ({reason})" for step, reason, _ in parse_stops(drilled.log()) if step not in planned]
    if unplanned:
        print(f"  stops the drill did not cause (time limit?): {', '.join(unplanned)}")
    print(f"restarts: {st.restarts} ({st.timeouts} counted as time-outs, {st.preemptions} as preemptions)")
    print(format_summary(plan, cmp, args.atol))
    return 0 if not problems(plan, cmp, args.atol) else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
