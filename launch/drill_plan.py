"""The drill's pure half: where to interrupt, what the records say happened, and the verdict.

Contract: nothing here runs a command, sleeps, reads a clock or touches a file. Records come in
already read (rows of metrics.jsonl as dicts, state.json as a `RunState`, checkpoint commit
times, `scontrol` fields as dicts) and decisions, comparisons and report text go out, so every
function is tested on recorded records (tests/test_drill_plan.py). launch/drill.py drives the
cluster and feeds it. What the drill reads in each record:

- metrics.jsonl (gpt2/logs.py): one train row per step (the drill adds LOG_EVERY_STEP), each with
  `restart`, the attempt that wrote it, and `time`. An attempt is training once it has a train
  row; it resumed from the step before its first one. An attempt that resumed from step N first
  drops the rows of steps after N (a failed attempt's steps since its last commit, trained again)
  and leaves one `{"event": "discarded", "restart": R, "steps": [first, last], "train_s": ...}` row
  per attempt R that wrote them (gpt2/metrics_file.py): the steps an attempt trained are its rows
  still in the file and the steps of its discarded rows.
- state.json (launch/job.py): a stop is recorded as REQUEUED with `restarts` one higher; `step`,
  `reason` and `stop_save_s` (request to committed checkpoint) describe that stop, and the
  `timeouts`/`preemptions` counters say how the job counted it.
- a checkpoint's MANIFEST.json (gpt2/checkpoint/manager.py): `time`, when rank 0 committed it.
- `scontrol show job` fields (launch/slurm.py): JobState and Reason.
- failure reports (gpt2/watchdog.py, `<run>/failures/restart<R>-rank<K>.json`): the first one of
  the failed attempt is the cause: its `time` (detection), `blamed_rank`/`blamed_host`.
- state.json's `last_failure` (launch/job.py): the failure of attempt `restart` as the job judged
  it, with the `rule` that requeued it and the blamed `hosts` (NODE_FAIL: noted by the next attempt).

Two families of interruptions. The polite ones (usr2, preempt) ask the trainer to stop: it saves
at the step it is at and the next attempt resumes there. The failures (stop: SIGSTOP to one rank,
kill: SIGKILL to one rank, raise: an exception in one rank at one step, node: the job's node set
DOWN) give no warning: the watchdog of a surviving rank (or SLURM's NODE_FAIL) notices, the job
is requeued by a failure rule, and the next attempt resumes from the last committed checkpoint:
the steps since then are trained again, and must give the same losses.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpt2.errors import UserError
from gpt2.metrics_file import json_rows
from launch import record

POLITE = ("usr2", "preempt")  # the trainer is asked to stop and saves where it is
FAILURES = ("stop", "kill", "raise", "node")  # no warning: resumed from the last committed checkpoint
KINDS = POLITE + FAILURES
PEER_KINDS = ("stop", "kill")  # detected by a peer rank's watchdog: a job of 2 ranks or more
PHASES = ("checkpoint", "eval", "train")
LOG_EVERY_STEP = "trainer.config.log_interval=1"
CHECKPOINT_MANIFEST = "MANIFEST.json"  # gpt2.checkpoint.manager.MANIFEST (importing that module loads torch)
QUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD")  # scontrol's JobState of a job back in the queue


# ---- planning --------------------------------------------------------------------------------


@dataclass
class Interruption:
    """One planned interruption and, once it happened, what the run did about it."""

    index: int
    kind: str  # usr2 | preempt | stop | kill | raise | node
    aim: str  # checkpoint | eval | train: what the request should land in
    target: int  # checkpoint: the save of this step; eval: the eval of this step; train: this step
    fired_step: int | None = None  # the newest logged step when the signal went out
    stop_step: int | None = None  # the step the trainer stopped and saved at (a failure: its last logged step)
    reason: str | None = None  # the trainer's word: USR2 | SIGTERM | time_budget
    save_s: float | None = None  # from the request to the committed checkpoint
    hit: str | None = None  # where the request landed, from the evidence
    recorded: str | None = None  # what the job counted it as: timeout | preemption
    restart: int | None = None  # state.json's restart count once this stop was recorded
    resumed: int | None = None  # the step the next attempt resumed from
    rank: int | None = None  # stop, kill, raise: the rank it is aimed at
    node: str | None = None  # node: the node set DOWN
    detected_as: str | None = None  # polite: the trainer's reason; a failure: the first report's kind
    injected: float | None = None  # unix time of the injection (raise: the last step before it logged)
    detect_s: float | None = None  # injection -> first failure report (polite, node: -> the requeue)
    blamed: str | None = None  # what the first failure report (node: the recorded failure) blames
    rule: str | None = None  # the rule that requeued it (state.json's failure `rule`; polite: timeout|preemption)
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
                       kinds: tuple[str, ...] = POLITE, min_gap: int = 10, tries: int = 2000) -> list[Interruption]:
    """K interruptions at random steps, in step order, at least `min_gap` steps apart.

    The first aims are a checkpoint write and an eval (when the run has them and a polite kind is
    asked for: a failure there proves nothing more than anywhere else), the rest plain steps.
    With both polite kinds, usr2 (it arrives within milliseconds) takes the checkpoint write and
    preempt (the scheduler needs a moment) the eval; the others take the kinds in turn from a
    random start, with at most one `raise` (GPT2_FAULT holds one fault). The same arguments give
    the same plan.
    """
    if k < 1:
        raise UserError(f"-k must be >= 1 (got {k})")
    if not kinds or any(x not in KINDS for x in kinds):
        raise UserError(f"--kinds must be a comma-separated subset of {','.join(KINDS)} (got {','.join(kinds)})")
    rng = random.Random(seed)
    polite = [x for x in kinds if x in POLITE]
    aims = [a for a in ("checkpoint", "eval") if polite
            and candidates(a, max_steps, ckpt_interval, eval_interval, min_gap)]
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
    if set(polite) == set(POLITE):
        fixed = {"checkpoint": "usr2", "eval": "preempt"}
    else:
        fixed = {"checkpoint": polite[0], "eval": polite[0]} if polite else {}
    out: list[Interruption] = []
    turn = first
    for i, (step, aim) in enumerate(sorted(picks)):
        kind = fixed.get(aim)
        while kind is None:
            kind = kinds[turn % len(kinds)]
            turn += 1
            if kind == "raise" and any(x.kind == "raise" for x in out):
                kind = None if len(kinds) > 1 else "raise"
        if kind == "raise" and any(x.kind == "raise" for x in out):
            raise UserError("one `raise` per drill (GPT2_FAULT holds one fault): add another kind to --kinds "
                            "or lower -k")
        out.append(Interruption(index=i + 1, kind=kind, aim=aim, target=step))
    return out


def fault_env(plan: list[Interruption]) -> str | None:
    """GPT2_FAULT for the drilled submission: the plan's `raise`, on its rank, at the start of its
    step, on the attempt it falls in (interruption i happens in the attempt of restart i - 1)."""
    for it in plan:
        if it.kind == "raise":
            return f"raise@{it.target}:{it.rank or 0}/{it.index - 1}"
    return None


def signal_pid(rec: Mapping[str, Any] | None, local_hosts: set[str], restart: int,
               pidns: str | None) -> tuple[int | None, str]:
    """(pid, "") of the rank to signal, from its progress record (gpt2/watchdog.py), or (None, why
    not). It must be a process of this machine (its host one of `local_hosts`: this hostname or a
    node of the local cluster; the same PID namespace) of the current attempt, still training."""
    if not rec:
        return None, "no progress record for the rank to signal (is gpt2's watchdog on?)"
    if rec.get("host") not in local_hosts or (rec.get("pidns") and pidns and rec.get("pidns") != pidns):
        return None, (f"rank {rec.get('rank')} runs on {rec.get('host')}, not on this machine "
                      f"({', '.join(sorted(local_hosts))}): stop and kill need the local cluster")
    pid = rec.get("pid")
    if rec.get("restart") != restart or rec.get("phase") == "done" or not isinstance(pid, int) or pid <= 1:
        return None, f"rank {rec.get('rank')}'s progress record is not of a training attempt {restart}: {dict(rec)}"
    return pid, ""


# ---- reading the records ---------------------------------------------------------------------


def parse_rows(text: str) -> list[dict[str, Any]]:
    """The step rows and "discarded" rows of a metrics.jsonl; a line that does not parse (one
    being written) and other event rows are skipped."""
    return [row for row in json_rows(text)
            if discarded_range(row) is not None or ("step" in row and "event" not in row)]


def discarded_range(row: Mapping[str, Any]) -> tuple[int, int] | None:
    """(first, last) step of a "discarded" row; None for any other row."""
    steps = row.get("steps")
    if row.get("event") != "discarded" or not isinstance(steps, list) or len(steps) != 2:
        return None
    return int(steps[0]), int(steps[1])


def discarded_steps(rows: list[dict[str, Any]], restart: int | None = None) -> list[int]:
    """The steps whose rows were discarded (of attempt `restart`; None: of every attempt), each
    once per discard: every step is logged in a drill, so a range [first, last] holds them all."""
    out: list[int] = []
    for r in rows:
        span = discarded_range(r)
        if span is not None and (restart is None or r.get("restart", 0) == restart):
            out.extend(range(span[0], span[1] + 1))
    return out


def train_steps(rows: list[dict[str, Any]], restart: int) -> list[int]:
    """The steps attempt `restart` trained, in step order: its train rows still in the file and
    the steps of its rows a later attempt discarded."""
    kept = [int(r["step"]) for r in rows if "loss" in r and "step" in r and r.get("restart", 0) == restart]
    return sorted(set(kept) | set(discarded_steps(rows, restart)))


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


ENDED_STATES = ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def requeue_lost(st: record.RunState, restarts_before: int, job: Mapping[str, str]) -> bool:
    """state.json says the job was requeued after `restarts_before` but SLURM ended it instead:
    the requeue never reached SLURM (the run stays stuck at REQUEUED)."""
    return st.state == record.REQUEUED and st.restarts > restarts_before and job.get("JobState") in ENDED_STATES


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
    attempt = [r for r in rows if "step" in r and r.get("restart", 0) == before.restarts]
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
    it.rule, it.detected_as = it.recorded, st.reason
    if it.injected is not None and st.state == record.REQUEUED:
        it.detect_s = round(st.updated - it.injected, 2)  # the REQUEUED record: the stop is done


def assess_failure(it: Interruption, before: record.RunState, after: record.RunState, rows: list[dict[str, Any]],
                   report: Mapping[str, Any] | None, requeued_at: float | None) -> None:
    """Fill in what a failure (stop, kill, raise, node) did, once the next attempt trains: from
    state.json before the injection and after the resume, the run's metrics rows, the first
    failure report of the failed attempt (None: none was written, as after NODE_FAIL) and when
    the driver saw the job back in SLURM's queue (`requeued_at`, unix s)."""
    failed = before.restarts
    steps = train_steps(rows, failed)
    it.stop_step = max(steps) if steps else None
    it.restart = failed + 1
    it.recorded = "failure"
    if it.kind == "raise" and it.injected is None:  # raised at the start of the step after the last row
        it.injected = last_row_time(rows, failed)
    if report is not None:
        it.detected_as, it.hit = report.get("kind"), report.get("phase")
        if report.get("blamed_rank") is not None or report.get("blamed_host"):
            it.blamed = f"rank{report.get('blamed_rank')}@{report.get('blamed_host')}"
    fail = after.last_failure if after.last_failure and after.last_failure.get("restart") == failed else None
    if fail is not None:
        it.rule = fail.get("rule")
        if it.kind == "node" or report is None:
            it.detected_as = it.detected_as or fail.get("kind")
            it.blamed = ",".join(fail.get("hosts") or []) or it.blamed
    when = float(report["time"]) if report is not None and isinstance(report.get("time"), int | float) \
        else requeued_at
    if it.injected is not None and when is not None:
        it.detect_s = round(when - it.injected, 2)


def last_row_time(rows: list[dict[str, Any]], restart: int) -> float | None:
    """When attempt `restart` wrote its last row: the time of its last row still in the file, plus
    the training time of its rows discarded since (an estimate: it leaves out their evals and
    logging); None when none of its rows is left to start from."""
    times = [float(r["time"]) for r in rows if "step" in r and r.get("restart", 0) == restart
             and isinstance(r.get("time"), int | float)]
    if not times:
        return None
    gone = sum(float(r.get("train_s") or 0.0) for r in rows
               if discarded_range(r) is not None and r.get("restart", 0) == restart)
    return max(times) + gone


def note_resume(it: Interruption) -> None:
    """A failure's note, once it resumed: what it cost (the steps trained again)."""
    if it.kind not in FAILURES or it.resumed is None or it.stop_step is None or it.note:
        return
    if it.resumed == it.stop_step:
        it.note = f"saved step {it.stop_step} on the way down (SLURM's SIGTERM): nothing trained again"
    elif it.resumed < it.stop_step:
        it.note = (f"steps {it.resumed + 1}-{it.stop_step} trained again from the checkpoint of step {it.resumed}"
                   if it.resumed else f"steps 1-{it.stop_step} trained again from the start")


def blame_problem(it: Interruption) -> str | None:
    """Whether a failure was blamed where it was injected: the rank for stop, kill and raise, the
    node for node. None when it was (or for a polite kind)."""
    if it.kind in ("stop", "kill", "raise") and it.rank is not None and it.blamed is not None:
        if not it.blamed.startswith(f"rank{it.rank}@"):
            return f"blamed {it.blamed}, the fault was in rank {it.rank}"
    if it.kind == "node" and it.node is not None and it.blamed is not None and it.node not in it.blamed.split(","):
        return f"blamed {it.blamed}, node {it.node} was taken down"
    return None


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
    return {int(r["step"]): float(r[key]) for r in rows if key in r and "step" in r}


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
    for step in [int(r["step"]) for r in drilled if "loss" in r and "step" in r] + discarded_steps(drilled):
        counts[step] = counts.get(step, 0) + 1
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
    """One row per interruption; RULE, the only column with spaces, comes last."""
    head = ("#", "KIND", "AIMED AT", "TARGET", "FIRED AT", "STOPPED AT", "HIT", "SAVE S", "DETECT S",
            "DETECTED AS", "BLAMED", "RESUMED AT", "RULE")
    rows = [head] + [(str(i.index), i.kind + (f":{i.rank}" if i.rank is not None else "")
                      + (f":{i.node}" if i.node else ""), i.aim, _cell(i.target), _cell(i.fired_step),
                      _cell(i.stop_step), _cell(i.hit), _cell(i.save_s, ".2f"), _cell(i.detect_s, ".2f"),
                      _cell(i.detected_as), _cell(i.blamed), _cell(i.resumed), _cell(i.rule)) for i in items]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"  {i.index}: {i.note}" for i in items if i.note]
    return "\n".join(lines)


def expected_replays(items: list[Interruption]) -> set[int]:
    """Steps a failure makes the run train again: after the checkpoint it resumed from, up to the
    last step it logged (their losses are compared like any other: the last row counts)."""
    out: set[int] = set()
    for i in items:
        if i.kind in FAILURES and i.resumed is not None and i.stop_step is not None:
            out.update(range(i.resumed + 1, i.stop_step + 1))
    return out


def problems(items: list[Interruption], cmp: Comparison, atol: float) -> list[str]:
    """Everything that makes the drill fail, one line each."""
    out = []
    for i in items:
        if i.kind in FAILURES:
            if i.stop_step is not None and i.resumed is not None and i.resumed > i.stop_step:
                out.append(f"interruption {i.index}: failed at step {i.stop_step} but resumed at {i.resumed}")
            if i.stop_step is not None and i.resumed is None:
                out.append(f"interruption {i.index}: failed at step {i.stop_step} and never resumed")
            if i.resumed is not None and not (i.rule or "").startswith("transient"):
                out.append(f"interruption {i.index}: requeued without a recorded failure rule (rule: {i.rule})")
            if (why := blame_problem(i)) is not None:
                out.append(f"interruption {i.index}: {why}")
            continue
        if i.stop_step is not None and i.resumed is not None and i.resumed != i.stop_step:
            out.append(f"interruption {i.index}: stopped and saved at step {i.stop_step} but resumed at {i.resumed}")
        if i.stop_step is not None and i.resumed is None:
            out.append(f"interruption {i.index}: stopped at step {i.stop_step} and never resumed")
    if cmp.missing:
        out.append(f"steps missing from the drilled run: {_steps(cmp.missing)}")
    if cmp.extra:
        out.append(f"steps the reference does not have: {_steps(cmp.extra)}")
    replayed = [s for s in cmp.replayed if s not in expected_replays(items)]
    if replayed:
        out.append(f"steps trained more than once (a resume went back): {_steps(replayed)}")
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


# ---- the storm ---------------------------------------------------------------------------------


def plan_storm(max_steps: int, every: int, seed: int) -> list[Interruption]:
    """A usr2 every `every` steps (seeded jitter of up to a quarter of it either way), from step
    `every` until the last stretch before max_steps: a preemption-heavy cluster in a few minutes."""
    if every < 4:
        raise UserError(f"--every must be >= 4 steps (got {every})")
    rng = random.Random(seed)
    out: list[Interruption] = []
    jitter = every // 4
    for base in range(every, max_steps - jitter - 1, every):
        out.append(Interruption(index=len(out) + 1, kind="usr2", aim="train",
                                target=base + rng.randint(-jitter, jitter)))
    if not out:
        raise UserError(f"a storm every {every} steps needs trainer.config.max_steps above {every + jitter + 1} "
                        f"(got {max_steps})")
    return out
