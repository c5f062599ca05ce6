"""An instant stand-in for ``asyncio.sleep``, so tests of retrying code never really wait."""

from __future__ import annotations

import time

__all__ = ("InstantSleep",)


class InstantSleep:
    """Records each wait and returns at once: ``RetryPolicy(sleep=InstantSleep())``.

    Pass its :meth:`clock` too (``KlarnaOM(..., clock=sleeps.clock)``) and deadlines pass as
    if the waits were real: a call that keeps meeting 429s ends at its ``deadline`` after a
    few dozen instant retries instead of minutes.
    """

    def __init__(self) -> None:
        #: Every wait asked for, in order, in seconds.
        self.waits: list[float] = []
        self._waited = 0.0

    async def __call__(self, seconds: float) -> None:
        """Record ``seconds`` and return without sleeping."""
        self.waits.append(seconds)
        self._waited += max(seconds, 0.0)

    def clock(self) -> float:
        """``time.monotonic()`` plus every wait asked for so far, in seconds."""
        return time.monotonic() + self._waited
