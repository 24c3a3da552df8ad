"""Impolite failures: a hung or lost rank is detected, blamed, reported and ended within seconds.

Without this, a rank that hangs (a stuck collective, a deadlocked data worker, a GPU that stopped
answering) or dies (an exception, the OOM killer's SIGKILL, a node gone) leaves every other rank
waiting in a collective until the process group's timeout (600 s) while the allocation burns.

Each rank runs, next to the training loop:
- `Progress`: the loop marks its step and phase (`progress.phase("forward")`): a few attribute
  writes, no I/O, nothing else on the hot path.
- a heartbeat thread: about once a second it rewrites `<run.dir>/progress/rank<K>.json`
  (tmp + rename) with {"rank", "host", "pid", "restart", "attempt", "step", "phase", "time" (last
  progress, unix s), "beat" (this write, unix s), "pidns"}. The run directory is on the shared file system:
  this is how ranks on other nodes see each other (and the launcher's status). A rank that ends
  normally writes a last record with phase "done"; the others then ignore it.
- a watchdog thread (Python threads keep running while the main thread waits inside a C++
  collective, which releases the GIL) that reads every record once a second and ends this rank
  when one of these rules fires, in this order:
  1. a peer wrote a failure report for this attempt: exit at once (kind "peer_lost", blaming the
     rank that report blames: the cause, not the messenger);
  2. a peer is lost: its heartbeat has not changed for `heartbeat_timeout_s` (crashed, SIGKILLed,
     SIGSTOPped, node gone), or it is on this host and its process is gone (no waiting then);
  3. a hang: the slowest rank (lowest step; at the same step the earlier phase, then a rank whose
     heartbeat stopped (more than FROZEN_S: a frozen process, not one waiting for it), then the
     oldest progress) has made no progress for its allowance (see `allowance`). The slowest rank itself
     notices it too (its heartbeat thread still runs): it is blamed and dumps its own stacks.
  Staleness is measured on this rank's own clock, from the moment a record was seen to change, so
  clock skew between nodes does not matter. On a verdict: every thread's Python stack goes to this
  rank's log (`<run.dir>/logs/rank<N>.log`), the failure report is written, a blamed peer on the
  same host that is still there is killed (at once when lost, after `KILL_GRACE_S` for a hang, so
  it can dump its own stacks first: a SIGSTOPped process cannot end itself), the fatal hook runs
  (`on_fatal`) and the process ends with `os._exit(code)`: the hook's code, else EXIT_FAILURE (76).

Failure reports (`<run.dir>/failures/restart<R>-rank<K>.json`, one per rank and attempt, tmp +
rename): {"kind": "hang" | "peer_lost" | "exception" | "comm_error" | "storage_error" | "preflight",
"rank", "host", "restart", "attempt", "time", "step", "phase", "blamed_rank", "blamed_host",
"exc_type", "message", "traceback", "detected_after_s"}. The earliest report of an attempt is its cause
(`first_failure`); later ones are consequences. `attempt` is rank 0's start time, agreed by every
rank at start: records and reports of an earlier attempt with the same restart count (a local
rerun) are ignored.

Hang allowances (`hang_timeout_s`, "auto" by default) and every rule: gpt2/hang_rules.py.

The clock and the file reads are parameters (`Watchdog(clock=..., read_records=...,
read_reports=..., alive=...)`), and the rules are the pure `Observer.check`, so they are tested
with a fake clock. Test-only fault injection: `GPT2_FAULT=<kind>@<step>:<rank>[/<restart>]` (see `Fault`),
for drills and tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2 import safe_read
from gpt2.errors import EXIT_FAILURE, is_storage_error
from gpt2.hang_rules import DONE, Limits, Observer, Verdict
from gpt2.safe_write import open_append, write_atomic

KINDS = ("hang", "peer_lost", "exception", "comm_error", "storage_error", "preflight")

BEAT_S = 1.0  # heartbeat and watchdog period
HOOK_TIMEOUT_S = 30.0  # the fatal hook gets this long before the process ends anyway

# RuntimeError texts of a failed communication (gloo, NCCL) rather than a bug in this rank.
_COMM_MARKERS = ("connection reset", "connection closed", "connection refused", "broken pipe",
                 "socket", "nccl", "gloo", "timed out", "timeout", "process group", "peer")


# ---- progress (the hot path) ------------------------------------------------------------------
class Progress:
    """Where this rank is: step and phase, with the time of the last change. Writes only."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self.step: int | None = None  # the step being run (1-based), None before the first
        self.phase_name = "startup"
        self.time = clock()
        self.first_step: int | None = None  # the first step this process ran
        self.first_step_s: float | None = None
        self.durations: deque[float] = deque(maxlen=64)  # seconds of each later step
        self._t0 = 0.0

    def start_step(self, step: int) -> None:
        self._t0 = self.time = self._clock()
        self.step, self.phase_name = step, "data"
        if self.first_step is None:
            self.first_step = step

    def end_step(self) -> None:
        self.time = t = self._clock()
        if self.step == self.first_step and self.first_step_s is None:
            self.first_step_s = t - self._t0
        else:
            self.durations.append(t - self._t0)

    def phase(self, name: str) -> None:
        self.phase_name = name
        self.time = self._clock()

    def median_step_s(self) -> float | None:
        """Median of the steps after the first (the first alone while it is the only one)."""
        samples = list(self.durations)
        if samples:
            return statistics.median(samples)
        return self.first_step_s



# ---- files ----------------------------------------------------------------------------------------
def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj), tmp=path.with_name(f".{path.name}.{os.getpid()}.tmp"), sync=False)


def read_progress(run_dir: str | Path) -> dict[int, dict[str, Any]]:
    """rank -> its last progress record (damaged or half-written files skipped)."""
    out: dict[int, dict[str, Any]] = {}
    for p in Path(run_dir, "progress").glob("rank*.json"):
        try:
            rec = json.loads(safe_read.read_text(p))  # a FIFO under that name must not block status
            out[int(rec["rank"])] = rec
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def read_failures(run_dir: str | Path, restart: int | None = None) -> list[dict[str, Any]]:
    """Failure reports of `restart` (all when None), oldest first; damaged files skipped."""
    pattern = "restart*-rank*.json" if restart is None else f"restart{restart}-rank*.json"
    out = []
    for p in Path(run_dir, "failures").glob(pattern):
        try:
            rep = json.loads(safe_read.read_text(p))
            float(rep["time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(rep, dict):
            out.append(rep)
    return sorted(out, key=lambda r: (float(r["time"]), r.get("rank") or 0))


def first_failure(run_dir: str | Path, restart: int | None) -> dict[str, Any] | None:
    """The earliest report of that attempt: the cause, not the consequences."""
    reports = read_failures(run_dir, restart)
    return reports[0] if reports else None


def pid_namespace() -> str | None:
    """This process's PID namespace (ranks in separate containers on one host see different pids)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pid_state(pid: int) -> str | None:
    """The state letter of process `pid` of this host (R, S, D, T: stopped, Z: zombie...); None
    when there is no such process."""
    if pid <= 0:
        return None
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists and is not a zombie."""
    return pid_state(pid) not in (None, "Z", "X")


def is_comm_error(exc: BaseException) -> bool:
    """A torch.distributed backend/communication error (a consequence), not a bug of this rank."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    return isinstance(exc, RuntimeError | ConnectionError) and any(
        m in str(exc).lower() for m in _COMM_MARKERS)


# ---- the fatal hook ------------------------------------------------------------------------------
_hook: Callable[[dict[str, Any]], int | None] | None = None


def on_fatal(callback: Callable[[dict[str, Any]], int | None] | None) -> None:
    """Register the callable the watchdog calls with the report before ending the process; its
    return value is the exit code (None: EXIT_FAILURE). None unregisters."""
    global _hook
    _hook = callback


def call_hook(report: dict[str, Any], log: Callable[[str, bool], None]) -> int:
    hook, box = _hook, [EXIT_FAILURE]
    if hook is None:
        return EXIT_FAILURE

    def call() -> None:
        try:
            code = hook(report)
            if code is not None:
                box[0] = int(code)
        except BaseException as exc:  # a broken hook must not keep a failed rank alive
            log(f"watchdog: the fatal hook failed: {type(exc).__name__}: {exc}", True)

    t = threading.Thread(target=call, name="gpt2-fatal-hook", daemon=True)
    t.start()
    t.join(HOOK_TIMEOUT_S)
    if t.is_alive():
        log(f"watchdog: the fatal hook did not return within {HOOK_TIMEOUT_S:.0f} s", True)
        return EXIT_FAILURE
    return box[0]


# ---- fault injection (drills and tests only) -----------------------------------------------------
@dataclass(frozen=True)
class Fault:
    """`GPT2_FAULT=<kind>@<step>:<rank>[/<restart>]`, for drills and tests only: at the start of
    step <step> rank <rank> raises a RuntimeError ("raise"), sleeps forever in the data phase with
    its threads alive ("hang"), stops itself with SIGSTOP ("stop") or kills itself with SIGKILL
    ("kill"). With `/<restart>` only the attempt of that restart count (GPT2_RESTART_COUNT, else
    SLURM_RESTART_COUNT, else 0) does it: the requeued attempt runs on (what `make drill` needs
    for a fault injected once into a job whose environment every attempt inherits)."""

    kind: str
    step: int
    restart: int | None = None  # only on the attempt of this restart count; None: on every attempt

    @staticmethod
    def from_env(rank: int, env: dict[str, str] | None = None) -> Fault | None:
        env = os.environ if env is None else env
        spec = env.get("GPT2_FAULT", "").strip()
        if not spec:
            return None
        try:
            kind, rest = spec.split("@", 1)
            step, who = rest.split(":", 1)
            target, sep, restart = who.partition("/")
            fault = Fault(kind, int(step), int(restart) if sep else None)
            target_rank = int(target)
        except ValueError as exc:
            raise ValueError(f"GPT2_FAULT={spec!r}: expected <raise|hang|stop|kill>@<step>:<rank>[/<restart>]") \
                from exc
        if kind not in ("raise", "hang", "stop", "kill"):
            raise ValueError(f"GPT2_FAULT={spec!r}: unknown kind {kind!r} (raise, hang, stop or kill)")
        if target_rank != rank:
            return None
        if fault.restart is not None:
            raw = env.get("GPT2_RESTART_COUNT") or env.get("SLURM_RESTART_COUNT") or "0"
            if not raw.isdigit() or int(raw) != fault.restart:
                return None
        return fault

    def fire(self, step: int) -> None:
        if step != self.step:
            return
        if self.kind == "raise":
            raise RuntimeError(f"injected fault at step {step} (GPT2_FAULT)")
        if self.kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            while True:  # a deadlocked data worker, as far as anyone can tell
                time.sleep(1.0)


# ---- the threads ---------------------------------------------------------------------------------
class Watchdog:
    """Heartbeat and watchdog threads of one rank. `start()` begins both; `stop()` joins them."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, restart: int, attempt: str,
                 limits: Limits, *, clock: Callable[[], float] = time.time,
                 read_records: Callable[[], dict[int, dict[str, Any]]] | None = None,
                 read_reports: Callable[[], list[dict[str, Any]]] | None = None,
                 alive: Callable[[int], bool] = pid_alive, period_s: float = BEAT_S):
        self.run_dir, self.rank, self.world_size = Path(run_dir), rank, world_size
        self.restart, self.attempt, self.limits = restart, attempt, limits
        self.host, self.pid, self.pidns = socket.gethostname(), os.getpid(), pid_namespace()
        self.clock, self.alive, self.period_s = clock, alive, period_s
        self.read_records = read_records or (lambda: read_progress(self.run_dir))
        self.read_reports = read_reports or (lambda: read_failures(self.run_dir, self.restart))
        self.progress = Progress(clock)
        self.observer = Observer(rank, world_size, self.host, attempt, limits, clock(), self.pidns)
        self.path = self.run_dir / "progress" / f"rank{rank}.json"
        self.log_path = self.run_dir / "logs" / f"rank{rank}.log"
        self._stop = threading.Event()
        self._report_lock = threading.Lock()
        self.reported: dict[str, Any] | None = None  # the report this rank wrote, if any
        self._threads: list[threading.Thread] = []

    # records
    def record(self, phase: str | None = None) -> dict[str, Any]:
        p = self.progress
        return {"rank": self.rank, "host": self.host, "pid": self.pid, "pidns": self.pidns,
                "restart": self.restart, "attempt": self.attempt, "step": p.step, "phase": phase or p.phase_name,
                "time": round(p.time, 3), "beat": round(self.clock(), 3)}

    def beat(self, phase: str | None = None) -> None:
        try:
            _write_json(self.path, self.record(phase))
        except OSError as exc:  # a full or stalled disk: the peers will call us lost, rightly
            self._log(f"watchdog: heartbeat write failed: {exc}")

    def report(self, kind: str, message: str, *, blamed_rank: int | None, blamed_host: str | None,
               exc: BaseException | None = None, detected_after_s: float | None = None) -> dict[str, Any] | None:
        """Write this rank's failure report (the first one only); returns it, None if one was written."""
        tb = "".join(traceback.format_exception(exc)) if exc is not None else None
        rep = {"kind": kind, "rank": self.rank, "host": self.host, "restart": self.restart,
               "attempt": self.attempt, "time": round(time.time(), 3), "step": self.progress.step,
               "phase": self.progress.phase_name, "blamed_rank": blamed_rank, "blamed_host": blamed_host,
               "exc_type": type(exc).__name__ if exc is not None else None,
               "message": " ".join(message.split())[:2000], "traceback": tb, "detected_after_s": detected_after_s}
        with self._report_lock:
            if self.reported is not None:
                return None
            self.reported = rep
        try:
            _write_json(self.run_dir / "failures" / f"restart{self.restart}-rank{self.rank}.json", rep)
        except OSError as exc2:
            self._log(f"watchdog: could not write the failure report: {exc2}")
        self._log(f"failure report ({kind}): {rep['message']}")
        return rep

    def report_exception(self, exc: BaseException) -> dict[str, Any] | None:
        """The report of an exception escaping the loop: "comm_error" (blaming a lost peer when one
        is known), "storage_error" (the file system failed a read or write: gpt2.errors.is_storage_error)
        or "exception" (blaming this rank). The watchdog then stops deciding."""
        if is_comm_error(exc):
            blamed = self.suspect()
            kind = "comm_error"
        elif is_storage_error(exc):
            blamed, kind = (self.rank, self.host), "storage_error"
        else:
            blamed, kind = (self.rank, self.host), "exception"
        return self.report(kind, f"{type(exc).__name__}: {exc}", blamed_rank=blamed[0], blamed_host=blamed[1], exc=exc)

    def suspect(self, wait_s: float = 1.0) -> tuple[int | None, str | None]:
        """Who most likely broke the communication: the rank a peer's report blames, a peer on this
        host whose process is gone, else the peer with the oldest heartbeat; (None, None) if none.

        A killed peer's sockets close before its process is gone: look again for up to `wait_s`."""
        deadline = time.monotonic() + wait_s
        while True:
            found = self._suspect()
            if found[0] is not None or time.monotonic() >= deadline:
                return found
            time.sleep(0.1)

    def _suspect(self) -> tuple[int | None, str | None]:
        try:
            reports = [r for r in self.read_reports() if r.get("attempt") == self.attempt and r.get("rank") != self.rank]
            if reports:
                return reports[0].get("blamed_rank"), reports[0].get("blamed_host")
            peers = [r for k, r in self.read_records().items()
                     if k != self.rank and r.get("attempt") == self.attempt and r.get("phase") != DONE]
        except OSError:
            return None, None
        for r in peers:
            if self.observer.local(r) and not self.alive(int(r.get("pid") or 0)):
                return int(r["rank"]), r.get("host")
        if peers:
            oldest = min(peers, key=lambda r: float(r.get("beat") or 0))
            if self.clock() - float(oldest.get("beat") or 0) > 2 * self.period_s:
                return int(oldest["rank"]), oldest.get("host")
        return None, None

    # threads
    def start(self) -> Watchdog:
        self.beat()
        for name, target in (("gpt2-heartbeat", self._heartbeat_loop), ("gpt2-watchdog", self._watch_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, done: bool = False) -> None:
        """Join both threads (idempotent); `done`: write the last record with phase "done"."""
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5.0)
        self._threads.clear()
        if done and self.reported is None:
            self.beat(DONE)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.beat()

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.period_s):
            if self.reported is not None:
                return
            try:
                verdict = self.check()
            except Exception as exc:  # a bug here must not kill a healthy rank
                self._log(f"watchdog: check failed: {type(exc).__name__}: {exc}")
                continue
            if verdict is not None and not self._stop.is_set():
                self.fatal(verdict)

    def check(self) -> Verdict | None:
        p = self.progress
        return self.observer.check(self.clock(), self.record(), self.read_records(), self.read_reports(),
                                   self.alive, p.first_step, p.median_step_s())

    def fatal(self, v: Verdict) -> None:
        """Stacks to the log, the report, the blamed local process killed, the hook, os._exit."""
        self._log(f"watchdog: {v.kind}: {v.message}; stacks of every thread of rank {self.rank} follow\n"
                  + thread_stacks(), console=True)
        rep = self.report(v.kind, v.message, blamed_rank=v.blamed_rank, blamed_host=v.blamed_host,
                          detected_after_s=v.detected_after_s)
        if rep is None:  # the main thread reported first (an exception): it owns the exit
            return
        if v.kill_pid is not None and v.kill_pid != self.pid:
            deadline = time.monotonic() + v.kill_grace_s
            # a stopped process (SIGSTOP, state T) cannot leave by itself: no grace for it
            while self.alive(v.kill_pid) and pid_state(v.kill_pid) != "T" and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.alive(v.kill_pid):
                self._log(f"watchdog: killing rank {v.blamed_rank} (pid {v.kill_pid}) on this host", console=True)
                try:
                    os.kill(v.kill_pid, signal.SIGKILL)
                except OSError:
                    pass
        os._exit(call_hook(rep, self._log))

    def _log(self, text: str, console: bool = False) -> None:
        """A line in this rank's log (and on stderr when `console`: a fatal verdict), without loguru
        (whose lock the stuck main thread may hold)."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} | ERROR   | rank{self.rank} | {text}\n"
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open_append(self.log_path) as f:
                f.write(line)
        except OSError:
            pass
        if console:
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass


def thread_stacks() -> str:
    """Every thread's Python stack, as text (sys._current_frames)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"--- thread {names.get(ident, '?')} ({ident})\n" + "".join(traceback.format_stack(frame)))
    return "".join(out)


def start(run_dir: str | Path, rank: int, world_size: int, restart: int, limits: Limits) -> Watchdog:
    """Collective: every rank agrees on the attempt id (rank 0's start time), then starts its threads."""
    from gpt2 import distributed

    attempt = distributed.broadcast_object(f"{time.time():.6f}" if rank == 0 else None)
    return Watchdog(run_dir, rank, world_size, restart, str(attempt), limits).start()
