"""metrics.jsonl on disk: exactly one row per step and kind, however often a run restarts.

Rank 0 appends one JSON object a line (gpt2/logs.py). Two kinds of line:
- step rows: they have "step" (train rows, eval rows), "restart" (the attempt that wrote them)
  and "time";
- event rows: an "event" name (this module's "discarded", other modules' own), and no "step"
  (one that has a "step" all the same is still an event row: kept).

An attempt that dies between checkpoints leaves rows for steps after the checkpoint it will be
resumed from; the next attempt trains those steps again. Before it writes anything, it calls
`discard_replayed(path, N)` with N its resumed step (0 for a fresh start): the step rows with
step > N leave the file and one summary row per restart that wrote them takes their place,

    {"event": "discarded", "restart": R, "steps": [first, last], "train_s": S, "time": T}

(first and last: the lowest and highest step of the rows dropped; S: the sum of their
"train_s" (else "step_time"), the training those steps cost, now thrown away; T: when the rewrite happened).
So the file holds one value per step, the one of the attempt that committed it, and what the
interruptions cost stays readable (launch/drill_plan.py, the goodput ledger). Event rows are
always kept; a line that does not parse (the torn last line of a killed writer) is dropped.

The rewrite is atomic: the new text goes to `.metrics.jsonl.tmp`, is fsynced and renamed over
the old file (and the directory fsynced), so a crash at any point leaves the old file or the new
one, and a stale temporary file is simply overwritten by the next rewrite. Nothing changes when
there is nothing to drop. This module imports neither torch nor W&B.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2 import strict_json
from gpt2.errors import UserError
from gpt2.safe_write import write_atomic

Row = dict[str, Any]
DISCARDED = "discarded"  # the "event" of a summary row


@dataclass
class Rewrite:
    """What `discard_replayed` found: the lines kept (file order) with their step (None: an event
    row), the summary rows it appended (empty: nothing was dropped) and how many unreadable lines
    it dropped."""

    kept: list[tuple[float | None, str]] = field(default_factory=list)
    discarded: list[Row] = field(default_factory=list)
    unreadable: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.discarded or self.unreadable)

    def rows_after(self, step: float) -> list[Row]:
        """The kept step rows of steps after `step`, parsed, in file order."""
        out = []
        for s, line in self.kept:
            if s is not None and s > step and (row := _parse(line)) is not None:
                out.append(row)
        return out


def _parse(line: str) -> Row | None:
    try:
        row = strict_json.loads(line, nonfinite=True)  # a diverged loss is NaN
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def json_rows(text: str) -> list[Row]:
    """The JSON-object rows of a metrics.jsonl's text, in order; a line that does not parse (torn
    by a killed writer, or being written now) or is not an object is skipped."""
    return [row for row in map(_parse, text.splitlines()) if row is not None]


def is_step_row(row: Row) -> bool:
    step = row.get("step")
    return isinstance(step, int | float) and not isinstance(step, bool) and math.isfinite(step) and "event" not in row


def _restart(row: Row) -> int:
    """The attempt that wrote a row (0 when a damaged row does not say as a count)."""
    r = row.get("restart", 0)
    return r if isinstance(r, int) and not isinstance(r, bool) and r >= 0 else 0


_STEP_PREFIX = '{"step": '  # how gpt2/logs.py writes a step row: "step" first


def line_step(line: str) -> tuple[float | None, Row | None, bool]:
    """(step, row, readable) of one line. A step row as we write it is read from its first key
    alone (100,000 rows in about 0.1 s instead of 1 s: start-up time counts); any other line is
    parsed whole, and `row` is then returned too."""
    if line.startswith(_STEP_PREFIX) and line.endswith("}") and '"event": ' not in line:
        end = line.find(",", len(_STEP_PREFIX))
        try:
            return int(line[len(_STEP_PREFIX):end]), None, True
        except ValueError:
            pass
    row = _parse(line)
    if row is None:
        return None, None, False
    return (row["step"] if is_step_row(row) else None), row, True


def summarize(dropped: list[Row], now: float) -> list[Row]:
    """One "discarded" row per restart among `dropped` (in the order restarts first appear)."""
    by_restart: dict[int, list[Row]] = {}
    for row in dropped:
        by_restart.setdefault(_restart(row), []).append(row)
    out = []
    for restart, rows in by_restart.items():
        steps = [int(r["step"]) for r in rows]  # finite (is_step_row)
        # "train_s": the seconds since the previous train row (it covers the unlogged steps between
        # rows when log_interval > 1); rows written before it existed have only their own step_time
        train_s = sum(float(r.get("train_s", r.get("step_time"))) for r in rows
                      if isinstance(r.get("train_s", r.get("step_time")), int | float))
        out.append({"event": DISCARDED, "restart": restart, "steps": [min(steps), max(steps)],
                    "train_s": round(train_s, 6), "time": round(now, 3)})
    return out


def discard_replayed(path: Path, resumed_step: int, now: Callable[[], float] = time.time) -> Rewrite:
    """Drop the step rows after `resumed_step` from the metrics file at `path`, appending one
    "discarded" row per restart that wrote them; atomic (see the module docstring). A missing
    file is no error (nothing was logged yet)."""
    if path.exists() and not path.is_file():  # a FIFO would block the start for ever
        raise UserError(f"{path} is not a regular file: move it away (the run writes its metrics there)")
    try:
        text = path.read_text(errors="replace")  # a damaged byte spoils its line, not the start
    except FileNotFoundError:
        return Rewrite()
    out = Rewrite()
    dropped: list[Row] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        step, row, readable = line_step(line)
        if readable and step is not None and step > resumed_step and row is None:
            row = _parse(line)  # read from its first key: the whole line must parse to summarize it
            readable = row is not None and is_step_row(row)
        if not readable:
            out.unreadable += 1
        elif step is not None and step > resumed_step:
            dropped.append(row)
        else:
            out.kept.append((step, line))
    out.discarded = summarize(dropped, now()) if dropped else []
    if out.changed:
        lines = [line for _, line in out.kept] + [json.dumps(r) for r in out.discarded]
        atomic_write(path, "".join(line + "\n" for line in lines))
    return out


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` by `text`: temporary file, fsync, rename, fsync of the directory."""
    write_atomic(path, text, tmp=path.with_name(f".{path.name}.tmp"))
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
