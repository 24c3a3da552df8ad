"""The sweep's record (`record.jsonl`, one line per job), `sweep.json` and each run's `state.json`.

    <sweep>/sweep.json         what was submitted: experiment, cluster, executor, resources
    <sweep>/record.jsonl       the sweep record: one JSON line per job, rewritten atomically under a file lock
    <sweep>/logs/<job id>/     submitit's pickles and per-rank stdout/stderr
    <sweep>/code/<hash>/       the code snapshot jobs run (a requeued job runs what was submitted)
    <sweep>/<job>/             the run: config.yaml, metrics.jsonl, checkpoints/, state.json

`state.json` is written by the job itself (launch/job.py: RUNNING, REQUEUED, COMPLETED, ...) and
by the launcher at submission (PENDING) and cancellation. States use SLURM's words for local
jobs too. Readers never need the lock: every file is replaced atomically.

"Record" is the sweep's word; "manifest" is the checkpoint's (`MANIFEST.json`, gpt2/checkpoint.py).
Sweeps written before the rename keep their record in `manifest.jsonl`: it is read when
`record.jsonl` is absent, and the first write under the lock moves it to `record.jsonl`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from gpt2.errors import UserError

RECORD = "record.jsonl"
LEGACY_RECORD = "manifest.jsonl"  # sweeps written before the rename
SWEEP_META = "sweep.json"
STATE = "state.json"

PENDING, RUNNING, REQUEUED = "PENDING", "RUNNING", "REQUEUED"
COMPLETED, FAILED, CANCELLED, TIMEOUT = "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"
ACTIVE = frozenset({PENDING, RUNNING, REQUEUED})
FINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMEOUT})
RETRYABLE = frozenset({FAILED, TIMEOUT})  # a new submission of the sweep submits these again


@dataclass
class JobRecord:
    """One line of the sweep record."""

    job: str
    overrides: list[str]
    config_hash: str
    executor: str | None = None
    job_id: str | None = None  # SLURM "123" or "123_4"; local: the controller's pid
    array_index: int | None = None
    state: str = PENDING
    restarts: int = 0
    last_step: int | None = None
    last_loss: float | None = None
    tokens_per_s: float | None = None
    checkpoint: str | None = None  # the newest committed checkpoint's directory name
    checkpoint_dir: str | None = None  # when not <run>/checkpoints
    message: str | None = None
    submissions: int = 0
    submitted_at: float | None = None
    snapshot: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class SweepRecord:
    """`<sweep>/record.jsonl`; mutate it only inside `locked()`."""

    def __init__(self, sweep_dir: str | Path):
        self.dir = Path(sweep_dir)
        self.path = self.dir / RECORD
        self.legacy_path = self.dir / LEGACY_RECORD
        self._lock = FileLock(str(self.path) + ".lock")

    def exists(self) -> bool:
        return self.path.is_file() or self.legacy_path.is_file()

    def _source(self) -> Path:
        return self.path if self.path.is_file() or not self.legacy_path.is_file() else self.legacy_path

    @contextlib.contextmanager
    def locked(self, timeout: float = 120.0) -> Iterator[SweepRecord]:
        """Hold the sweep's lock; UserError when another submission holds it longer than `timeout`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            with self._lock.acquire(timeout=timeout):
                yield self
        except Timeout:
            raise UserError(f"{self.path}.lock is held by another submission for over {timeout:.0f} s: "
                            f"wait for it, or remove the lock file if no launcher is running") from None

    def try_locked(self, timeout: float) -> contextlib.AbstractContextManager[bool]:
        """Like locked() but yields False instead of raising when the lock stays busy."""

        @contextlib.contextmanager
        def cm() -> Iterator[bool]:
            try:
                self._lock.acquire(timeout=timeout)
            except Timeout:
                yield False
                return
            try:
                yield True
            finally:
                self._lock.release()

        return cm()

    def read(self) -> dict[str, JobRecord]:
        """Job records by name, in submission order (empty when there is no record yet)."""
        path = self._source()
        if not path.is_file():
            return {}
        out: dict[str, JobRecord] = {}
        for line in path.read_text().splitlines():
            if line.strip():
                rec = JobRecord.from_dict(json.loads(line))
                out[rec.job] = rec
        return out

    def write(self, records: dict[str, JobRecord] | list[JobRecord]) -> None:
        """Replace the record atomically; call under locked(). A legacy `manifest.jsonl` is removed."""
        recs = list(records.values()) if isinstance(records, dict) else list(records)
        atomic_write(self.path, "".join(r.to_json() + "\n" for r in recs))
        self.legacy_path.unlink(missing_ok=True)

    def update(self, job: str, timeout: float = 30.0, **fields: Any) -> bool:
        """Set fields of one job's line under the lock; False if the lock stayed busy or the job is unknown."""
        with self.try_locked(timeout) as ok:
            if not ok:
                return False
            records = self.read()
            if job not in records:
                return False
            for k, v in fields.items():
                setattr(records[job], k, v)
            self.write(records)
            return True


# ---- sweep.json ------------------------------------------------------------------------------


def write_sweep_meta(sweep_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write(sweep_dir / SWEEP_META, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_sweep_meta(sweep_dir: Path) -> dict[str, Any]:
    path = Path(sweep_dir) / SWEEP_META
    if not path.is_file() or not SweepRecord(sweep_dir).exists():
        raise UserError(f"{sweep_dir} is not a sweep directory (no {SWEEP_META}/{RECORD}): "
                        f"pass a directory that `make submit` printed, e.g. runs/<experiment>")
    return json.loads(path.read_text())


# ---- state.json ------------------------------------------------------------------------------


@dataclass
class RunState:
    """A run's own record, kept across requeues. Time-outs and preemptions are counted apart."""

    state: str = PENDING
    job_id: str | None = None
    executor: str | None = None
    restarts: int = 0
    timeouts: int = 0
    preemptions: int = 0
    step: int | None = None
    loss: float | None = None
    reason: str | None = None  # why the last attempt stopped: USR2 | SIGTERM | time_budget
    message: str | None = None
    cancel_requested: bool = False
    host: str | None = None
    updated: float = field(default_factory=time.time)


def read_state(run_dir: str | Path) -> RunState | None:
    path = Path(run_dir) / STATE
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    known = {f.name for f in dataclasses.fields(RunState)}
    return RunState(**{k: v for k, v in raw.items() if k in known})


def write_state(run_dir: str | Path, st: RunState) -> None:
    st.updated = time.time()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(run_dir) / STATE, json.dumps(dataclasses.asdict(st), indent=1) + "\n")


def update_state(run_dir: str | Path, **fields: Any) -> RunState:
    """Read-modify-write of state.json (single writer at a time by construction: see module doc)."""
    st = read_state(run_dir) or RunState()
    for k, v in fields.items():
        setattr(st, k, v)
    write_state(run_dir, st)
    return st


# ---- what a run has produced -----------------------------------------------------------------


def last_metrics(run_dir: str | Path, tail_bytes: int = 16384) -> dict[str, Any]:
    """The newest training line of metrics.jsonl (step, loss, tokens_per_s), reading only its tail."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a partial first line of the tail, or a line being written
        if isinstance(row, dict) and "loss" in row:
            return row
    return {}


def latest_checkpoint(ckpt_dir: str | Path) -> str | None:
    try:
        return (Path(ckpt_dir) / "latest").read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
