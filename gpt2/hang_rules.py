"""The watchdog's rules, pure: who is lost, who hangs, and how long each phase may take.

`Observer.check` is what the watchdog thread (gpt2/watchdog.py) runs about once a second over the
heartbeat records and failure reports it reads; it takes the clock and the liveness test as
arguments, so every rule is tested with a fake clock.

Hang allowance (`hang_timeout_s`): "auto" (default) gives a steady step max(25 s, 3 x the median
step time of this process, its first step left out); a number of seconds replaces that; "0" or
"off" disables the hang rule. Larger allowances, never below the steady one:
startup and the first step of the process 300 s (1200 s with `compile`, which also covers the
second step), a save 300 s, eval 60 s (600 s with `compile`). On the tiny model a hang is thus
noticed about 25 s after the last progress: within the goal of 3 step times + 30 s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PHASES = ("startup", "data", "forward", "backward", "optimizer", "collective", "eval", "save")
DONE = "done"  # the last record of a rank that ended normally
_ORDER = {p: i for i, p in enumerate(PHASES)}

HANG_FLOOR_S = 25.0  # auto: the steady allowance is max(HANG_FLOOR_S, HANG_STEPS x median step)
HANG_STEPS = 3.0
FIRST_STEP_S = 300.0  # startup and the first step of the process (lazy init, cuDNN autotuning)
COMPILE_S = 1200.0  # the first two steps with torch.compile
SAVE_S = 300.0
EVAL_S = 60.0
EVAL_COMPILE_S = 600.0
FROZEN_S = 3.0  # a heartbeat unchanged this long marks a frozen rank when blaming a hang
KILL_GRACE_S = 5.0  # a hung peer on this host gets this long to dump its stacks and leave


def parse_hang_timeout(text: str) -> float | None:
    """"auto" -> None; "0"/"off" -> 0.0 (disabled); "12.5" -> 12.5. ValueError otherwise."""
    t = str(text).strip().lower()
    if t == "auto":
        return None
    if t == "off":
        return 0.0
    value = float(t)
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


@dataclass(frozen=True)
class Limits:
    hang_s: float | None = None  # the steady allowance; None: auto; 0: hang rule off
    heartbeat_s: float = 10.0  # 0: the heartbeat rule is off (a gone process on this host still counts)
    compile: bool = False


def allowance(limits: Limits, phase: str, step: int | None, first_step: int | None,
              median_s: float | None) -> float | None:
    """Seconds the slowest rank may go without progress in `phase` of `step`; None: no limit."""
    if limits.hang_s == 0:
        return None
    steady = limits.hang_s if limits.hang_s is not None else max(HANG_FLOOR_S, HANG_STEPS * (median_s or 0.0))
    if step is None or first_step is None or step <= first_step or phase == "startup" or median_s is None:
        extra = COMPILE_S if limits.compile else FIRST_STEP_S
    elif limits.compile and step <= first_step + 1:
        extra = COMPILE_S
    elif phase == "save":
        extra = SAVE_S
    elif phase == "eval":
        extra = EVAL_COMPILE_S if limits.compile else EVAL_S
    else:
        extra = 0.0
    return max(steady, extra)


def lag_key(rec: dict[str, Any], frozen: bool = False) -> tuple[int, int, int, float]:
    """Sorts the most lagging record first: lowest step, then earliest phase, then frozen (its
    heartbeat stopped) before alive, then oldest progress."""
    step = rec.get("step")
    return (-1 if step is None else int(step), _ORDER.get(rec.get("phase") or "startup", 0), 0 if frozen else 1,
            float(rec.get("time") or 0))


def slowest(records: dict[int, dict[str, Any]], frozen: set[int] | frozenset[int] = frozenset()) -> int | None:
    """The rank to blame for a hang among these records (ranks that are done left out); `frozen`:
    the ranks whose heartbeat stopped."""
    live = {k: r for k, r in records.items() if r.get("phase") != DONE}
    return min(live, key=lambda k: (lag_key(live[k], k in frozen), k)) if live else None


@dataclass
class Verdict:
    kind: str  # "hang" | "peer_lost"
    blamed_rank: int | None
    blamed_host: str | None
    message: str
    detected_after_s: float | None
    kill_pid: int | None = None  # a blamed process on this host to kill
    kill_grace_s: float = 0.0


@dataclass
class Observer:
    """The watchdog's rules over what it sees; `check` is called about once a second.

    It remembers, on this rank's clock, when each rank's heartbeat and progress last changed."""

    rank: int
    world_size: int
    host: str
    attempt: str
    limits: Limits
    started: float  # now() when the watchdog started: the first sighting of every rank
    pidns: str | None = None  # this rank's PID namespace: a peer's pid means something here only if equal
    beat_seen: dict[int, tuple[Any, float]] = field(default_factory=dict)  # rank -> (beat, changed at)
    progress_seen: dict[int, tuple[Any, float]] = field(default_factory=dict)

    def local(self, rec: dict[str, Any]) -> bool:
        """Whether the record's pid is a process this rank can see (same host, same PID namespace)."""
        return rec.get("host") == self.host and rec.get("pidns") == self.pidns

    def _changed_at(self, seen: dict[int, tuple[Any, float]], rank: int, value: Any, now: float) -> float:
        old = seen.get(rank)
        if old is None or old[0] != value:
            seen[rank] = (value, now if old is not None else self.started)
        return seen[rank][1]

    def check(self, now: float, mine: dict[str, Any], peers: dict[int, dict[str, Any]],
              reports: list[dict[str, Any]], alive: Callable[[int], bool],
              first_step: int | None, median_s: float | None) -> Verdict | None:
        """A verdict when this rank must end, else None. `peers`: the records read (any attempt),
        `reports`: failure reports of this restart, `alive(pid)`: whether a process of this host
        is still there."""
        my_idle = now - self._changed_at(self.progress_seen, self.rank,
                                         (mine.get("step"), mine.get("phase"), mine.get("time")), now)
        for rep in sorted(reports, key=lambda r: r.get("time") or 0):
            if rep.get("attempt") == self.attempt and rep.get("rank") != self.rank:
                blamed = rep.get("blamed_rank")
                if blamed == self.rank and rep.get("kind") == "hang":  # a peer saw our hang first
                    return Verdict("hang", self.rank, self.host,
                                   f"this rank made no progress for {my_idle:.1f} s in step {mine.get('step')} "
                                   f"phase {mine.get('phase')} (rank {rep.get('rank')} reported the hang first)",
                                   round(my_idle, 3))
                return Verdict("peer_lost", blamed if blamed is not None else rep.get("rank"),
                               rep.get("blamed_host") or rep.get("host"),
                               f"rank {rep.get('rank')} reported {rep.get('kind')}: {rep.get('message')}",
                               round(now - float(rep.get("time") or now), 3))
        current = {k: r for k, r in peers.items() if r.get("attempt") == self.attempt and k != self.rank}
        records = {**current, self.rank: mine}
        # rule 2: lost peers (a record of an earlier attempt counts as no record yet)
        for k in range(self.world_size):
            if k == self.rank:
                continue
            rec = current.get(k)
            if rec is not None and rec.get("phase") == DONE:
                continue
            since = self._changed_at(self.beat_seen, k, None if rec is None else rec.get("beat"), now)
            gone = rec is not None and self.local(rec) and not alive(int(rec.get("pid") or 0))
            if gone or (self.limits.heartbeat_s > 0 and now - since > self.limits.heartbeat_s):
                host = None if rec is None else rec.get("host")
                why = "its process is gone" if gone else (
                    f"no heartbeat for {now - since:.1f} s (heartbeat_timeout_s={self.limits.heartbeat_s:g})")
                pid = int(rec["pid"]) if rec is not None and self.local(rec) and not gone else None
                return Verdict("peer_lost", k, host, f"rank {k} on {host} is lost: {why}",
                               round(now - since, 3), kill_pid=pid)
        # rule 3: the slowest rank made no progress for its allowance
        for k, rec in records.items():
            self._changed_at(self.progress_seen, k, (rec.get("step"), rec.get("phase"), rec.get("time")), now)
        frozen = {k for k, (_, t) in self.beat_seen.items() if now - t > FROZEN_S}
        lag = slowest(records, frozen)
        if lag is None:
            return None
        rec = records[lag]
        limit = allowance(self.limits, rec.get("phase") or "startup", rec.get("step"), first_step, median_s)
        idle = now - self.progress_seen[lag][1]
        if limit is None or idle <= limit:
            return None
        where = f"step {rec.get('step')} phase {rec.get('phase')}"
        if lag == self.rank:
            msg = f"this rank made no progress for {idle:.1f} s in {where} (allowance {limit:.0f} s)"
            return Verdict("hang", lag, self.host, msg, round(idle, 3))
        msg = f"rank {lag} on {rec.get('host')} made no progress for {idle:.1f} s in {where} (allowance {limit:.0f} s)"
        pid = int(rec["pid"]) if self.local(rec) and rec.get("pid") else None
        return Verdict("hang", lag, rec.get("host"), msg, round(idle, 3), kill_pid=pid, kill_grace_s=KILL_GRACE_S)


def limits_from(settings: Any) -> Limits:
    """Limits from TrainerSettings (hang_timeout_s, heartbeat_timeout_s, compile)."""
    return Limits(parse_hang_timeout(settings.hang_timeout_s), float(settings.heartbeat_timeout_s),
                  bool(settings.compile))
