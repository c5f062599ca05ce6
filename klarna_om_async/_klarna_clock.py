"""Klarna's clock, as the ``Date`` header of its answers tells it.

A journal dates each idempotency key by this machine's clock, and later judges by that date
whether Klarna (which remembers a key for 24 hours) still does, and which of an order's
captures could be the key's. A clock that is off (no NTP, a virtual machine restored from a
snapshot, a clock set back between two runs) would make an expired key look fresh: resent,
it books again. Every answer carries Klarna's time (HTTP ``Date``, to the second), so a batch
checks its journal's clock against it before it sends (see ``ClockSkewError``).
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

__all__ = ("KlarnaClock", "clock_skew")


class KlarnaClock:
    """Klarna's time from the latest ``Date`` header seen, moved on by ``clock`` since."""

    def __init__(self, clock: Callable[[], float]) -> None:
        # ``clock``: the client's monotonic seconds (tests move it with the fake's time).
        self._clock = clock
        self._header: str | None = None
        self._told: datetime | None = None
        self._at = 0.0
        #: How many answers told the time (a ``Date`` header that is a date).
        self.dated = 0

    def saw(self, header: str | None) -> None:
        """Note an answer's ``Date`` header (parsed only when it changed: once a second)."""
        if header is None:
            return
        if header != self._header:
            self._header = header
            try:
                told = email.utils.parsedate_to_datetime(header)
            except (TypeError, ValueError):  # not a date: nothing known
                self._told = None
                return
            # A date without a zone ("-0000") is UTC, as HTTP dates always are.
            self._told = told.replace(tzinfo=UTC) if told.tzinfo is None else told.astimezone(UTC)
        elif self._told is None:
            return  # the same nonsense again
        self._at = self._clock()
        self.dated += 1

    def now(self) -> datetime | None:
        """Klarna's current time (UTC, to a second or so): the latest ``Date`` moved on by
        the time since its answer; None before any answer with one."""
        told = self._told
        if told is None:
            return None
        return told + timedelta(seconds=self._clock() - self._at)


def clock_skew(journal_now: datetime, klarna_now: datetime | None) -> timedelta | None:
    """A journal's clock minus Klarna's (None: Klarna's not known). A journal clock without
    a zone is read as UTC (``datetime.utcnow``): one that gives local time is off by the
    zone, and moves with it (daylight saving time)."""
    if klarna_now is None:
        return None
    return in_utc(journal_now) - klarna_now


def in_utc(when: datetime) -> datetime:
    """``when``; a time without a zone is read as UTC, as a journal clock's is. The journals
    read their clock and the times they stored so (a run on a zone-less clock, then a rerun
    on the default clock, raised TypeError at every date: helper-87)."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
