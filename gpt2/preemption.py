"""Stop requests: signals only set a flag; ranks agree at step boundaries.

USR2 is SLURM's time-limit warning (and its preemption signal with preempt_send_user_signal);
SIGTERM is what preemption sends elsewhere. A handler does nothing but record the request
(and when it came): all real work (agreeing, saving, exiting) happens in the training loop at a
safe point. Any rank may receive the signal; `agree()` (an all-reduce MAX that every rank calls
at each step boundary) makes every rank stop after the same step, and long loops inside a step
(eval) poll `requested()`. A wall-clock budget asks for a stop early enough to still finish a
step and a save in time.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from gpt2 import distributed

# Reasons, ordered so that an all-reduce MAX across ranks picks the most specific one.
NONE, TIME_BUDGET, SIGTERM, USR2 = 0, 1, 2, 3
REASONS = {TIME_BUDGET: "time_budget", SIGTERM: "SIGTERM", USR2: "USR2"}


class StopRequest:
    """USR2/SIGTERM handlers and the wall-clock budget of this process.

    `now` is the clock (a seam for tests); `time_budget_s` 0 means no budget. Set `margin_s` to
    the time one more step and a save are expected to take: the budget then runs out that much
    early. Handlers are installed by `install()` and the previous ones put back by `uninstall()`.
    """

    def __init__(self, time_budget_s: float = 0.0, now: Callable[[], float] = time.monotonic):
        self._now = now
        self._start = now()
        self._budget = time_budget_s
        self._code = NONE
        self._previous: dict[int, object] = {}
        self.margin_s = 0.0  # time the loop expects to need for one more step and a save
        self.requested_at: float | None = None  # now() when this rank first got a request

    def install(self) -> StopRequest:
        for sig, code in ((signal.SIGUSR2, USR2), (signal.SIGTERM, SIGTERM)):
            self._previous[sig] = signal.signal(sig, self._make_handler(code))
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def _make_handler(self, code: int) -> Callable[[int, object], None]:
        def handler(signum: int, frame: object) -> None:
            self._raise(code)  # only a flag and a timestamp: safe at any point

        return handler

    def _raise(self, code: int) -> None:
        if self.requested_at is None:
            self.requested_at = self._now()
        self._code = max(self._code, code)

    def local_code(self) -> int:
        """This rank's request: a signal it received, or the budget running out (0: none)."""
        if self._code == NONE and self._budget > 0 and self._now() - self._start + self.margin_s >= self._budget:
            self._raise(TIME_BUDGET)
        return self._code

    def requested(self) -> bool:
        """Whether this rank has a request; local and cheap, for polling inside long loops."""
        return self.local_code() != NONE

    def agree(self) -> int:
        """Collective: the strongest request of any rank (0 when none); every rank must call.

        Afterwards every rank holds that request, so all of them stop after the same step."""
        code = int(distributed.all_reduce([float(self.local_code())], op="max")[0])
        if code:
            self._raise(code)
        return code

    def seconds_since_request(self) -> float | None:
        """Time since this rank first got (or agreed to) a request; None when there is none."""
        return None if self.requested_at is None else self._now() - self.requested_at

    @staticmethod
    def reason(code: int) -> str | None:
        return REASONS.get(code)
