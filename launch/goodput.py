"""Where a job's hours went: the goodput ledger, recomputed from metrics.jsonl (and SLURM's clock).

The wall time of a job, from submission to the end of its last attempt, is split into buckets:

    queue       submitted (or requeued) until SLURM started it
    startup     process start until the first step: imports, process group, data, model set-up,
                checkpoint load (the attempt's "start" row), plus the first step's excess over
                the attempt's median step (compilation, warm-up)
    productive  steps whose result was kept: the last train row written for each step
    replayed    steps an interruption threw away (done again by a later attempt): older rows of a
                step written again, and the "discarded" summary rows a resumed logger leaves
    save        the loop blocked on checkpoint saves
    eval        evaluation
    gap         an attempt's end until the next one's process started (requeue, controller restart)
    other       the rest of an attempt's wall time (logging, the stop protocol, unmeasured bits)

Goodput = productive / total. What the trainer writes (gpt2/train.py, rank 0, gpt2/logs.py):
- `{"event": "start", "restart", "startup_s", "startup": {part: s}, "resumed_step", "time"}`, once
  per attempt, when it is about to train (`time - startup_s` is when its process started);
- train rows with `train_s` (seconds in steps since the previous train row; older files: the
  row's `step_time`) and `save_blocked_s`; eval rows with `eval_s`;
- `{"event": "end", "status": "done"|"preempted", "save_blocked_s", "eval_s", "train_s", "time"}`
  at a clean end or stop. An attempt killed hard has none: its last row's time ends it;
- `{"event": "discarded", "restart", "steps": [first, last], "train_s", "time"}`: rows a resumed
  logger removed (their steps came after the checkpoint it resumed from).

Attempts are the stretches between "start" rows (files without them: between changes of
`restart`). Pure functions of rows and timestamps; `sweep.py status` and `make plot` show them.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2 import safe_read
from gpt2.metrics_file import json_rows

Row = dict[str, Any]
BUCKETS = ("queue", "startup", "productive", "replayed", "save", "eval", "gap", "other")
SlurmAttempt = tuple[float | None, float | None, float | None]  # sacct Submit, Start, End (unix s)


@dataclass
class Ledger:
    """Seconds per bucket (see the module docstring) of one job, one attempt or a whole sweep."""

    queue: float = 0.0
    startup: float = 0.0
    productive: float = 0.0
    replayed: float = 0.0
    save: float = 0.0
    eval: float = 0.0
    gap: float = 0.0
    other: float = 0.0
    attempts: int = 0
    interruptions: int = 0  # attempts ended by a stop or a kill, not by finishing
    attempt_s: float = 0.0  # wall time inside attempts: the clock that interruptions are counted over

    @property
    def total(self) -> float:
        return sum(getattr(self, b) for b in BUCKETS)

    @property
    def goodput(self) -> float | None:
        return self.productive / self.total if self.total > 0 else None

    @property
    def mtbi_s(self) -> float | None:
        """Mean time between interruptions seen, None before the first."""
        return self.attempt_s / self.interruptions if self.interruptions else None

    def __add__(self, other: Ledger) -> Ledger:
        return Ledger(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {b: round(getattr(self, b), 3) for b in BUCKETS}
        return {**out, "total": round(self.total, 3), "goodput": None if self.goodput is None else round(self.goodput, 4),
                "attempts": self.attempts, "interruptions": self.interruptions}


@dataclass
class Attempt:
    """One attempt as its rows tell it."""

    restart: int
    start: float  # when its process started
    startup: float
    resumed_step: int | None
    rows: list[Row] = field(default_factory=list)  # train and eval rows, in file order
    end_row: Row | None = None
    discarded_s: float = 0.0  # train time of its rows a later attempt's logger removed
    queued_at: float | None = None  # when it was submitted or requeued (the start row's, from launch/job.py)
    slurm_start: float | None = None  # when SLURM started it (SLURM_JOB_START_TIME)
    scheduler: str | None = None  # "slurm" when SLURM queued it (a requeue waits in its queue)

    @property
    def end(self) -> float:
        times = [self.start + self.startup] + [float(r["time"]) for r in self.rows if _num(r.get("time"))]
        if self.end_row is not None and _num(self.end_row.get("time")):
            times.append(float(self.end_row["time"]))
        if self.discarded_s:  # the removed rows came after the last kept one
            times.append(max(times) + self.discarded_s)
        return max(times)

    @property
    def status(self) -> str | None:
        return self.end_row.get("status") if self.end_row else None


def _num(v: Any) -> bool:
    """A number the ledger can add up: times, seconds, steps and restart counts are finite (a damaged
    row's Infinity or NaN is read as missing)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def read_rows(path: Path) -> list[Row]:
    """The JSON object rows of a metrics.jsonl (a torn line is skipped); [] when there is none."""
    try:
        return json_rows(safe_read.read_text(path))
    except OSError:  # none, or not a regular file (a FIFO or /dev/zero under its name)
        return []


def _opt(row: Row, key: str) -> float | None:
    v = row.get(key)
    return float(v) if _num(v) else None


def _get(row: Row, key: str) -> float:
    v = row.get(key)
    return float(v) if _num(v) else 0.0


def _train_s(row: Row) -> float:
    v = row.get("train_s", row.get("step_time"))
    return float(v) if _num(v) else 0.0


def attempts(rows: Iterable[Row]) -> list[Attempt]:
    """The rows split into attempts (see the module docstring)."""
    out: list[Attempt] = []
    for row in rows:
        event, restart = row.get("event"), row.get("restart", 0)
        restart = int(restart) if _num(restart) else 0
        t = float(row["time"]) if _num(row.get("time")) else None
        if event == "start" and t is not None:
            up = float(row["startup_s"]) if _num(row.get("startup_s")) else 0.0
            resumed = row.get("resumed_step")
            out.append(Attempt(restart, t - up, up, int(resumed) if _num(resumed) else 0,
                               queued_at=_opt(row, "queued_at"), slurm_start=_opt(row, "slurm_start"),
                               scheduler=row.get("scheduler") if isinstance(row.get("scheduler"), str) else None))
        elif event == "discarded":
            owner = next((a for a in reversed(out) if a.restart == restart), None)
            if owner is not None and _num(row.get("train_s")):
                owner.discarded_s += float(row["train_s"])
        elif event == "end":
            if out:
                out[-1].end_row = row
        elif _num(row.get("step")) and t is not None:
            if not out or (out[-1].restart != restart and not _started(out[-1], row)):
                # a file written before "start" rows: a new restart count is a new attempt
                out.append(Attempt(restart, t - _train_s(row), 0.0, None))
            out[-1].rows.append(row)
    return out


def _started(att: Attempt, row: Row) -> bool:
    """Whether `att` began with a "start" row (then its rows are its own, whatever their restart)."""
    return att.resumed_step is not None or att.startup > 0


def _first_step_excess(att: Attempt) -> float:
    """The first step's time beyond the attempt's median step (compilation, warm-up): start-up."""
    train = [r for r in att.rows if "loss" in r and _num(r.get("step_time"))]
    if len(train) < 3:
        return 0.0
    first = train[0]
    if att.resumed_step is not None and first["step"] != att.resumed_step + 1:
        return 0.0  # the attempt's first step is not among its rows
    return max(0.0, float(first["step_time"]) - statistics.median(float(r["step_time"]) for r in train[1:]))


def job_ledger(rows: Sequence[Row], submitted_at: float | None = None,
               slurm_attempts: Sequence[SlurmAttempt] | None = None) -> tuple[Ledger, list[Ledger]]:
    """(the job's ledger, one per attempt) from its metrics rows; `submitted_at` (the sweep record's,
    local executors) or SLURM's Submit/Start/End of each attempt (`slurm.attempt_times`) give the
    queue waits. Attempt ledgers carry no queue or gap: those lie between attempts."""
    atts = attempts(rows)
    # the last train row written for a step is kept; any earlier one was replayed
    last: dict[float, tuple[int, int]] = {}
    for i, a in enumerate(atts):
        for j, r in enumerate(a.rows):
            if "loss" in r:
                last[r["step"]] = (i, j)
    per: list[Ledger] = []
    for i, a in enumerate(atts):
        led = Ledger(attempts=1, startup=a.startup)
        excess = _first_step_excess(a)
        led.startup += excess
        for j, r in enumerate(a.rows):
            if "loss" in r:
                work = _train_s(r) - (excess if j == _first_train_index(a) else 0.0)
                if last[r["step"]] == (i, j):
                    led.productive += work
                else:
                    led.replayed += work
            led.save += _get(r, "save_blocked_s")
            led.eval += _get(r, "eval_s")
        led.replayed += a.discarded_s
        if a.end_row is not None:  # what no row carried: the last saves, an eval cut short, unlogged steps
            led.save += _get(a.end_row, "save_blocked_s")
            led.eval += _get(a.end_row, "eval_s")
            led.productive += _get(a.end_row, "train_s")
        wall = a.end - a.start
        led.attempt_s = wall
        led.other = max(0.0, wall - (led.total - led.other))
        # a stop of the trainer's own time budget was planned; anything else that ended an attempt early was not
        planned = a.status == "done" or (a.end_row or {}).get("reason") == "time_budget"
        led.interruptions = int(not planned and (a.status is not None or i < len(atts) - 1))
        per.append(led)
    job = sum(per, Ledger())
    job.queue, job.gap = _waits(atts, submitted_at, slurm_attempts)
    return job, per


def _first_train_index(a: Attempt) -> int | None:
    return next((j for j, r in enumerate(a.rows) if "loss" in r), None)


def _waits(atts: list[Attempt], submitted_at: float | None,
           slurm_attempts: Sequence[SlurmAttempt] | None) -> tuple[float, float]:
    """(queue, gap) seconds. SLURM's Submit and Start of each attempt give its queue wait when its
    attempts match ours one to one; else each start row's own times (queued until SLURM started
    it, else until its process started; on a local executor only the first attempt queues: a
    requeue is a restart there, a gap); else
    the first one's Submit, else the record's `submitted_at`, counts for the first attempt that
    started after it."""
    if not atts:
        return 0.0, 0.0
    queue = [0.0] * len(atts)
    sa = list(slurm_attempts or [])
    if not (sa and len(sa) == len(atts)) and any(a.queued_at is not None for a in atts):
        for k, a in enumerate(atts):
            if a.queued_at is not None and (a.scheduler == "slurm" or a.slurm_start is not None or k == 0):
                queue[k] = max(0.0, min(a.slurm_start or a.start, a.start) - a.queued_at)
    elif sa and len(sa) == len(atts):
        for k, (sub, start, _) in enumerate(sa):
            if sub is not None and start is not None:
                queue[k] = max(0.0, min(start, atts[k].start) - sub)
    else:
        sub = sa[0][0] if sa and sa[0][0] is not None else submitted_at
        if sub is not None:
            k = next((k for k, a in enumerate(atts) if a.start >= sub), None)
            if k is not None:
                queue[k] = atts[k].start - sub
    gap = 0.0
    for k in range(1, len(atts)):
        gap += max(0.0, atts[k].start - atts[k - 1].end - queue[k])
    return sum(queue), gap


def run_ledger(run_dir: str | Path, submitted_at: float | None = None,
               slurm_attempts: Sequence[SlurmAttempt] | None = None) -> Ledger | None:
    """The ledger of one run directory; None when it has no metrics rows yet."""
    rows = read_rows(Path(run_dir) / "metrics.jsonl")
    if not rows:
        return None
    return job_ledger(rows, submitted_at, slurm_attempts)[0]


def sweep_ledger(jobs: Mapping[str, Ledger | None]) -> Ledger:
    """The sum over a sweep's jobs (those with no rows yet count nothing)."""
    return sum((led for led in jobs.values() if led is not None), Ledger())


def sweep_mtbi(sweep_dir: str | Path) -> tuple[float, int] | None:
    """(mean time between interruptions in s, interruptions) over a sweep's jobs, from their
    ledgers; None before the sweep has seen an interruption."""
    from launch.paths import child
    from launch.record import SweepRecord

    names = list(SweepRecord(sweep_dir).read())
    total = sweep_ledger({n: run_ledger(child(Path(sweep_dir), n, "job")) for n in names})
    return (total.mtbi_s, total.interruptions) if total.mtbi_s else None


def startup_breakdown(rows: Iterable[Row]) -> tuple[int, dict[str, float]]:
    """(attempts, mean seconds per start-up part over them) from the "start" rows: where start-up goes."""
    starts = [r for r in rows if r.get("event") == "start" and isinstance(r.get("startup"), dict)]
    parts: dict[str, float] = {}
    for r in starts:
        for k, v in r["startup"].items():
            if _num(v):
                parts[k] = parts.get(k, 0.0) + float(v) / len(starts)
    return len(starts), parts


def format_ledger(led: Ledger) -> str:
    """One line: goodput and each bucket's share, e.g. for `status` and the drill's table."""
    total = led.total
    if total <= 0:
        return "goodput -"
    parts = ", ".join(f"{b} {getattr(led, b) / total:.0%}" for b in BUCKETS if getattr(led, b) > 0)
    return (f"goodput {led.goodput:.2f} of {total / 3600:.2f} h ({parts}); {led.attempts} attempt(s), "
            f"{led.interruptions} interruption(s)")
