"""One writer per run: a lease file in the run directory, held by rank 0 of the attempt that writes.

Two attempts writing one run directory corrupt it quietly: each prunes the other's checkpoints,
both append metrics, the older one's late commit moves `latest` backwards. This happens when a
node that SLURM gave up on is still running (a zombie of a failed node), or when `main.py` is
started twice on one run directory. So rank 0 takes `<run.dir>/LEASE.json` when the run starts:

    {"host", "pid", "pidns", "job_id", "restart", "heartbeat", "token"}

and a daemon thread refreshes `heartbeat` every HEARTBEAT_S seconds. A start finds the lease

- absent, or released (the previous attempt ended normally): takes it;
- held by a requeued attempt of its own SLURM job (same job id or array task, lower restart count):
  takes it at once, logged. SLURM ended that attempt before starting this one; waiting for its
  heartbeat to expire would stall every requeue;
- held by a process of this host (and PID namespace) that no longer exists (a killed local run):
  takes it, logged;
- held with a heartbeat older than EXPIRY_S seconds: takes it, logged (the holder is gone or hung);
- otherwise refuses to start: LeaseHeld, one line naming the holder (host, pid, job id), exit 2.

Fencing: when rank 0 starts a checkpoint, and again right before it commits one, it calls
`check()`, which re-reads the file under the lock. A holder whose lease was taken over in the
meantime (its `token` is no longer in the file) raises LeaseLost instead, so a zombie never removes
the new attempt's `.tmp` of the same step, moves `latest` or prunes the new attempt's checkpoints.
(A zombie's own `.tmp` is left for the live writer's next start to remove.)

Every read-decide-write happens under `<run.dir>/.lease.lock` (a filelock), so two starts that
race do not both win. Heartbeat times are wall-clock times written by the holder's host: hosts
of one cluster agree to well under EXPIRY_S.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from loguru import logger

from gpt2 import strict_json
from gpt2.distributed import DistInfo
from gpt2.errors import UserError
from gpt2.logs import restart_count
from gpt2.safe_write import file_lock, write_atomic
from gpt2.watchdog import pid_namespace, pid_state

LEASE = "LEASE.json"
# The heartbeat is a small file write; every 10 s costs nothing and keeps the lease's age a fair
# measure of "is the holder alive".
HEARTBEAT_S = 10.0
# A live holder can miss several heartbeats: a stalled network filesystem, a stopped (SIGSTOP) or
# swapping process, a long synchronous checkpoint write holding the disk. Two minutes is 12 missed
# heartbeats, and still short next to how long a crashed run waits to be noticed and restarted
# (requeues of the same job do not wait at all).
EXPIRY_S = 120.0
FUTURE_S = 3600.0  # a heartbeat further ahead than any clock skew is damage (it would never expire)


class LeaseHeld(UserError):
    """Another live writer holds this run directory."""


class LeaseLost(UserError):
    """This process's lease was taken over: it must not write the run directory any more."""


@dataclass
class Holder:
    """Who holds (or wants) the lease."""

    host: str
    pid: int
    job_id: str | None  # SLURM job (array tasks: "<array job>_<task>"), submitit's local id, or None
    restart: int
    heartbeat: float = 0.0
    token: str = ""
    pidns: str | None = None  # the holder's PID namespace: its pid means something here only if equal

    def same_pid_space(self, other: Holder) -> bool:
        return self.host == other.host and self.pidns == other.pidns

    def describe(self) -> str:
        job = f"job {self.job_id}" if self.job_id else "no job id"
        return f"host {self.host} pid {self.pid} ({job}, restart {self.restart})"


def job_identity() -> str | None:
    """This process's job: array task first (each task is its own run), then SLURM job, then submitit local."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or None


def me() -> Holder:
    return Holder(host=socket.gethostname(), pid=os.getpid(), job_id=job_identity(), restart=restart_count(),
                  pidns=pid_namespace())


def _pid_alive(pid: int) -> bool:
    return pid_state(pid) not in (None, "Z")  # a zombie process has ended: only its parent has not reaped it


def takeover_reason(held: Holder, mine: Holder, now: float, expiry_s: float = EXPIRY_S) -> str | None:
    """Why `mine` may take a lease `held` still names (a line for the log), or None: refuse."""
    if held.job_id and held.job_id == mine.job_id and mine.restart > held.restart:
        return f"a requeued attempt of job {mine.job_id} (restart {mine.restart}) replaces restart {held.restart}"
    if held.same_pid_space(mine) and held.pid == mine.pid:
        return "this process held it before"
    if held.same_pid_space(mine) and not _pid_alive(held.pid):
        return f"pid {held.pid} no longer exists on this host"
    age = now - held.heartbeat
    if age > expiry_s:
        return f"its heartbeat is {age:.0f} s old (expiry {expiry_s:.0f} s)"
    return None


class Lease:
    """Rank 0's lease on a run directory: `acquire()`, then `check()` before each commit, `release()` at the end."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, expiry_s: float = EXPIRY_S):
        self.path = Path(run_dir) / LEASE
        self.lock = file_lock(Path(run_dir) / ".lease.lock")
        self.heartbeat_s, self.expiry_s = heartbeat_s, expiry_s
        self.mine = me()
        self.mine.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: Holder | None = None  # who took it over, once the heartbeat noticed

    # -- file --------------------------------------------------------------------------------
    def _read(self) -> Holder | None:
        """The holder in the file; None when absent. A file that does not parse counts as absent
        (a torn write of a crashed holder), and is logged."""
        try:
            if self.path.exists() and not self.path.is_file():  # a FIFO would block the start for ever
                raise ValueError("not a regular file")
            raw = strict_json.loads(self.path.read_text(errors="replace"))
            holder = Holder(host=str(raw["host"]), pid=int(raw["pid"]), job_id=raw.get("job_id"),
                            restart=int(raw["restart"]), heartbeat=float(raw["heartbeat"]), token=str(raw["token"]),
                            pidns=raw.get("pidns"))
            if holder.heartbeat > time.time() + FUTURE_S:  # no clock is this far ahead: it would hold for ever
                raise ValueError(f"a heartbeat {holder.heartbeat - time.time():.0f} s in the future")
            return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning(f"{self.path} is unreadable ({exc}); treating the run directory as unleased")
            return None

    def _write(self) -> None:
        self.mine.heartbeat = time.time()
        write_atomic(self.path, json.dumps(asdict(self.mine)) + "\n", sync=False)

    # -- life cycle ----------------------------------------------------------------------------
    def acquire(self) -> Lease:
        """Take the lease or raise LeaseHeld naming the holder; starts the heartbeat thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            held = self._read()
            if held is not None and held.token != self.mine.token:
                why = takeover_reason(held, self.mine, time.time(), self.expiry_s)
                if why is None:
                    raise LeaseHeld(
                        f"{self.path.parent} is being written by {held.describe()}, heartbeat "
                        f"{time.time() - held.heartbeat:.0f} s ago; a second writer would corrupt it: wait for that "
                        f"run to end, stop it, or use another run.dir (a lease is taken over once its heartbeat "
                        f"is {self.expiry_s:.0f} s old)")
                logger.warning(f"taking over the lease of {self.path.parent} from {held.describe()}: {why}")
            self._write()
        self._thread = threading.Thread(target=self._beat, name="gpt2-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self.lock:
                    held = self._read()
                    if held is None or held.token != self.mine.token:
                        self.lost = held
                        logger.error(f"lost the lease of {self.path.parent} to "
                                     f"{held.describe() if held else 'nobody (the file is gone)'}")
                        return
                    self._write()
            except OSError as exc:  # a full or flaky disk: try again next period
                logger.warning(f"could not refresh {self.path}: {exc}")

    def check(self, what: str) -> None:
        """Raise LeaseLost unless the file still names this process (called before `what` is done)."""
        with self.lock:
            held = self._read()
        if held is None or held.token != self.mine.token:
            by = held.describe() if held else "nobody (the lease file is gone)"
            raise LeaseLost(f"not {what}: the lease of {self.path.parent} now belongs to {by}; this process "
                            f"({self.mine.describe()}) is a stale writer and stops here")

    def release(self) -> None:
        """Stop the heartbeat and remove the file if it is still ours (never another's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with self.lock:
                held = self._read()
                if held is not None and held.token == self.mine.token:
                    self.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning(f"could not release {self.path}: {exc}")


def take(run_dir: Path, dist: DistInfo) -> Lease | None:
    """Collective: rank 0 takes the lease of `run_dir` (None on other ranks); on refusal every rank
    raises LeaseHeld, after letting go of the process group (the caller has nothing else yet)."""
    from gpt2 import distributed

    lease, error = None, None
    if dist.is_main:
        try:
            lease = Lease(run_dir).acquire()
        except LeaseHeld as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error is not None:
        distributed.destroy(synchronize=False)
        raise LeaseHeld(error)
    return lease
