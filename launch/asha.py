"""Asynchronous successive halving (ASHA): which trials continue, as a pure function.

A search `{kind: asha, metric: val_loss, mode: min, min_steps: 100, max_steps: 1600, reduction: 3}`
has rungs at min_steps * reduction^k below max_steps, and max_steps itself as the last one:
100, 300, 900, 1600. Every trial first trains to the lowest rung. The rule, applied to what has
been recorded (never to a live process):

- A trial *reported* at rung r when its metric row at step r is in its metrics.jsonl. A trial
  preempted exactly at step r counts only once that row exists (a stop during the eval leaves
  none: it has not reported). A trial that FAILED (or was cancelled) before reporting at the rung it was training
  to counts as reported there, worst (it takes a place in the count, never a slot).
- A trial that reported at rung r and stopped there (its job COMPLETED at max_steps == r) is
  promoted to the next rung as soon as it ranks in the top floor(n_r / reduction) of the n_r
  trials that have reported at r so far (Ray Tune's ASHA rule): nobody waits for the whole rung.
  With few reports the cut is small: fewer than `reduction` reports promote nobody yet.
- Once every trial of the sweep has reported at r, failed, or was stopped below r, the rung is
  closed: its waiting trials ranked within max(1, floor(n_r / reduction)) are promoted (so a
  sweep always trains at least one trial to max_steps, even with fewer trials than `reduction`)
  and the others are stopped (STOPPED_EARLY).
- Ranking: the metric's order (`mode`), a missing or NaN metric last, ties by trial name, so the
  same records always give the same decisions. A trial with a missing or NaN metric, or a failed
  one, is never promoted.

Because early promotions are made on partial counts, a rung may end up promoting a little more
than 1/reduction of its trials: ASHA's price for never waiting (the same as Ray Tune's).

`decide` returns only decisions not yet in `decided`: applying the same records twice decides
nothing new (launch/advance.py makes that durable across crashes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

KINDS = ("asha",)
MODES = ("min", "max")
PROMOTE, STOP = "promote", "stop"
COMPLETED = "COMPLETED"
DEAD = frozenset({"FAILED", "CANCELLED", "TIMEOUT"})  # ended without finishing its rung


@dataclass
class SearchSpec:
    """`sweep.search` of an experiment file: how trials are cut early."""

    kind: str = "asha"  # the only kind so far: asynchronous successive halving
    metric: str = "val_loss"  # a key of the eval rows of metrics.jsonl
    mode: str = "min"  # min | max: which way is better
    min_steps: int = 100  # the first rung: every trial trains this far
    max_steps: int = 1000  # the last rung, and the length of every trial's LR schedule
    reduction: int = 3  # keep the best 1/reduction at each rung

    def problem(self) -> str | None:
        """What is wrong with this spec in one phrase, or None."""
        if self.kind not in KINDS:
            return f"kind '{self.kind}' is unknown: choose one of {', '.join(KINDS)}"
        if self.mode not in MODES:
            return f"mode '{self.mode}' is unknown: choose min or max"
        if self.reduction < 2:
            return f"reduction must be >= 2 (got {self.reduction})"
        if self.min_steps < 1:
            return f"min_steps must be >= 1 (got {self.min_steps})"
        if self.min_steps > self.max_steps:
            return f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})"
        if not self.metric:
            return "metric must name a key of the eval rows (e.g. val_loss)"
        return None

    def rungs(self) -> list[int]:
        """The steps where trials are compared: min_steps * reduction^k, then max_steps."""
        out, r = [], self.min_steps
        while r < self.max_steps:
            out.append(r)
            r *= self.reduction
        return out + [self.max_steps]

    def next_rung(self, rung: int) -> int | None:
        later = [r for r in self.rungs() if r > rung]
        return later[0] if later else None


@dataclass
class Trial:
    """What the records say about one trial: its metric at each step it was evaluated, the state
    of its last job, and the max_steps that job was submitted with (its current target rung)."""

    name: str
    target: int
    state: str  # state.json's: COMPLETED, FAILED, RUNNING, STOPPED_EARLY, ...
    values: dict[int, float | None] = field(default_factory=dict)  # step -> metric (None: missing)


@dataclass
class Decision:
    """One promotion or stop, with the numbers it was based on."""

    trial: str
    rung: int
    action: str  # promote | stop
    next_rung: int | None  # where a promoted trial trains to
    rank: int  # 0-based place in `ranking`
    cut: int  # how many of the ranking may continue at this moment
    reported: int  # n_r: trials that had reported at this rung
    trials: int  # trials in the sweep
    closed: bool  # every trial had reported at the rung (or failed or stopped below it)
    ranking: list[tuple[str, float | None]]  # (trial, metric) best first; failed: None

    @property
    def key(self) -> str:
        return f"{self.trial}@{self.rung}"

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["ranking"] = [[n, v] for n, v in self.ranking]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        """The decision a line of decisions.jsonl holds; ValueError when a field is not what the
        controller writes (the line is then read as damaged, and the decision made again)."""
        def count(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} {value!r} is not a count")
            return value

        def pair(item: Any) -> tuple[str, float | None]:
            if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)
                    and (item[1] is None or (isinstance(item[1], int | float) and not isinstance(item[1], bool)))):
                raise ValueError(f"a ranking entry {str(item)[:40]} is not [trial, value]")
            return item[0], item[1]

        if not isinstance(d.get("trial"), str) or d.get("action") not in (PROMOTE, STOP):
            raise ValueError("no trial name or no known action")
        next_rung = d.get("next_rung")
        ranking = d.get("ranking", [])
        if not isinstance(ranking, list):
            raise ValueError("ranking is not a list")
        return cls(trial=d["trial"], rung=count("rung", d["rung"]), action=d["action"],
                   next_rung=None if next_rung is None else count("next_rung", next_rung),
                   rank=count("rank", d["rank"]), cut=count("cut", d["cut"]), reported=count("reported", d["reported"]),
                   trials=count("trials", d["trials"]), closed=bool(d.get("closed")), ranking=[pair(x) for x in ranking])


def _finite(v: float | None) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def sort_key(mode: str, name: str, value: float | None, failed: bool = False) -> tuple[int, float, str]:
    """Best first; missing, NaN and failed last; ties by name (deterministic)."""
    if failed or not _finite(value):
        return (1, 0.0, name)
    assert value is not None
    return (0, value if mode == "min" else -value, name)


def reports(spec: SearchSpec, trials: list[Trial], rung: int) -> list[tuple[str, float | None, bool]]:
    """(trial, metric, failed) of every trial that has reported at `rung`, best first."""
    out: list[tuple[str, float | None, bool]] = []
    for t in trials:
        if rung in t.values:
            out.append((t.name, t.values[rung], False))
        elif t.state in DEAD and t.target == rung:
            out.append((t.name, None, True))
    return sorted(out, key=lambda r: sort_key(spec.mode, r[0], r[1], r[2]))


def _out_below(t: Trial, rung: int, decided: dict[str, Decision]) -> bool:
    """The trial will never report at `rung`: stopped at a lower rung, or failed training to one."""
    stopped = any(d.trial == t.name and d.action == STOP and d.rung < rung for d in decided.values())
    return stopped or (t.state in DEAD and t.target < rung)


def decide(spec: SearchSpec, trials: list[Trial], decided: dict[str, Decision]) -> list[Decision]:
    """The decisions the records call for that are not in `decided` (keyed by Decision.key)."""
    out: list[Decision] = []
    known = dict(decided)
    for rung in spec.rungs()[:-1]:
        ranked = reports(spec, trials, rung)
        names = {n for n, _, _ in ranked}
        closed = all(t.name in names or _out_below(t, rung, known) for t in trials)
        cut = len(ranked) // spec.reduction
        if closed:
            cut = max(1, cut)
        ranking = [(n, None if failed else v) for n, v, failed in ranked]
        by_name = {t.name: t for t in trials}
        for rank, (name, value, failed) in enumerate(ranked):
            t = by_name[name]
            waiting = t.target == rung and t.state == COMPLETED and not failed
            if f"{name}@{rung}" in known or not waiting:
                continue
            if rank < cut and _finite(value):
                action = PROMOTE
            elif closed:
                action = STOP
            else:
                continue  # may still be promoted when more trials report
            d = Decision(trial=name, rung=rung, action=action, next_rung=spec.next_rung(rung) if action == PROMOTE
                         else None, rank=rank, cut=cut, reported=len(ranked), trials=len(trials), closed=closed,
                         ranking=ranking)
            out.append(d)
            known[d.key] = d
    return out


def finished(spec: SearchSpec, trials: list[Trial], decided: dict[str, Decision]) -> bool:
    """Nothing left to train or decide: every trial completed max_steps, failed, or was stopped."""
    stopped = {d.trial for d in decided.values() if d.action == STOP}
    for t in trials:
        if t.name in stopped or t.state in DEAD:
            continue
        if not (t.state == COMPLETED and t.target == spec.max_steps):
            return False
    return True
