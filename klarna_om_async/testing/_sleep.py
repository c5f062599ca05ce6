"""An instant stand-in for ``asyncio.sleep``, so tests of retrying code never really wait."""

from __future__ import annotations

__all__ = ("InstantSleep",)


class InstantSleep:
    """Records each wait and returns at once: ``RetryPolicy(sleep=InstantSleep())``."""

    def __init__(self) -> None:
        #: Every wait asked for, in order, in seconds.
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        """Record ``seconds`` and return without sleeping."""
        self.waits.append(seconds)
