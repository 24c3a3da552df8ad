"""What `sweep.py status` prints: one line per job, its goodput, and the sweep's ledger.

The records are refreshed by launch/sweep.py (`status_records`); this module only renders them,
with each job's goodput ledger (launch/goodput.py) from its metrics.jsonl, the sweep record's
submission time and, for SLURM jobs, sacct's Submit/Start/End of every attempt (one call).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launch import goodput, record, slurm
from launch.goodput import Ledger
from launch.paths import child


def job_ledgers(sweep_dir: Path, records: list[record.JobRecord]) -> dict[str, Ledger | None]:
    """Each job's goodput ledger (None while it has logged nothing)."""
    ids = [r.job_id for r in records if r.executor == "slurm" and r.job_id]
    times = (slurm.attempt_times(ids) if ids else None) or {}
    return {r.job: goodput.run_ledger(child(sweep_dir, r.job, "job"), r.submitted_at, times.get(r.job_id or ""))
            for r in records}


def count(states: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in states:
        out[s] = out.get(s, 0) + 1
    return out


def _fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def print_table(sweep_dir: Path, records: list[record.JobRecord],
                ledgers: dict[str, Ledger | None] | None = None) -> None:
    """The status table, the messages of jobs that need a look, excluded nodes and the sweep's goodput."""
    ledgers = job_ledgers(sweep_dir, records) if ledgers is None else ledgers
    head = ("#", "JOB", "STATE", "RESTARTS", "STEP", "LOSS", "TOK/S", "GOODPUT", "CHECKPOINT", "JOB ID")
    rows = [head]
    for i, r in enumerate(records):
        led = ledgers.get(r.job)
        rows.append((str(i), r.job, r.state, str(r.restarts), _fmt(r.last_step), _fmt(r.last_loss, ".4f"),
                     _fmt(r.tokens_per_s, ",.0f"), _fmt(led.goodput if led else None, ".2f"), r.checkpoint or "-",
                     r.job_id or "-"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    print(f"sweep {sweep_dir}: " + ", ".join(f"{n} {s}" for s, n in sorted(count([r.state for r in records]).items())))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for r in records:
        if r.message and r.state not in (record.COMPLETED, record.RUNNING, record.PENDING):
            print(f"  {r.job}: {r.message}")
        if r.failure and (r.failures or r.state == record.FAILED):
            print(f"  {r.job}: failure {r.failures}: {r.failure}")
    nodes = record.read_nodes(sweep_dir)
    if excluded := [b for b in nodes.values() if b.excluded]:
        print("  excluded nodes: " + ", ".join(f"{b.host} ({len(b.blames)} blames)" for b in excluded)
              + f" (python launch/sweep.py nodes {sweep_dir})")
    total = goodput.sweep_ledger(ledgers)
    if total.total > 0:
        print(f"  sweep {goodput.format_ledger(total)}")


def print_json(sweep_dir: Path, records: list[record.JobRecord]) -> None:
    """One JSON object per job: its record, and its ledger under "goodput" (null before any row)."""
    ledgers = job_ledgers(sweep_dir, records)
    for r in records:
        led = ledgers.get(r.job)
        print(json.dumps({**vars(r), "goodput": led.as_dict() if led else None}))
