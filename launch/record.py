"""The sweep's record (`record.jsonl`, one line per job), `sweep.json` and each run's `state.json`.

    <sweep>/sweep.json         what was submitted: experiment, cluster, executor, resources
    <sweep>/record.jsonl       the sweep record: one JSON line per job, rewritten atomically under a file lock
    <sweep>/nodes.json         hosts blamed for failures; blamed twice: excluded from the sweep's later jobs
    <sweep>/logs/<job id>/     submitit's pickles and per-rank stdout/stderr
    <sweep>/code/<hash>/       the code snapshot jobs run (a requeued job runs what was submitted)
    <sweep>/<job>/             the run: config.yaml, metrics.jsonl, checkpoints/, state.json

`state.json` is written by the job itself (launch/job.py: RUNNING, REQUEUED, COMPLETED, ...) and
by the launcher at submission (PENDING) and cancellation. States use SLURM's words for local
jobs too. Readers never need the lock: every file is replaced atomically.

"Record" is the sweep's word; "manifest" is the checkpoint's (`MANIFEST.json`, gpt2/checkpoint/manager.py).
A damaged file never locks a sweep: a record line, `sweep.json` or `state.json` that does not
parse (or holds a field of the wrong type) and a metrics row without numbers are skipped, and
the readers say what they skipped, so `status`, `cancel`, `resubmit` and `logs` keep working.
Damaged record lines are written back as they were, never silently dropped.

Sweeps written before the rename keep their record in `manifest.jsonl`: it is read when
`record.jsonl` is absent, and the first write under the lock moves it to `record.jsonl`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import Timeout

from gpt2 import safe_read, safe_write, strict_json
from gpt2.errors import UserError
from launch import slurm
from launch.paths import PLAIN_NAME

RECORD = "record.jsonl"
MAX_NAME_BYTES = 255  # a file name, on every file system a run directory lives on
LEGACY_RECORD = "manifest.jsonl"  # sweeps written before the rename
SWEEP_META = "sweep.json"
STATE = "state.json"

PENDING, RUNNING, REQUEUED = "PENDING", "RUNNING", "REQUEUED"
COMPLETED, FAILED, CANCELLED, TIMEOUT = "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"
STOPPED_EARLY = "STOPPED_EARLY"  # cut by a sweep's search (launch/asha.py); checkpoint kept, resumable by hand
ACTIVE = frozenset({PENDING, RUNNING, REQUEUED})
FINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMEOUT, STOPPED_EARLY})
RETRYABLE = frozenset({FAILED, TIMEOUT})  # a new submission of the sweep submits these again


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field annotated `annotation` (the few kinds these records use)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        return "None" in kinds
    for kind in kinds:
        if kind == "bool" and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue
        if (kind == "int" and isinstance(value, int)) or (kind == "float" and isinstance(value, int | float)) \
                or (kind == "str" and isinstance(value, str)) \
                or (kind == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value)) \
                or (kind == "dict[str, Any]" and isinstance(value, dict)):
            return True
    return False


EXECUTORS = ("slurm", "local", "debug")


class DamagedSweepFile(UserError):
    """A file of the sweep that cannot be what its writer wrote: shown as a line where it can be."""
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")  # any executor's: a pid, DEBUG_..., never an option


def job_id_problem(executor: Any, job_id: Any) -> str | None:
    """Why `job_id` cannot be a job id of `executor` (it would reach scancel or kill), or None."""
    if job_id is None:
        return None
    pattern = slurm.JOB_ID if executor in ("slurm", "local") else JOB_ID  # local: the controller's pid
    if not isinstance(job_id, str) or not pattern.fullmatch(job_id):
        return f"'job_id' {json.dumps(job_id)[:40]} is not a job id of the {executor} executor"
    return None


def _values_problem(raw: dict[str, Any]) -> str | None:
    """What the types allow but a record never holds: an unknown executor, an id that is no id,
    a job name that is no plain name (it becomes a path), a negative count."""
    executor = raw.get("executor")
    if executor is not None and executor not in EXECUTORS:
        return f"'executor' {json.dumps(executor)[:40]} is not one of {', '.join(EXECUTORS)}"
    if (problem := job_id_problem(executor, raw.get("job_id"))) is not None:
        return problem
    if "job" in raw and not PLAIN_NAME.fullmatch(raw["job"]):
        return f"'job' {json.dumps(raw['job'])[:40]} is not a plain name"
    if "job" in raw and len(raw["job"].encode()) > MAX_NAME_BYTES:  # its run directory could not exist
        return f"'job' {json.dumps(raw['job'])[:40]}... is longer than a file name can be ({MAX_NAME_BYTES} bytes)"
    for key in ("restarts", "failures", "submissions", "timeouts", "preemptions"):
        if isinstance(raw.get(key), int) and raw[key] < 0:
            return f"'{key}' is {raw[key]}, not a count"
    return None


def shape_problem(cls: type, raw: Any) -> str | None:
    """Why `raw` (parsed JSON) cannot be a `cls`, or None when it can."""
    if not isinstance(raw, dict):
        return f"a JSON {type(raw).__name__}, not an object"
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                return f"no '{f.name}'"
        elif not _type_ok(raw[f.name], str(f.type)):
            return f"'{f.name}' is {json.dumps(raw[f.name])[:40]}, not {f.type}"
    return _values_problem(raw)


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
    failures: int = 0  # infrastructure failures counted against max_failures
    failure: str | None = None  # the last failure in one line: where, what, and the rule that decided
    submissions: int = 0
    submitted_at: float | None = None
    snapshot: str | None = None

    def to_json(self) -> str:
        return json.dumps(vars(self), sort_keys=False)  # flat: no nested dataclass to convert

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
        self._lock = safe_write.file_lock(self.dir / (RECORD + ".lock"))
        self.skipped: list[str] = []  # what the last read() could not use, one message per line
        self._damaged: list[str] = []  # those lines as they were, written back by write()
        self._text_read: str | None = None  # the file as read() found it: write() skips an identical one

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
            # flock locks die with their holder, so a busy lock means a live process: never advise removing it
            raise UserError(f"{self.path}.lock is held by another launcher or job of this sweep for over "
                            f"{timeout:.0f} s: wait for it and try again (the lock frees itself when "
                            f"that process exits)") from None

    def try_locked(self, timeout: float) -> contextlib.AbstractContextManager[bool]:
        """Like locked() but yields False instead of raising when the lock stays busy or cannot be
        taken at all (a read-only, archived sweep: reading it needs no lock)."""

        @contextlib.contextmanager
        def cm() -> Iterator[bool]:
            try:
                self._lock.acquire(timeout=timeout)
            except (Timeout, OSError):
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
        self.skipped, self._damaged, self._text_read = [], [], None
        if not path.is_file():
            return {}
        out: dict[str, JobRecord] = {}
        text = path.read_text(errors="replace")
        self._text_read = text if path == self.path else None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = strict_json.loads(line)
            except json.JSONDecodeError as exc:
                problem: str | None = f"not JSON ({exc.msg})"
            else:
                problem = shape_problem(JobRecord, raw)
                if problem is None and not _may_hold_a_run(self.dir / raw["job"]):
                    problem = f"'job' {json.dumps(raw['job'])[:40]} names a file of the sweep, not a run directory"
            if problem is not None:
                self.skipped.append(f"{path} line {n}: {problem}; skipped it (fix or remove that line)")
                self._damaged.append(line)
                continue
            rec = JobRecord.from_dict(raw)
            out[rec.job] = rec
        return out

    def write(self, records: dict[str, JobRecord] | list[JobRecord]) -> None:
        """Replace the record atomically; call under locked(). A legacy `manifest.jsonl` is removed."""
        recs = list(records.values()) if isinstance(records, dict) else list(records)
        lines = [r.to_json() for r in recs] + self._damaged  # damaged lines stay for a person to see
        text = "".join(line + "\n" for line in lines)
        if text == self._text_read and not self.legacy_path.exists():
            return  # nothing changed (status, mostly): no write, no fsync
        atomic_write(self.path, text)
        self._text_read = text
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


def _may_hold_a_run(path: Path) -> bool:
    """Whether `path` is a run directory or can become one (nothing there yet): not sweep.json,
    record.jsonl or any other file a damaged record line could name."""
    return os.path.isdir(path) or not os.path.lexists(path)


def _must_be_sweep(sweep_dir: Path) -> None:
    """UserError (one line) unless `sweep_dir` holds a sweep record that is a regular file."""
    if SweepRecord(sweep_dir).exists():
        return
    if os.path.lexists(Path(sweep_dir) / RECORD):  # a FIFO, a device, a dangling link, a directory
        raise UserError(f"{Path(sweep_dir) / RECORD} is not a regular file (a FIFO, a device or a broken link?): "
                        "restore the sweep's record from a backup")
    raise UserError(f"{sweep_dir} is not a sweep directory (no {RECORD}): "
                    f"pass a directory that `make submit` printed, e.g. runs/<experiment>")


def check_sweep_dir(sweep_dir: Path) -> list[str]:
    """UserError unless `sweep_dir` holds a sweep record; warnings when its sweep.json is damaged
    (what status, cancel and logs need is in the record and the runs)."""
    _must_be_sweep(sweep_dir)
    try:
        read_sweep_meta(sweep_dir)
    except UserError as exc:
        return [str(exc)]
    return []


def read_sweep_meta(sweep_dir: Path) -> dict[str, Any]:
    """sweep.json; UserError (one line) when the directory is no sweep or the file is damaged."""
    path = Path(sweep_dir) / SWEEP_META
    _must_be_sweep(sweep_dir)
    fix = "restore it, or submit the experiment again (`python launch/sweep.py jobs/X.yaml --name NAME`)"
    try:
        meta = strict_json.loads(safe_read.read_text(path))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {fix}") from None
    except OSError as exc:  # a directory, a FIFO, /dev/zero under its name
        raise UserError(f"{path} is damaged (unreadable: {exc.strerror or exc}): {fix}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is damaged (not JSON: {exc.msg}): {fix}") from None
    missing = [k for k in ("name", "executor", "cluster", "resources") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{path} is damaged (no {', '.join(missing)}): {fix}")
    if meta["executor"] not in EXECUTORS:  # a job "submitted" to an executor that does not exist never runs
        raise UserError(f"{path} is damaged (executor {json.dumps(meta['executor'])[:40]} is not one of "
                        f"{', '.join(EXECUTORS)}): {fix}")
    return meta


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
    stop_save_s: float | None = None  # the last stop: seconds from its request to its committed checkpoint
    message: str | None = None
    cancel_requested: bool = False
    host: str | None = None
    failures: int = 0  # infrastructure failures counted against max_failures (launch/job.py:judge)
    # The cause of the last failed attempt: kind, rank, host, step, exc_type, message, rule, restart,
    # hosts (blamed). `first_failure` is the run's first one, with its traceback.
    last_failure: dict[str, Any] | None = None
    first_failure: dict[str, Any] | None = None
    updated: float = field(default_factory=time.time)


def failure_line(f: dict[str, Any] | None) -> str | None:
    """One line for a failure: kind, rank and host, step, the traceback's last line, the rule."""
    if not f:
        return None
    where = f"rank {f.get('rank')}" if f.get("rank") is not None else "the job"
    if f.get("host"):
        where += f" on {f['host']}"
    step = f" at step {f['step']}" if f.get("step") is not None else ""
    tb = [ln.strip() for ln in str(f.get("traceback") or "").splitlines() if ln.strip()]
    what = tb[-1] if tb else (f"{f['exc_type']}: " if f.get("exc_type") else "") + str(f.get("message") or "")
    hosts = f.get("hosts") if isinstance(f.get("hosts"), list) else []  # a damaged state.json's: shown as text
    hosts = f"; blamed {','.join(map(str, hosts))}" if hosts else ""
    return " ".join(f"{f.get('kind')} on {where}{step}: {what[:200]}{hosts}; rule: {f.get('rule')}".split())


def read_state(run_dir: str | Path) -> RunState | None:
    """The run's state, or None when there is none or it is damaged (see `read_state_checked`)."""
    return read_state_checked(run_dir)[0]


def read_state_checked(run_dir: str | Path) -> tuple[RunState | None, str | None]:
    """(state or None, what was wrong with a damaged state.json or None)."""
    path = Path(run_dir) / STATE
    try:
        raw = strict_json.loads(safe_read.read_text(path))
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except IsADirectoryError:
        return None, f"{path}: a directory, not a file; ignored it"
    except OSError as exc:  # a FIFO or a device under its name
        return None, f"{path}: unreadable ({exc.strerror or exc}); ignored it"
    except json.JSONDecodeError as exc:
        return None, f"{path}: not JSON ({exc.msg}); ignored it"
    problem = shape_problem(RunState, raw)
    if problem is not None:
        return None, f"{path}: {problem}; ignored it"
    known = {f.name for f in dataclasses.fields(RunState)}
    return RunState(**{k: v for k, v in raw.items() if k in known}), None


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


def last_metrics(run_dir: str | Path, tail_bytes: int = 16384, skipped: list[str] | None = None) -> dict[str, Any]:
    """The newest training line of metrics.jsonl (step, loss, tokens_per_s), reading only its tail.
    A row whose step, loss or tokens_per_s is not a number is passed over (noted in `skipped`)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:  # a FIFO there must not block status, nor /dev/zero fill its memory
        with safe_read.open_regular(path) as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            lines = f.read(tail_bytes).decode(errors="replace").splitlines()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if skipped is not None:
            skipped.append(f"{path}: unreadable ({exc.strerror or exc}); its progress is not shown")
        return {}
    for line in reversed(lines):
        try:
            row = strict_json.loads(line, nonfinite=True)
        except json.JSONDecodeError:
            continue  # a partial first line of the tail, or a line being written
        if isinstance(row, dict) and "loss" in row:
            bad = [k for k in ("step", "loss", "tokens_per_s") if k in row and not _type_ok(row[k], "float")]
            if not bad:
                return row
            if skipped is not None:
                skipped.append(f"{path}: a row with a non-number {', '.join(bad)}; used an older row")
    return {}


def latest_checkpoint(ckpt_dir: str | Path) -> str | None:
    try:
        return safe_read.read_text(Path(ckpt_dir) / "latest").strip()[:200] or None
    except OSError:  # none yet, or not a regular file: nothing to show
        return None


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` through a temporary file, which never outlives a failure (a full disk)."""
    safe_write.write_atomic(path, text, tmp=path.with_name(f".{path.name}.{os.getpid()}.tmp"), sync=False)


# ---- nodes.json: hosts blamed for failures ----------------------------------------------------

NODES = "nodes.json"
BLAMES_TO_EXCLUDE = 2  # a host blamed this often within a sweep is excluded from its later jobs


@dataclass
class HostBlame:
    """One host of a sweep's ledger: the failures it was blamed for since a person last cleared it."""

    host: str
    blames: list[dict[str, Any]] = field(default_factory=list)  # {event, job, kind, time, message}
    cleared: float | None = None

    @property
    def excluded(self) -> bool:
        return len(self.blames) >= BLAMES_TO_EXCLUDE

    @property
    def last(self) -> dict[str, Any] | None:
        return self.blames[-1] if self.blames else None


def read_nodes(sweep_dir: str | Path) -> dict[str, HostBlame]:
    """The sweep's ledger by host (empty when none); a damaged file reads as empty (no exclusion)."""
    try:
        raw = strict_json.loads(safe_read.read_text(Path(sweep_dir) / NODES))
        hosts = raw["hosts"]
        return {h: HostBlame(h, [b for b in v.get("blames", []) if isinstance(b, dict)], v.get("cleared"))
                for h, v in hosts.items() if isinstance(v, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_nodes(sweep_dir: Path, ledger: dict[str, HostBlame]) -> None:
    hosts = {h: {"blames": b.blames, "cleared": b.cleared} for h, b in sorted(ledger.items())}
    atomic_write(Path(sweep_dir) / NODES, json.dumps({"hosts": hosts}, indent=1) + "\n")


def excluded_hosts(sweep_dir: str | Path) -> list[str]:
    """Hosts this sweep's jobs must not run on (blamed BLAMES_TO_EXCLUDE times), sorted."""
    return sorted(h for h, b in read_nodes(sweep_dir).items() if b.excluded)


def blame(sweep_dir: str | Path, event: str, hosts: list[str], job: str, kind: str, message: str,
          timeout: float = 30.0) -> list[str] | None:
    """Blame `hosts` for failure `event` (e.g. "<job>/<job id>/<restart>") under the sweep's lock.

    The same event blamed again replaces its hosts (a failure first seen as a lost connection and
    then known from sacct as NODE_FAIL counts once, on the right nodes). Returns the sweep's
    excluded hosts afterwards; None when the lock stayed busy (nothing written).
    """
    sweep_dir = Path(sweep_dir)
    with SweepRecord(sweep_dir).try_locked(timeout) as ok:
        if not ok:
            return None
        ledger = read_nodes(sweep_dir)
        for b in ledger.values():
            b.blames = [x for x in b.blames if x.get("event") != event]
        for host in dict.fromkeys(hosts):
            ledger.setdefault(host, HostBlame(host)).blames.append(
                {"event": event, "job": job, "kind": kind, "time": time.time(), "message": message[:300]})
        _write_nodes(sweep_dir, ledger)
        return sorted(h for h, b in ledger.items() if b.excluded)


def clear_host(sweep_dir: str | Path, host: str) -> bool:
    """Forget the blames of `host` (a person checked it); False when the ledger does not know it."""
    sweep_dir = Path(sweep_dir)
    with SweepRecord(sweep_dir).locked():
        ledger = read_nodes(sweep_dir)
        if host not in ledger:
            return False
        ledger[host].blames, ledger[host].cleared = [], time.time()
        _write_nodes(sweep_dir, ledger)
        return True
