"""Failures of a job's attempt, judged: requeue or not, by which rule, and whom to blame.

Pure decisions over the failure reports that gpt2.watchdog writes per rank and attempt
(`<run>/failures/restart<R>-rank<K>.json`) and the previous failure kept in state.json; the
wiring (claiming the decision, recording it, requeueing) is in launch/job.py.
"""

from __future__ import annotations

import re
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2.watchdog import read_failures

TRANSIENT_KINDS = frozenset({"hang", "peer_lost", "comm_error", "storage_error", "preflight", "node_fail"})
# the shared file system failed, not the node: excluding nodes for it would only shrink the pool
UNBLAMED_KINDS = frozenset({"storage_error"})
# CUDA errors that name the hardware; a "device-side assert" is the program's own (deterministic)
_HARDWARE = re.compile(r"\bECC\b|\bXid\b|uncorrectable", re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    """What to do after a failure: requeue or not, and the rule that decided (shown by status)."""

    requeue: bool
    rule: str
    counted: bool = False  # counted against max_failures
    blame: bool = False  # an infrastructure failure: its hosts are blamed


def judge(failure: dict[str, Any], previous: dict[str, Any] | None, failures: int, max_failures: int,
          bad_input: bool = False) -> Verdict:
    """Requeue or not after `failure` (the first failure report of this attempt), given the previous
    failed attempt's cause (`previous`, from state.json) and the `failures` counted before this one.

    Rules, first match wins:
    - bad input (exit 2): never requeued;
    - a transient infrastructure failure (hang, lost peer, communication error, NODE_FAIL, failed
      preflight, a CUDA error that names the hardware, a storage error): requeued while the count
      stays within `max_failures`, and its hosts are blamed (not for a storage error: the file
      system is shared);
    - a Python exception with the same type at the same step as the previous failed attempt's:
      deterministic, never requeued;
    - any other exception: requeued once more to tell (counted, nobody blamed).
    """
    if bad_input:
        return Verdict(False, "bad input")
    kind = str(failure.get("kind") or "exception")
    exc_type, step = failure.get("exc_type") or "exception", failure.get("step")
    text = f"{failure.get('exc_type') or ''} {failure.get('message') or ''}"
    if kind in TRANSIENT_KINDS:
        label, blame = kind.replace("_", " ") if kind != "node_fail" else "NODE_FAIL", kind not in UNBLAMED_KINDS
    elif _HARDWARE.search(text):
        label, blame = f"hardware error ({exc_type})", True
    elif previous is not None and previous.get("kind") == "exception" and previous.get("exc_type") == exc_type \
            and previous.get("step") == step:
        return Verdict(False, f"deterministic: same {exc_type} at step {step} twice")
    else:
        label, blame = f"{exc_type} at step {step}, not seen before", False
    n = failures + 1
    if n > max_failures:
        return Verdict(False, f"max_failures reached: {label} ({n}/{max_failures})", True, blame)
    return Verdict(True, f"transient: {label} ({n}/{max_failures})", True, blame)


def attempt_failures(run_dir: str | Path, restart: int, since: float = 0.0) -> list[dict[str, Any]]:
    """The failure reports of attempt `restart` (gpt2.watchdog's files), earliest first, without the
    reports older than `since` (a resubmitted job starts again at the same restart count)."""
    return [r for r in read_failures(run_dir, restart)
            if isinstance(r.get("kind"), str) and float(r["time"]) >= since]


def failure_from_exception(exc: BaseException, rank: int, restart: int, step: int | None,
                           when: float) -> dict[str, Any]:
    """A report for an exception that came with none (the trainer could not write one)."""
    return {"kind": "exception", "rank": rank, "host": socket.gethostname(), "restart": restart,
            "time": when, "step": step, "blamed_rank": rank, "blamed_host": socket.gethostname(),
            "exc_type": type(exc).__name__, "message": (str(exc).strip().splitlines() or [""])[0][:300],
            "traceback": "".join(traceback.format_exception(exc))}


def blamed_hosts(failure: dict[str, Any]) -> list[str]:
    """The hosts a failure points at: the report's blamed host, else where it happened."""
    hosts = failure.get("hosts") or [failure.get("blamed_host") or failure.get("host")]
    return [h for h in hosts if isinstance(h, str) and h]


def summary(failure: dict[str, Any], verdict: Verdict, restart: int, hosts: list[str]) -> dict[str, Any]:
    keys = ("kind", "rank", "host", "step", "exc_type", "message")
    return {**{k: failure.get(k) for k in keys}, "rule": verdict.rule, "restart": restart, "hosts": hosts}
