"""Error lines that can repeat once per request, at most one per interval.

A refusal that hits every request (the ledger's pending holds at their bound, say) would otherwise
write a line per request on the event loop: 21,000 lines in a few minutes in a soak. The first
occurrence is logged at once; later ones at most once per `interval_s`, saying how many were left
out in between. Counting them is the metrics' job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert interval_s > 0
        self._logger, self._interval_s, self._clock = logger, interval_s, clock
        self._next_s = float("-inf")
        self._left_out = 0

    def error(self, message: str, *args: object) -> None:
        self._emit(logging.ERROR, message, *args)

    def warning(self, message: str, *args: object) -> None:
        self._emit(logging.WARNING, message, *args)

    def _emit(self, level: int, message: str, *args: object) -> None:
        now_s = self._clock()
        if now_s < self._next_s:
            self._left_out += 1
            return
        if self._left_out:
            message += " (%d more like it since the last line)"
            args += (self._left_out,)
        self._logger.log(level, message, *args)
        self._left_out = 0
        self._next_s = now_s + self._interval_s
