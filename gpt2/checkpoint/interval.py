"""How often to save: a fixed number of steps, or the Young/Daly interval (`interval: auto`).

A save blocks training for C seconds; an interruption throws away, on average, half the work since
the last save. With a mean time between interruptions M, the interval that loses the least is
sqrt(2 x C x M) seconds (Young 1974, Daly 2006), turned into steps with the median step time and
kept within [1, max_interval] steps.

C is measured: the seconds the loop was blocked by the last save (before the first save, the
checkpoint manager's estimate). M comes from whoever started us, in GPT2_MTBI_S (launch/job.py:
the sweep's ledger once it has seen interruptions, else the cluster profile's `mtbi_hours`), with
GPT2_MTBI_SOURCE saying which; without it (main.py under torchrun), `DEFAULT_MTBI_HOURS`.
Nothing here touches torch: the launcher's dry run uses the same rule.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import deque
from dataclasses import dataclass, field

AUTO = "auto"
DEFAULT_MTBI_HOURS = 4.0  # a preemptible partition of a busy cluster; a profile says better
CHANGE_FRACTION = 0.2  # a new interval is taken (and logged) only when it differs this much
STEP_WINDOW = 20  # step times the median is taken over


def young_daly_s(save_s: float, mtbi_s: float) -> float:
    """sqrt(2 C M): the seconds between saves that lose the least to saves plus lost work."""
    return math.sqrt(2.0 * max(0.0, save_s) * max(0.0, mtbi_s))


def interval_steps(save_s: float, mtbi_s: float, step_s: float, max_interval: int) -> int:
    """The Young/Daly interval in steps of `step_s` seconds, within [1, max_interval]."""
    if step_s <= 0:
        return max(1, max_interval)
    return max(1, min(max_interval, round(young_daly_s(save_s, mtbi_s) / step_s)))


def mtbi_from_env(env: dict[str, str] | None = None) -> tuple[float, str]:
    """(M in seconds, where it came from): GPT2_MTBI_S and GPT2_MTBI_SOURCE, else the default."""
    env = dict(os.environ) if env is None else env
    try:
        m = float(env.get("GPT2_MTBI_S", ""))
        if m > 0:
            return m, env.get("GPT2_MTBI_SOURCE") or "GPT2_MTBI_S"
    except ValueError:
        pass
    return DEFAULT_MTBI_HOURS * 3600.0, f"default mtbi_hours={DEFAULT_MTBI_HOURS:g}"


def explain(save_s: float, save_what: str, mtbi_s: float, mtbi_source: str, step_s: float,
            max_interval: int) -> str:
    """One line: the interval chosen and why (the dry run and the training log print it)."""
    n = interval_steps(save_s, mtbi_s, step_s, max_interval)
    capped = " (capped by max_interval)" if n == max_interval else ""
    return (f"checkpoint interval auto: {n} steps{capped} = sqrt(2 x C {save_s:.2f} s ({save_what}) x "
            f"M {mtbi_s / 3600:.2f} h ({mtbi_source})) = {young_daly_s(save_s, mtbi_s):.0f} s "
            f"/ {step_s:.3f} s per step")


def explain_plan(save_s: float, save_what: str, mtbi_s: float, mtbi_source: str, max_interval: int) -> str:
    """The dry run's line: the interval in seconds and why; steps follow once steps are timed."""
    return (f"checkpoint interval auto: every ~{young_daly_s(save_s, mtbi_s):.0f} s = sqrt(2 x C ~{save_s:.2f} s "
            f"({save_what}) x M {mtbi_s / 3600:.2f} h ({mtbi_source})); in steps: that / the median step "
            f"time, at most max_interval={max_interval}, revised from measured saves as the job trains")


@dataclass
class AutoInterval:
    """The interval of one attempt under `interval: auto`, revised as steps and saves are timed.

    Every rank must save at the same steps, but each times its own steps and saves: `inputs()`
    gives this rank's (median step s, C, M), the caller agrees on them across ranks (one
    all-reduce, max) at steps every rank revises at (`revise_due`), and `revise` takes the agreed
    values. It returns a line to log when the interval changed by CHANGE_FRACTION or more (or was
    set for the first time), else None."""

    max_interval: int
    mtbi_s: float
    mtbi_source: str
    save_estimate_s: float  # C before the first save is timed
    revise_every: int = 10  # steps between revisions (and the step after each save)
    steps: int | None = None  # None until the first revision
    save_s: float | None = None  # the last measured blocking time of a save
    _times: deque[float] = field(default_factory=lambda: deque(maxlen=STEP_WINDOW))
    _saved: bool = False  # a save since the last revision

    def observe_step(self, seconds: float) -> None:
        self._times.append(seconds)

    def observe_save(self, blocked_s: float) -> None:
        self.save_s, self._saved = blocked_s, True

    def revise_due(self, step: int, resumed_step: int) -> bool:
        """The same answer on every rank: after the attempt's first step, every `revise_every`
        steps, and after a save (saves happen at the same steps everywhere)."""
        return step == resumed_step + 1 or step % self.revise_every == 0 or self._saved

    def inputs(self) -> list[float]:
        step_s = statistics.median(self._times) if self._times else 0.0
        return [step_s, self.save_s if self.save_s is not None else self.save_estimate_s, self.mtbi_s]

    def revise(self, step_s: float, save_s: float, mtbi_s: float) -> str | None:
        self._saved = False
        n = interval_steps(save_s, mtbi_s, step_s, self.max_interval)
        if self.steps is not None and abs(n - self.steps) < CHANGE_FRACTION * self.steps:
            return None
        self.steps = n
        what = "last save" if self.save_s is not None else "estimate"
        return explain(save_s, what, mtbi_s, self.mtbi_source, step_s, self.max_interval)

    def due(self, step: int, saved_step: int) -> bool:
        """Whether to save after `step`, the last save being at `saved_step` (-1: none)."""
        return self.steps is not None and step - max(0, saved_step) >= self.steps
