"""`sweep.py status`: the records brought up to date, then one line per job, its goodput, and the
sweep's ledger.

`refresh` brings the sweep record up to date from each run's state.json and metrics, one squeue
call and sacct for SLURM jobs that left the queue (`status_records` also writes it back when its
lock is free); the table renders them with each job's goodput ledger (launch/goodput.py) from its metrics.jsonl, the sweep record's
submission time and, for SLURM jobs, sacct's Submit/Start/End of every attempt (one call).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpt2.errors import ArgumentParser, UserError
from launch import executors as ex
from launch import goodput, intent, record, slurm
from launch.advance import rung_lines
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


# ---- refreshing the records ------------------------------------------------------------------

_QUEUE_TO_STATE = {"CONFIGURING": record.RUNNING, "COMPLETING": record.RUNNING, "REQUEUE_HOLD": record.REQUEUED,
                   "REQUEUE_FED": record.REQUEUED, "PREEMPTED": record.REQUEUED, "RESIZING": record.RUNNING}
_WAITING_AGAIN = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})
_ACCT_TO_STATE = {"OUT_OF_MEMORY": record.FAILED, "NODE_FAIL": record.FAILED, "BOOT_FAIL": record.FAILED,
                  "DEADLINE": record.TIMEOUT, "PREEMPTED": record.FAILED, "REQUEUED": record.REQUEUED}


def refresh(sweep_dir: Path, records: dict[str, record.JobRecord],
            queue: Callable[[], dict[str, tuple[str, str]] | None] = slurm.queue_states) -> list[str]:
    """Bring records up to date from each run's state.json, metrics and checkpoints, one squeue
    call, and sacct (when accounting exists) for SLURM jobs that left the queue. Returns warnings."""
    warnings: list[str] = []
    states: dict[str, record.RunState | None] = {}
    for name in records:
        states[name], problem = record.read_state_checked(child(sweep_dir, name, "job"))
        if problem:
            warnings.append(problem)
    # FAILED too: a rank may have written it while SLURM requeued the job itself (NODE_FAIL)
    slurm_active = [r for r in records.values() if r.executor == "slurm"
                    and (states[r.job].state if states[r.job] else r.state) in record.ACTIVE | {record.FAILED}]
    q = queue() if slurm_active else {}
    if q is None:
        warnings.append("squeue failed: SLURM states may be stale")
    gone: list[record.JobRecord] = []
    for rec in records.values():
        run_dir = child(sweep_dir, rec.job, "job")
        st = states[rec.job]
        row = record.last_metrics(run_dir, skipped=warnings)
        if row:
            rec.last_step, rec.last_loss = row.get("step", rec.last_step), row.get("loss", rec.last_loss)
            rec.tokens_per_s = row.get("tokens_per_s", rec.tokens_per_s)
        rec.checkpoint = record.latest_checkpoint(rec.checkpoint_dir or run_dir / "checkpoints") or rec.checkpoint
        if st is None:
            continue
        rec.restarts, rec.message = st.restarts, st.message
        rec.failures, rec.failure = st.failures, record.failure_line(st.last_failure)
        state = st.state
        if state == record.FAILED and rec.executor == "slurm" and q and rec.job_id in q \
                and q[rec.job_id][0] in _WAITING_AGAIN:
            state = record.REQUEUED  # SLURM still holds it: never shown FAILED (a user would resubmit it)
            rec.message = f"requeued by SLURM ({q[rec.job_id][0].lower()}); the last attempt: {st.message}"
        elif state in record.FINAL:
            pass  # the job's own word wins, even while SLURM still shows it COMPLETING
        elif rec.executor == "slurm" and q is not None:
            if rec.job_id in q:
                qs = q[rec.job_id][0]
                state = _QUEUE_TO_STATE.get(qs, qs)
                # it ran and waits again: requeued (by the job, or by SLURM itself after NODE_FAIL)
                if state == record.PENDING and (st.state in (record.REQUEUED, record.RUNNING) or st.restarts > 0):
                    state = record.REQUEUED
            else:
                gone.append(rec)
        elif rec.executor == "local" and not ex.local_alive(rec.job_id, sweep_dir):
            state = record.FAILED
            rec.message = rec.message or "the local controller exited without a final state: see the logs"
        rec.state = state
    if gone:
        acct = slurm.accounting_states([r.job_id for r in gone if r.job_id]) or {}
        for rec in gone:
            a = acct.get(rec.job_id or "")
            if a:
                rec.state = _ACCT_TO_STATE.get(a, a)
                if a == "NODE_FAIL":
                    rec.message = f"a node failed (NODE_FAIL) and SLURM did not requeue it; {rec.message or ''}".rstrip("; ")
            else:
                rec.state = record.FAILED
                rec.message = ("left the queue without a final state (scancel outside the launcher, node failure "
                               "or the time limit): see the logs")
    return warnings


def warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def status_records(sweep_dir: Path) -> list[record.JobRecord]:
    """Refreshed records; the sweep record is rewritten when its lock is free within a second
    (never for a read-only, archived sweep: it is only read)."""
    warn(record.check_sweep_dir(sweep_dir))
    m = record.SweepRecord(sweep_dir)
    with m.try_locked(1.0) as locked:
        records = m.read()
        problems, recovered = [], False
        if locked:  # a submission killed half-way: show (and record) the jobs it started
            try:
                problems = intent.recover(sweep_dir, records)[1]
                recovered = True
            except UserError as exc:
                problems = [str(exc)]
        warn(m.skipped + problems + refresh(sweep_dir, records))
        if locked:
            m.write(records)
            if recovered:
                intent.end(sweep_dir)
    return list(records.values())


def cmd_status(argv: list[str]) -> int:
    p = ArgumentParser(prog="launch/sweep.py status")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--json", action="store_true", help="one JSON object per job instead of the table")
    args = p.parse_args(argv)
    records = status_records(args.sweep_dir)
    if args.json:
        print_json(args.sweep_dir, records)
    else:
        print_table(args.sweep_dir, records)
        print("".join(f"{line}\n" for line in rung_lines(args.sweep_dir)), end="")  # an early-stopping sweep's rungs (launch/advance.py)
    return 0
