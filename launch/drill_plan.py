"""The drill's pure half: where to interrupt, what the records say happened, and the verdict.

Contract: nothing here runs a command, sleeps, reads a clock or touches a file. Records come in
already read (rows of metrics.jsonl as dicts, state.json as a `RunState`, checkpoint commit
times, `scontrol` fields as dicts) and decisions, comparisons and report text go out, so every
function is tested on recorded records (tests/test_drill_plan.py). launch/drill.py drives the
cluster and feeds it. What the drill reads in each record:

- metrics.jsonl (gpt2/logs.py): one train row per step (the drill adds LOG_EVERY_STEP), each with
  `restart`, the attempt that wrote it, and `time`. An attempt is training once it has a train
  row; it resumed from the step before its first one.
- state.json (launch/job.py): a stop is recorded as REQUEUED with `restarts` one higher; `step`,
  `reason` and `stop_save_s` (request to committed checkpoint) describe that stop, and the
  `timeouts`/`preemptions` counters say how the job counted it.
- a checkpoint's MANIFEST.json (gpt2/checkpoint.py): `time`, when rank 0 committed it.
- `scontrol show job` fields (launch/slurm.py): JobState and Reason.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpt2.errors import UserError
from launch import record

KINDS = ("usr2", "preempt")
PHASES = ("checkpoint", "eval", "train")
LOG_EVERY_STEP = "trainer.config.log_interval=1"
CHECKPOINT_MANIFEST = "MANIFEST.json"  # gpt2.checkpoint.MANIFEST (importing that module loads torch)
QUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD")  # scontrol's JobState of a job back in the queue


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
    restart: int | None = None  # state.json's restart count once this stop was recorded
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

# ---- reading the records ---------------------------------------------------------------------


def parse_rows(text: str) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line that does not parse (one being written) is skipped."""
    out = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            out.append(row)
    return out


def train_steps(rows: list[dict[str, Any]], restart: int) -> list[int]:
    """The steps attempt `restart` logged a train loss for, in file order."""
    return [int(r["step"]) for r in rows if "loss" in r and r.get("restart", 0) == restart]


def resumed_step(rows: list[dict[str, Any]], restart: int) -> int | None:
    """The step attempt `restart` started from: the one before its first train row (every step
    is logged); None while it has not trained a step."""
    steps = train_steps(rows, restart)
    return steps[0] - 1 if steps else None


def is_training(st: record.RunState, rows: list[dict[str, Any]], restarts: int) -> bool:
    """Whether the job runs an attempt after at least `restarts` stops and has trained a step in it."""
    return (st.state == record.RUNNING and st.restarts >= restarts
            and any("loss" in r and r.get("restart", 0) >= restarts for r in rows))


def is_stopped(st: record.RunState, restarts_before: int, job: Mapping[str, str]) -> bool:
    """Whether a stop after `restarts_before` is recorded and SLURM has the job back in its queue."""
    return st.state == record.REQUEUED and st.restarts > restarts_before and job.get("JobState") in QUEUED_STATES


def waits_for_begin_time(job: Mapping[str, str]) -> bool:
    """A requeued job SLURM holds back until its begin time (`scontrol update StartTime=now` frees it)."""
    return job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime"


def commit_time(manifest: Mapping[str, Any] | None) -> float | None:
    """When a checkpoint was committed, from its MANIFEST.json; None without one."""
    if not manifest or not isinstance(manifest.get("time"), int | float):
        return None
    return float(manifest["time"])


def ready(it: Interruption, last_step: int, save_in_progress: bool) -> bool:
    """Whether the moment `it` aims at has come: its save is being written (`step_N.tmp/` exists),
    the step before its eval is logged, or its step is logged. A save already over is fired at
    late, with a note."""
    if it.aim == "checkpoint":
        if save_in_progress:
            return True
        if last_step > it.target:
            it.note = f"the save of step {it.target} was over before the drill saw it; fired late"
            return True
        return False
    if it.aim == "eval":
        return last_step >= it.target - 1
    return last_step >= it.target


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

def assess_stop(it: Interruption, st: record.RunState, before: record.RunState, rows: list[dict[str, Any]],
                commits: Mapping[int, float | None], ckpt_interval: int, eval_interval: int) -> None:
    """Fill in what the stop of `it` did, from state.json after it (`st`) and before it
    (`before`), the run's metrics rows and the commit times of the checkpoints of the stop step
    and the one before (`commits`, step -> time)."""
    step = st.step if st.step is not None else -1
    it.stop_step, it.reason, it.save_s, it.restart = st.step, st.reason, st.stop_save_s, st.restarts
    it.recorded = ("timeout" if st.timeouts > before.timeouts
                   else "preemption" if st.preemptions > before.preemptions else "?")
    attempt = [r for r in rows if r.get("restart", 0) == before.restarts]
    val_logged = any(r["step"] == step and "val_loss" in r for r in attempt)
    own = commits.get(step)
    request_time = own - it.save_s if own is not None and it.save_s is not None else None
    windows = {}
    for c in (step - 1, step):
        end = commits.get(c)
        logged = [r["time"] for r in attempt if r["step"] == c and "time" in r]
        if ckpt_interval > 0 and c % ckpt_interval == 0 and end is not None and logged:
            windows[c] = (max(logged), end)  # an interval save starts after the step's rows
    it.hit = hit_phase(step, eval_interval, val_logged, request_time, windows)
    if it.hit != it.aim and not it.note:
        it.note = f"aimed at {it.aim}, the request landed in {it.hit}"


def unplanned_restarts(plan: list[Interruption], rows: list[dict[str, Any]], restarts: int) -> list[str]:
    """The restarts no interruption of `plan` caused (a time limit?), each as where it resumed."""
    caused = {i.restart for i in plan if i.restart is not None}
    out = []
    for r in range(1, restarts + 1):
        if r not in caused:
            at = resumed_step(rows, r)
            out.append(f"restart {r} (resumed at step {'-' if at is None else at})")
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

# ---- the cluster's partitions ----------------------------------------------------------------


def choose_high_partition(partitions: list[dict[str, str]], job_partition: str) -> str | None:
    """The partition with the highest PriorityTier above `job_partition`'s, if that one can be
    preempted (its PreemptMode is not OFF); None otherwise. `partitions`: launch.slurm.show_partitions()."""
    parts = partitions
    mine = next((p for p in parts if p.get("PartitionName") == job_partition), None)
    if mine is None or mine.get("PreemptMode", "OFF").upper().startswith("OFF"):
        return None
    tier = int(mine.get("PriorityTier", "1"))
    higher = [p for p in parts if int(p.get("PriorityTier", "1")) > tier and p.get("State", "UP") == "UP"]
    if not higher:
        return None
    return max(higher, key=lambda p: int(p.get("PriorityTier", "1")))["PartitionName"]
