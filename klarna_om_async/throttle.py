"""Pacing of attempts: a client-wide and a per-batch rate, and a client-wide pause after a 429.

Rates are kept on a fixed grid of send times (GCRA's virtual scheduling, :class:`Pace`).

Klarna counts requests per merchant, so when one request is told to slow down, every request
of the client waits out the same window instead of each one discovering the limit on its own.
The pause is capped (``RetryPolicy.retry_after_cap``), and a call never waits past its own
deadline for it: it fails with ``RateLimitError`` instead, having sent nothing.

The client's pace is, in this order of precedence: the user's ``rate_limit``; a limit Klarna
states (``X-Ratelimit-Limit``, paced at ``LEARNED_SHARE`` of it and cut by the 429s that come
anyway, :class:`StatedRate`); a pace learned from 429s
(:class:`AdaptiveRate`) when Klarna states none; else no pace.

Logs, on the logger ``klarna_om_async.throttle`` (structured fields in ``extra=``):

- INFO, at most one record per ``LOG_INTERVAL`` (10 s): the 429s Klarna answered, e.g.
  "Klarna rate limited 37 requests in the last 10 s (429; the last: RateLimitError: POST
  /ordermanagement/v1/orders/o-1/captures, key k-1); pace now 9.0 requests/s"
  (``rate_limited``: the count; ``interval``: the seconds it covers; ``pace``: requests/s or
  None; ``pause``: seconds the client is still paused; ``status``: 429; and the last 429's
  ``method``, ``path``, ``order_id``, ``idempotency_key``, ``correlation_id``). The first 429
  after a quiet interval is logged at once; later ones are counted and summarized by the
  first 429 or answer that comes ``LOG_INTERVAL`` or more after the last record.
- DEBUG: each drop of the learned or stated pace (``pace``, ``ceiling``, and the 429's
  fields).

No record carries credentials or a body.

Waits are reported to ``ThrottleMiddleware.wait_listeners`` (telemetry uses this), and a call
this middleware refuses without sending raises :class:`ThrottleRefusal` (``request_sent`` is
False), a ``RateLimitError`` Klarna never saw.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Final, Literal, TypeAlias

from .config import MAX_RATE_LIMIT, check_rate_limit
from .errors import KlarnaAPIError, RateLimitError, header_number, reset_after
from .middleware import Handler, Request, Response, log_fields

__all__ = (
    "AdaptiveRate",
    "Pace",
    "SlowStart",
    "StatedRate",
    "ThrottleMiddleware",
    "ThrottleRefusal",
    "WaitListener",
    "WaitReason",
    "rate_limited",
)

logger = logging.getLogger("klarna_om_async.throttle")

#: Seconds one summary record of 429s covers at most: a storm logs one record per interval.
LOG_INTERVAL = 10.0

#: Why the throttle held a request back: ``"pause"`` (a 429 or ``X-Ratelimit-Remaining: 0``
#: paused the client), ``"pace"`` (waiting for a slot of a pace), ``"ramp"`` (slow start).
WaitReason: TypeAlias = Literal["pause", "pace", "ramp"]
#: Called after each wait as ``listener(reason, seconds, request)``; must not raise or block.
WaitListener: TypeAlias = Callable[[WaitReason, float, Request], None]


class ThrottleRefusal(RateLimitError):
    """A ``RateLimitError`` the throttle raised without sending the request: Klarna saw nothing.

    Raised when a 429 pause, a pace slot or a connection queue would keep the call past its
    deadline. ``retry_after`` is the wait that was left; ``request_sent`` is always False.
    """

    #: False: no attempt reached Klarna (as on ``KlarnaConnectionError``).
    request_sent: Final = False
    #: True: the throttle held it back; a retry loop counts no attempt for it.
    refused_by_throttle: Final = True

    def __str__(self) -> str:
        # Not "429 on POST ...": Klarna never saw it.
        where = f" ({self.method} {self.url})" if self.method else ""
        return f"{'; '.join(self.error_messages)}{where}.{self._retry_hint()}"


class Pace:
    """Send times on a fixed grid ``1 / per_second`` apart (GCRA's virtual scheduling).

    Each request takes the next free slot when it asks, so a task that wakes late never
    pushes later slots back, and an idle spell banks no burst: no interval of the grid's
    length ever holds two sends. (``aiolimiter``'s bucket of one, used before, scheduled from
    each wake-up and drifted to 86-89% of the rate under load.)

    ``per_second``: finite, ``MIN_RATE_LIMIT`` to ``MAX_RATE_LIMIT`` (``ValidationError``).
    """

    def __init__(self, per_second: float) -> None:
        check_rate_limit(per_second)
        #: Seconds between two sends; changing it moves only the slots handed out later.
        self.interval = 1.0 / per_second
        #: Bumped by :meth:`restart`: a holder of a slot taken before must take a new one.
        self.generation = 0
        self._next = -math.inf
        self._held = -math.inf  # no slot before this (see hold), whatever restarts it

    @classmethod
    def under(cls, limit: float) -> Pace:
        """A pace at ``LIMIT_SHARE`` of a limit the user gives (``rate_limit``), validated as
        ``Pace`` validates; see ``LIMIT_SHARE`` for why not at the limit itself."""
        pace = cls(limit)  # validates it
        pace.interval = 1.0 / (limit * LIMIT_SHARE)
        return pace

    def peek(self, now: float) -> float:
        """The seconds from ``now`` until the next free slot, without taking it."""
        return self._next - now if self._next > now else 0.0

    def delay(self, now: float) -> float:
        """Take the next free slot; the seconds from ``now`` until it (0 if it is now)."""
        slot = self._next if self._next > now else now
        self._next = slot + self.interval
        return slot - now

    def restart(self, now: float) -> None:
        """Void the slots taken beyond ``now`` (after the interval changed; ``generation``
        tells their holders to take new ones). The next slot is at most one interval after
        ``now``, never sooner, so a send at ``now`` and the next are an interval apart; nor
        before the end of a :meth:`hold`."""
        self._next = max(min(self._next, now + self.interval), self._held)
        self.generation += 1

    def respace(self, per_second: float, now: float) -> None:
        """Hand out slots ``1 / per_second`` apart from ``now`` on (see :meth:`restart`). A
        hold still to come counts sends on the old spacing: it is rescaled to the new one
        (the opening ramp's sends at 1 per second hold 16 s; at 100 per second, 0.16 s)."""
        check_rate_limit(per_second)
        interval = 1.0 / per_second
        if self._held > now:
            self._held = now + (self._held - now) * interval / self.interval
        self.interval = interval
        self.restart(now)

    def defer(self, until: float) -> None:
        """Void the slots taken before ``until`` (see :meth:`voided`) and hand out none before
        it; the slots taken from ``until`` on hold. For a send that left after its slot, held
        back by another pace: the next keeps its interval after it."""
        self._held = max(self._held, until)
        self._next = max(self._next, until)

    def backlog(self, now: float) -> float:
        """How many slots are taken ahead of ``now`` (after any hold): requests waiting for
        their turn on this grid."""
        return max(self._next - max(now, self._held), 0.0) / self.interval

    def voided(self, slot: float) -> bool:
        """Whether the slot at ``slot``, taken before, was voided since (by a hold or
        :meth:`defer`)."""
        return slot < self._held

    def hold(self, until: float) -> None:
        """Void the slots taken (``generation`` tells their holders) and hand out none before
        ``until``: a 429 paused the client, and a slot taken before it would send into the
        window Klarna just said is full."""
        self._next = self._held = max(until, self._held)
        self.generation += 1


# Set by a batch for the tasks it starts, so concurrent batches and single calls sharing one
# client each keep their own limit (on top of the client's own pace, if it has one).
_batch_pace: ContextVar[Pace | None] = ContextVar("klarna_om_batch_pace", default=None)

_LIMIT = "X-Ratelimit-Limit"
_REMAINING = "X-Ratelimit-Remaining"
#: Share of a limit Klarna states that the client paces at.
LEARNED_SHARE = 0.95
#: Share of a ``rate_limit`` the user gives that the client paces at. A send leaves a little
#: after its slot (a connection, the event loop), so on a grid at exactly R per second one
#: send now and then slips into Klarna's next 1-second window, which then holds R + 1: a 429
#: whose ``Retry-After`` (whole seconds) stalls the client for up to a second. Measured at
#: R = 200 against fixed windows: 1 run in 4 took 1.09-1.16x the floor N/R, with 1-3 429s.
LIMIT_SHARE = 0.99


#: Pause after a 429 that did not say how long to wait (unless a learned pace already
#: exists: see ``AdaptiveRate``).
DEFAULT_RATE_LIMIT_PAUSE = 1.0
#: The longest pause a 429 imposes unless told otherwise: ``RetryPolicy``'s default cap.
DEFAULT_MAX_PAUSE = 30.0

#: ``AdaptiveRate``: after a 429 the pace drops to this share of the rate Klarna let through.
ADAPTIVE_DECREASE = 0.9
#: ``AdaptiveRate``: seconds the pace takes to climb back to the rate Klarna let through.
ADAPTIVE_RECOVERY = 4.0
#: ``AdaptiveRate``: the estimate is dropped (no pace) once the pace has climbed to this
#: multiple of it without another 429.
ADAPTIVE_FORGET = 2.0
#: ``AdaptiveRate``: seconds over which answers are counted (Klarna counts per second).
ADAPTIVE_WINDOW = 1.0
#: ``AdaptiveRate``: the lowest estimate, in requests per second.
MIN_ADAPTIVE_RATE = 1.0
#: ``AdaptiveRate``: the grid is laid anew (slots taken on it void) once the pace has climbed
#: this much above the rate it was laid at, so requests asleep on far slots move up.
ADAPTIVE_REGRID = 1.1
#: ``ThrottleMiddleware``: a request asleep on the learned grid wakes at least this often to
#: see whether the grid was laid anew (a 429, a climb) or forgotten.
ADAPTIVE_STEP = 0.25
#: ``AdaptiveRate``: a 429 says the pace itself was too fast (and the answers let through in
#: the last window are the limit) once at least this share of that window's answers were 429s.
ADAPTIVE_REFUSED_SHARE = 0.05
#: ``AdaptiveRate``: answers over the last two windows at no less than this share of the
#: learned pace say the client was sending at its pace (a pace too fast, its 429s each held
#: back by a probe), so they are the limit; fewer say it sent below its pace (a batch's tail,
#: a web service's calls), which tells nothing of the limit.
ADAPTIVE_PACE_BOUND = 0.5
#: ``ThrottleMiddleware``: a 429 that states no wait pauses a client with a learned pace this
#: long (seconds): sent into a full window, the next requests would all get 429s.
ADAPTIVE_PROBE = 0.1
#: ``SlowStart``: attempts in flight at first, while nothing is known of the limit.
SLOW_START_WINDOW = 16


class AdaptiveRate:
    """A client pace learned from 429s, for when Klarna states no limit (no headers).

    The estimate ``W`` (``ceiling``) is the rate Klarna lets through. At the first 429 it is
    the answers other than 429 the client got in the last ``ADAPTIVE_WINDOW`` (1 s, the span
    Klarna counts over); answers to requests already in flight keep coming after the 429, so
    ``W`` rises to the highest such count until one window after the pause. A first 429 that
    comes before any answer (a batch's opening burst) waits for those answers: the ones that
    come before its pause ends are the estimate, and the requests the pause held back leave
    on that grid, not all at once. At a later 429 ``W`` is the learned rate the client was
    at, or what it measurably got through if that was less: when at least
    ``ADAPTIVE_REFUSED_SHARE`` of the last window's answers were 429s (the pace itself is
    too fast: a token bucket's first burst, or an opening burst that two of Klarna's windows
    let through, made ``W`` too high), the answers of the last two windows, averaged (one
    window's may hold the last overshoot's 429s and a pause, or two of Klarna's windows);
    when two windows passed without a pause (a client that sent below its pace), the last
    window's; when only a decrease came in them (no pause, not the opening), the two
    windows' average if it is at least ``ADAPTIVE_PACE_BOUND`` of the pace: a pace too fast
    for a token bucket meets a 429 in every window, but the probe's pause after each holds
    every request back, so the 429s are too few for a refused share while what got through
    is the limit. ``W`` is at least ``MIN_ADAPTIVE_RATE``.

    - Decrease: on a 429 the pace drops to ``ADAPTIVE_DECREASE * W``: 0.9, because ``W`` is
      measured, not guessed, so 10% under it leaves room for clock skew and the merchant's
      other clients at little cost (TCP's halving would idle half the quota for seconds).
      One decrease per event: a 429 to a request that came to the throttle before the last
      decrease belongs to it (with 128 requests in flight or waiting for their slots, one
      overshoot comes back as a burst of 429s).
    - Increase: ``t`` seconds later (counted from the end of the 429's pause) the rate is
      ``W * (1 + (1 - ADAPTIVE_DECREASE) * (t / ADAPTIVE_RECOVERY - 1) ** 3)``: CUBIC's
      curve (RFC 9438, which AWS's SDKs also use to pace their "adaptive" retry mode), scaled
      to ``W``. It climbs fast, flattens just below ``W`` (99% after 2 s, ``W`` after
      ``ADAPTIVE_RECOVERY`` = 4 s), then probes above it ever faster (+1% after about 5.5 s,
      +10% after 8 s), so the pace settles just under the limit and meets the next 429
      seconds later, not every second; yet a limit that was raised is found within seconds.
      A straight line would either crawl back for long under ``W`` or overshoot again soon.
    - Forget: once the curve reaches ``ADAPTIVE_FORGET * W`` (about 12.6 s without a 429),
      the client has not been sending that fast or the limit has gone: the estimate is
      dropped (no pace) and the next 429 starts over.

    A 429 teaches nothing when no answer came in the last window and none comes before its
    pause ends (a lone call, or a second in which another client of the merchant used up the
    quota): zero is no measured rate, and the pause suffices (``ThrottleMiddleware`` pauses
    1 s then, even with a learned pace, which it keeps). One decrease per
    ``ADAPTIVE_WINDOW`` at most.

    Everything is computed from the times passed in (the client's ``clock``): deterministic.
    """

    def __init__(self) -> None:
        #: ``W``: the rate Klarna lets through, as last estimated (0: no estimate).
        self.ceiling = 0.0
        #: How many times a 429 lowered the pace.
        self.decreases = 0
        #: The grid the learned rate is kept on; None while there is no estimate.
        self.pace: Pace | None = None
        #: When a 429 last lowered the pace (or waited for answers to learn one from).
        self.decided_at = -math.inf
        # When each non-429 answer of the last two windows came (in order: one window's
        # count is a bisection, taken only at a 429 or while refining a first estimate).
        self._answers: deque[float] = deque()
        self._refusals: deque[float] = deque()  # when each recent 429 came
        self._since = -math.inf  # when the climb started (the end of that 429's pause)
        self._paused_until = -math.inf  # the end of the last pause a 429 imposed
        self._refine_until = -math.inf  # answers raise a first estimate until then
        self._grid_rate = 0.0  # the rate the grid was last laid at (ADAPTIVE_REGRID)

    def measured(self, now: float) -> int:
        """The answers other than 429 in the last ``ADAPTIVE_WINDOW`` before ``now``."""
        answers = self._answers
        return len(answers) - bisect.bisect_right(answers, now - ADAPTIVE_WINDOW)

    def answered(self, now: float) -> None:
        """Note an answer other than 429: Klarna counted that request and let it through."""
        answers = self._answers
        answers.append(now)
        cutoff = now - 2 * ADAPTIVE_WINDOW
        while answers[0] <= cutoff:
            answers.popleft()
        if now < self._refine_until and (count := self.measured(now)) > self.ceiling:
            self.ceiling = float(count)  # answers to requests in flight at the 429
            if self.pace is None:  # the first 429 came before any answer: now there is one
                self._lay(self.ceiling, now)

    def limited(self, asked_at: float, now: float, resume_at: float) -> bool:
        """Lower the pace after a 429 (``resume_at``: when the pause it imposed ends).

        ``asked_at``: when the refused request came to the throttle (``-inf``: before the
        first decision). False (nothing learned yet) when the request came within
        ``ADAPTIVE_WINDOW`` after the last decision (the same overshoot: Klarna's window may
        still be full) or no other answer came in the last window (nothing was measured;
        without a pace, the answers that come before the pause ends then set one).
        """
        if resume_at > now + ADAPTIVE_PROBE:  # a probe's pause leaves the measure whole
            self._paused_until = max(self._paused_until, resume_at)
        self._refusals.append(now)
        last = self.decided_at
        if last > -math.inf and asked_at <= last + ADAPTIVE_WINDOW:
            return False
        measured = float(self.measured(now))
        current = self.rate_at(now)
        if not measured:
            if current is None:
                # A batch's opening burst: the answers still to come to the requests in
                # flight (until the pause ends; later ones are to requests it held back).
                # A pace forgotten (climbed far past its estimate) goes too: laid at a
                # ceiling of 0 it would have no interval.
                self.decided_at = now
                self._since = max(now, resume_at)
                self._refine_until = max(now, resume_at)
                self.pace, self.ceiling = None, 0.0
            return False
        refused = _within(self._refusals, now)
        steady = _within(self._answers, now, 2 * ADAPTIVE_WINDOW) / 2
        if current is None:
            ceiling = measured
        elif refused >= max(2.0, ADAPTIVE_REFUSED_SHARE * (measured + refused)):
            # The pace was too fast: what got through is W. One window's answers miscount it
            # (Klarna's windows fall anywhere in ours): they hold the last overshoot's
            # refusals or a pause (too few), or two of Klarna's windows (too many). Two
            # windows' average is steadier.
            ceiling = min(current, steady)
        elif now - 2 * ADAPTIVE_WINDOW >= max(self._paused_until, last):
            ceiling = min(current, measured)
        elif now - 2 * ADAPTIVE_WINDOW >= self._paused_until and (
            steady >= ADAPTIVE_PACE_BOUND * current
        ):
            # A decrease came lately, so the last window may still hold its overshoot; but
            # a client that sent at its pace got through what the two windows' answers say:
            # fewer than the pace when a pace too fast met a 429 in every window (each held
            # back by a probe). Far fewer: it sent below its pace, which tells nothing.
            ceiling = min(current, steady)
        else:  # a pause or the opening came lately, or the client sent below its pace
            ceiling = current
        self.ceiling = max(ceiling, MIN_ADAPTIVE_RATE)
        self.decided_at = now
        self._since = max(now, resume_at)
        if current is None:  # the opening: answers before it came at a ramp's pace
            self._paused_until = max(self._paused_until, self._since)
        self._refine_until = self._since + ADAPTIVE_WINDOW if current is None else -math.inf
        self.decreases += 1
        self._lay(self.ceiling, now)
        return True

    def _lay(self, ceiling: float, now: float) -> None:
        """Lay the grid at ``ADAPTIVE_DECREASE`` of ``ceiling`` from ``now``."""
        self._grid_rate = min(ADAPTIVE_DECREASE * max(ceiling, MIN_ADAPTIVE_RATE), MAX_RATE_LIMIT)
        if self.pace is None:
            self.pace = Pace(self._grid_rate)
        else:
            # With 128 requests asleep on the grid, the slots they hold reach seconds ahead
            # at the old rate: they take new ones when they wake (ThrottleMiddleware).
            self.pace.interval = 1.0 / self._grid_rate
            self.pace.restart(now)

    def rate_at(self, now: float) -> float | None:
        """Requests per second the learned pace allows at ``now``; None without one."""
        if self.pace is None:
            return None
        rate = _climb(self.ceiling, self._since, now)
        return None if rate > ADAPTIVE_FORGET * self.ceiling else min(rate, MAX_RATE_LIMIT)

    def pace_at(self, now: float) -> Pace | None:
        """The pace with its interval moved along the curve to ``now``; None without one."""
        pace = self.pace
        if pace is None:
            return None
        rate = self.rate_at(now)
        if rate is None:
            self.pace, self.ceiling = None, 0.0
            return None
        pace.interval = 1.0 / rate
        if rate >= ADAPTIVE_REGRID * self._grid_rate:
            self._grid_rate = rate
            pace.restart(now)  # the sleepers on far slots move up (ThrottleMiddleware)
        return pace


#: ``StatedRate``: requests waiting for their turn on the pace that say the client sends as
#: fast as its pace lets it (a web service's call and its retry meet in one slot now and
#: then: that is no queue).
STATED_BACKLOG = 2.0
#: ``StatedRate``: calls refused in the last window (a call's retries count once) that say
#: the client's own sends overshoot the limit, whatever its pace (a batch whose concurrency
#: keeps it under the pace, beside another worker); a web service's calls meet fewer. (5
#: left two to four such workers at 429s for ever.)
STATED_REFUSALS = 3
#: ``ThrottleMiddleware``: a 429 under a stated pace that says to wait this long or longer
#: (``Retry-After``, ``X-Ratelimit-Reset``) pauses the client and cuts nothing. Under 1 s:
#: "1 s" written as a Unix time or an HTTP date arrives a little short of it.
STATED_TOLD_WAIT = 0.9


class StatedRate:
    """The client's pace at a limit Klarna states (``X-Ratelimit-Limit``), cut by 429s.

    Paced at ``LEARNED_SHARE`` of the stated limit. The limit is the merchant's, not this
    client's: two workers (or a web service and a batch) each pacing at it send twice what
    Klarna lets through, and a limit stated wrong is never corrected by the headers. So a 429
    cuts the pace when the client sends at its pace, that is when ``STATED_BACKLOG``
    requests or more wait for their turn on it, the last ``ADAPTIVE_WINDOW`` had at least
    ``ADAPTIVE_PACE_BOUND`` of the pace in answers, or ``STATED_REFUSALS`` of its calls or
    more met a 429 in that window (its own sends overshoot, though its concurrency keeps it
    under the pace). The pace drops to ``ADAPTIVE_DECREASE`` of ``W``: what got through in
    that window, when no pause longer than ``ADAPTIVE_PROBE`` fell in it and it was less
    than the pace (at most halving it); else the pace itself. A lone 429 to a client sending
    far below its pace (a web service's call; another client used the quota up) tells
    nothing of the limit: its pause is the slowdown, as it is for a 429 that says to wait
    ``STATED_TOLD_WAIT`` (1 s) or more (the workers that are not paused have the window:
    the pauses share the quota out). One cut per window: the 429s to
    requests sent within a window after a cut belong to the overshoot it answered. From the
    end of the 429's pause the pace climbs back on ``AdaptiveRate``'s curve (flat just under
    ``W``, then probing above it), up to the stated rate, or back to it at once on reaching
    ``ADAPTIVE_FORGET * W`` (about 12.6 s without a 429): clients that share one quota and
    do the same settle under it, each meeting a 429 seconds apart rather than every second.

    A limit stated anew below the pace is the pace from then on. Otherwise it only moves
    the stated rate the pace climbs to, or, with no cut to climb back from, re-spaces the
    pace when it is more than ``ADAPTIVE_REGRID`` above it (Klarna raised the limit).
    """

    def __init__(self, limit: float, now: float) -> None:
        rate = min(limit * LEARNED_SHARE, MAX_RATE_LIMIT)
        #: The stated limit (requests per second), as last stated.
        self.limit = limit
        #: The grid the pace is kept on.
        self.pace = Pace(rate)
        #: How many times a 429 cut the pace.
        self.cuts = 0
        self._stated = rate  # the pace without cuts
        self._ceiling = rate  # W: the pace a 429 answered
        self._climbing = False  # back up to _stated, from a cut
        self._cut_rate = rate  # the pace the last cut set: the climb starts there
        self._grid_rate = rate  # the rate the grid was last laid at (ADAPTIVE_REGRID)
        # The pace was set then: requests sent before a second after it were sent into a
        # window the setting had not seen (the 429s of the opening, say).
        self._set_at = now
        self._since = now  # when the climb starts (the end of the last cut's pause)

    def state(self, limit: float, now: float) -> None:
        """Klarna stated ``limit`` (requests per second) again."""
        if limit == self.limit:
            return
        self.limit = limit
        rate = min(limit * LEARNED_SHARE, MAX_RATE_LIMIT)
        current = 1.0 / self.pace.interval
        if rate < current or (not self._climbing and rate > ADAPTIVE_REGRID * current):
            # A lowered limit slower than the pace, or a limit raised far past an uncut
            # pace: the same grid, re-spaced (a new one would give its first slot at once,
            # and the slots taken on the old spacing would all be kept). Not for a limit
            # raised a little: one stated as 20, 21, 20, ... would re-space it at every
            # answer.
            self._stated = self._ceiling = self._grid_rate = rate
            self._climbing = False
            self.pace.respace(rate, now)
        elif self._climbing:
            # The pace climbs to it, as the cuts allow: a restated limit is no news of
            # the quota the merchant's other clients use (two workers, stated 20 and 19 in
            # turn, would otherwise undo each other's cuts at every answer).
            self._stated = rate

    def limited(
        self,
        *,
        sent_at: float,
        now: float,
        resume_at: float,
        paused_until: float,
        measured: int,
        backlog: float,
        refused: int,
    ) -> bool:
        """Cut the pace after a 429 to a request sent at ``sent_at``.

        ``resume_at``: when the pause it imposed ends; ``paused_until``: the end of the last
        pause longer than a probe's before it; ``measured``: the answers other than 429 of
        the last window; ``backlog``: the requests waiting for their turn on the pace
        (``Pace.backlog``); ``refused``: the calls refused in the last window, this one
        included (a call's retries count once). False (no cut) when the 429 belongs to the
        last cut's overshoot, or came to a client sending far below its pace.
        """
        if sent_at <= self._set_at + ADAPTIVE_WINDOW:
            return False
        current = 1.0 / self.pace.interval
        sending = backlog >= STATED_BACKLOG or measured >= ADAPTIVE_PACE_BOUND * current
        if not sending and refused < STATED_REFUSALS:
            return False
        ceiling = current
        if now - ADAPTIVE_WINDOW >= paused_until and measured:
            # No pause undercounts it; at most halved by one 429 (two requests that met in
            # a pace slot now and then do not make a web service's calls the limit).
            ceiling = max(min(ceiling, float(measured)), ADAPTIVE_PACE_BOUND * current)
        self._ceiling = max(ceiling, MIN_ADAPTIVE_RATE)
        # Never faster than it was (a limit of 1/s is paced at 0.95/s, under the floor).
        self._grid_rate = min(max(ADAPTIVE_DECREASE * self._ceiling, MIN_ADAPTIVE_RATE), current)
        self._cut_rate = self._grid_rate
        self._set_at = now
        self._since = max(now, resume_at)
        self._climbing = True
        self.cuts += 1
        self.pace.respace(self._grid_rate, now)
        return True

    def pace_at(self, now: float) -> Pace:
        """The pace with its interval moved along the climb to ``now``."""
        pace = self.pace
        if self._climbing:
            climbed = max(_climb(self._ceiling, self._since, now), self._cut_rate)
            if climbed > ADAPTIVE_FORGET * self._ceiling:
                climbed = self._stated  # no 429 for seconds: the cuts are forgotten
            rate = min(climbed, self._stated)
            self._climbing = rate < self._stated
            pace.interval = 1.0 / rate
            if rate >= ADAPTIVE_REGRID * self._grid_rate:
                self._grid_rate = rate
                pace.restart(now)  # the sleepers on far slots move up (ThrottleMiddleware)
        return pace


def _climb(ceiling: float, since: float, now: float) -> float:
    """The rate ``now`` on the climb back from a cut to ``ADAPTIVE_DECREASE * ceiling`` at
    ``since``: CUBIC's curve (see ``AdaptiveRate``), scaled to ``ceiling``."""
    climbed = max(now - since, 0.0) / ADAPTIVE_RECOVERY - 1.0
    return ceiling * (1.0 + (1.0 - ADAPTIVE_DECREASE) * climbed**3)


def _within(times: deque[float], now: float, span: float = ADAPTIVE_WINDOW) -> int:
    """How many of ``times`` lie in the last ``span`` seconds before ``now`` (older ones
    are dropped)."""
    cutoff = now - span
    while times and times[0] <= cutoff:
        times.popleft()
    return len(times)


class SlowStart:
    """At most ``window`` attempts in flight, one more after each answer, until :meth:`end`.

    While nothing is known of Klarna's limit, a batch's opening burst (128 requests at once)
    would meet it long before the first answer tells anything: at 50 requests/s, 78 of them
    get a 429. TCP's slow start instead: ``SLOW_START_WINDOW`` at first, one more per answer
    (the window doubles every round trip, so it reaches a 128-request batch in three), so the
    first 429 comes when the client is barely over the limit. ``ThrottleMiddleware`` ends it
    at the first 429 (the learned pace takes over) or stated limit; it ends by itself once
    the window, doubled at least once, is twice the most attempts ever in flight (the window
    no longer binds).
    """

    def __init__(self, window: int = SLOW_START_WINDOW) -> None:
        #: How many attempts may be in flight now.
        self.window = window
        #: Attempts in flight (between :meth:`enter` and :meth:`leave`).
        self.in_flight = 0
        #: True once it ended: no attempt waits any more.
        self.over = False
        self._first = window
        self._peak = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def enter(self) -> None:
        """Wait until the window has room for one more attempt (or slow start is over)."""
        while not self.over and self.in_flight >= self.window:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                self._wake()  # if it was woken, the room it was given goes to the next
                raise
        self.in_flight += 1
        if self.in_flight > self._peak:
            self._peak = self.in_flight

    def leave(self) -> None:
        """An attempt was answered (or failed): one fewer in flight, and one more allowed."""
        self.in_flight -= 1
        if self.over:
            return
        self.window += 1
        # Not before the window has doubled once: a lone call first (a journaled batch reads
        # an order for Klarna's time before it claims anything) peaks at 1, and ending there
        # let the batch's 128 first sends go at once (at 50/s, 84 429s per 1,000 instead of 13).
        if self.window > 2 * self._peak and self.window >= 2 * self._first:
            self.end()
        else:
            self._wake()

    def end(self) -> None:
        """No window from now on: every waiting attempt goes on."""
        self.over = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _wake(self) -> None:
        room = self.window - self.in_flight
        waiters = self._waiters
        while room > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                room -= 1


@contextlib.contextmanager
def rate_limited(requests_per_second: float | None) -> Iterator[None]:
    """Within this block (and tasks started in it), send at most this many attempts a second
    (paced at ``LIMIT_SHARE`` of it).

    ``requests_per_second``: None (no limit) or a finite number greater than 0 and at most
    ``MAX_RATE_LIMIT`` (10,000); anything else raises ``ValidationError`` (a ``ValueError``).
    """
    pace = None if requests_per_second is None else Pace.under(requests_per_second)
    token = _batch_pace.set(pace)
    try:
        yield
    finally:
        _batch_pace.reset(token)


class ThrottleMiddleware:
    """Waits for the batch's rate limiter and for any pause a 429 imposed on the client.

    A 429 pauses every call of the client for its ``Retry-After`` seconds (1 s if it gave
    none), capped at ``max_pause`` seconds (the client passes ``retry_after_cap``), so one
    ``Retry-After: 3600`` cannot stall the client for an hour. ``clock`` must be the retry
    middleware's: a request's ``deadline`` is a time on it. When waiting out the pause would
    pass the request's deadline, nothing is sent and ``RateLimitError`` is raised at once
    (``retry_after`` = the pause left; not an unknown outcome by itself), which the retry
    loop gives up with. ``base_url`` only completes the URL such an error reports.

    Without ``pace`` (the user's ``rate_limit``), a limit stated in ``X-Ratelimit-Limit`` (on
    any answer, 429s included) paces the client, and 429s that come anyway cut that pace
    (``StatedRate``). Without either, a 429 gives the client a pace learned from the rate
    Klarna let through (``AdaptiveRate``): the requests the pause held back then leave on
    that grid, one by one. When the last second let answers through, a 429 without a wait (no
    ``Retry-After``, ``Retry-After: 0``, a date gone by) lowers that pace and pauses the
    client only ``ADAPTIVE_PROBE`` (0.1 s): the lower pace is the slowdown, and the short
    pause probes Klarna's full window with one request at a time instead of the full pace.
    Every 429 voids the learned grid's slots taken before it (``Pace.hold``): a request
    asleep on one takes a new slot after the pause rather than waking into the full window.
    Until then (nothing known of the limit) attempts ramp up (``SlowStart``) rather than
    opening with the whole batch at once. The transport calls :meth:`recheck` once an attempt
    has its connection, so an attempt that waited for one while a 429 paused the client still
    waits the pause out (or is refused, unsent) before it is sent.
    """

    def __init__(
        self,
        *,
        sleep: Callable[[float], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
        max_pause: float = DEFAULT_MAX_PAUSE,
        base_url: str = "",
        pace: Pace | None = None,
    ) -> None:
        if not max_pause >= 0:
            raise ValueError(f"max_pause must be >= 0, got {max_pause!r}")
        self._pace = pace
        #: The pace at a limit Klarna stated (used only without ``pace``); None: none stated.
        self.stated: StatedRate | None = None
        #: The pace learned from 429s (used only without ``pace`` and a stated limit).
        self.adaptive = AdaptiveRate()
        #: The opening ramp while nothing is known of the limit (None: over, or a ``pace``).
        self.slow_start: SlowStart | None = SlowStart() if pace is None else None
        #: How many answers with status 429 this client received from Klarna (a call refused
        #: here, unsent, is not one).
        self.rate_limited_count = 0
        self._sleep = sleep
        self._clock = clock
        self._max_pause = max_pause
        self._base_url = base_url
        self._resume_at = 0.0
        self._paused_until = -math.inf  # the end of the last pause longer than a probe
        self._refusals: deque[tuple[float, str]] = deque()  # (when, which call) of 429s
        #: Called after every wait this middleware imposes (``WaitListener``); empty costs
        #: nothing. ``klarna_om_async.telemetry.instrument`` adds one.
        self.wait_listeners: list[WaitListener] = []
        self._unlogged = 0  # 429s counted since the last summary record
        self._logged_at = -math.inf  # when the last summary record was written
        self._last_429: tuple[Request, RateLimitError] | None = None

    @property
    def rate(self) -> float | None:
        """Attempts per second the client's pace allows now (the user's ``rate_limit``, else
        95% of a limit Klarna stated, as 429s cut it, else the one learned from 429s); None:
        no pace."""
        if self._pace is not None:
            return 1.0 / self._pace.interval
        if self.stated is not None:
            return 1.0 / self.stated.pace_at(self._clock()).interval
        return self.adaptive.rate_at(self._clock())

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Send ``request`` once any 429 pause is over and the paces give it a slot.

        A limit Klarna states (``X-Ratelimit-Limit``) paces later requests when the client
        has no ``rate_limit`` of its own; ``X-Ratelimit-Remaining: 0`` pauses the client until
        ``X-Ratelimit-Reset``. Without either, 429s teach the client a pace (``AdaptiveRate``).

        Raises ``RateLimitError`` without sending when the pause or a pace slot lies past the
        call's deadline.
        """
        starting = self.slow_start
        ramped = False
        if starting is not None:  # before the pause and the paces: a 429 ends it, they stay
            if not starting.over and starting.in_flight >= starting.window:
                began = self._clock()
                await starting.enter()
                ramped = True
                if self.wait_listeners:
                    self._waited("ramp", self._clock() - began, request)
            else:
                await starting.enter()
        try:
            if ramped:
                what = "room in the opening ramp (the limit is not known yet)"
                self._check_waited(request, self._clock(), what)
            if self._resume_at:  # 0.0 unless a 429 paused the client and nobody waited since
                await self._wait_pause(request)
            adaptive = self.adaptive
            stated = self.stated if self._pace is None else None
            learning = self._pace is None and stated is None
            # When it came, for telling a new overshoot from the last one; before any
            # decision, "earlier than any" (-inf) says the same without reading the clock.
            asked_at = self._clock() if learning and adaptive.decided_at > -math.inf else -math.inf
            # The paces come after the pause, so requests released together leave one by one.
            if self._pace or stated or adaptive.pace or _batch_pace.get() is not None:
                await self._take_slots(request)
            # When it left, for telling a 429 to the stated pace from one sent before it.
            sent_at = self._clock() if stated is not None else -math.inf
            counting = self._pace is None  # answers measure the limit, stated or learned
            try:
                response = await call_next(request)
            except ThrottleRefusal:
                raise  # refused by `recheck`: Klarna saw nothing
            except RateLimitError as error:
                self._rate_limited(error, asked_at, sent_at, request)
                raise
            except KlarnaAPIError:
                if counting:
                    adaptive.answered(self._clock())  # refused, but let through
                if self._unlogged:
                    self._log_rate_limited(self._clock())
                raise
            if counting:
                adaptive.answered(self._clock())
            if self._unlogged:  # a 429 storm's count waits for its interval to end
                self._log_rate_limited(self._clock())
            headers = response.headers
            if _LIMIT in headers or _REMAINING in headers:
                self._learn(headers)
            return response
        finally:
            if starting is not None:
                starting.leave()
                if starting.over and self.slow_start is starting:
                    self.slow_start = None  # over by itself: later calls skip it entirely

    def _check_waited(self, request: Request, now: float, what: str) -> None:
        """Refuse (nothing sent) a call that waited for ``what`` until past its deadline."""
        deadline: float | None = getattr(request, "deadline", None)
        if deadline is not None and now > deadline:
            raise self._refusal(
                request,
                0.0,
                deadline - now,
                "",
                message=f"not sent: the call waited for {what} until {now - deadline:.1f}s past"
                " its deadline",
            )

    def _rate_limited(
        self, error: RateLimitError, asked_at: float, sent_at: float, request: Request
    ) -> None:
        """Pause the client after a 429 and lower its pace: the stated one (learning it from
        the 429's headers if none was), else the learned one."""
        self.rate_limited_count += 1
        now = self._clock()
        if error.stated_limit is not None and self._pace is None:
            self._learn_limit(error.stated_limit)  # some servers state it on 429s alone
        stated = self.stated if self._pace is None else None
        learning = self._pace is None and stated is None
        if learning:
            self._end_slow_start()  # the pace learned from this 429 takes over
        pause = error.retry_after
        # `not >=` also catches nan. "Retry-After: 0" (or a date gone by) sets no wait, but
        # the 429 still says "too fast": a learning client treats it as saying nothing.
        if pause is None or not pause >= 0 or (learning and pause == 0):
            # With a pace learned or stated (cut by this 429), or to be learned from the
            # answers of the last second, the lower pace is the slowdown; the short pause
            # only probes for the end of Klarna's full window instead of sending into it at
            # the full pace (one 429 per probe, not one per slot). With nothing measured, the
            # pause is the slowdown.
            probe = self._pace is None and self.adaptive.measured(now)
            pause = ADAPTIVE_PROBE if probe else DEFAULT_RATE_LIMIT_PAUSE
        paused_until = self._paused_until  # the end of the last pause before this 429
        if pause > 0:
            self._resume_at = max(self._resume_at, now + min(pause, self._max_pause))
            self._paused(now)
        if learning and self.adaptive.limited(asked_at, now, self._resume_at):
            ceiling = self.adaptive.ceiling
            logger.debug(
                "Klarna answered 429: pacing this client at %.1f requests/s (it let %d"
                " through in the last second)",
                ADAPTIVE_DECREASE * ceiling,
                ceiling,
                extra={
                    **log_fields(request, status=429, correlation_id=error.correlation_id),
                    "pace": ADAPTIVE_DECREASE * ceiling,
                    "ceiling": ceiling,
                },
            )
        if stated is not None:
            self._cut_stated(stated, error, request, sent_at, paused_until, now)
        held = stated.pace if stated is not None else self.adaptive.pace if learning else None
        if held is not None and self._resume_at > now:
            # Slots taken before this 429 would send into the window it says is full, one
            # slot after another (measured: a 429 every 10 ms until the window ended).
            held.hold(self._resume_at)
        self._unlogged += 1
        self._last_429 = (request, error)
        self._log_rate_limited(now)

    def flush_log(self) -> None:
        """Write the summary of the 429s not written yet (the client is closing: no answer
        comes after them to write it)."""
        if self._unlogged:
            self._log_rate_limited(self._clock(), now_or_never=True)

    def _log_rate_limited(self, now: float, *, now_or_never: bool = False) -> None:
        """Write the summary of the 429s counted, unless one was written in the last
        ``LOG_INTERVAL`` seconds (then they wait for the next 429 or answer after it)."""
        since = now - self._logged_at
        if (since < LOG_INTERVAL and not now_or_never) or self._last_429 is None:
            return
        count, self._unlogged, self._logged_at = self._unlogged, 0, now
        request, error = self._last_429
        self._last_429 = None
        rate = self.rate
        pause = max(self._resume_at - now, 0.0) if self._resume_at else 0.0
        fields = log_fields(request, status=429, correlation_id=error.correlation_id)
        key = fields["idempotency_key"]
        last = f"{type(error).__name__}: {fields['method']} {fields['path']}"
        if key is not None:
            last += f", key {key}"
        pace = "no pace" if rate is None else f"pace now {rate:.1f} requests/s"
        args: tuple[object, ...]
        if math.isinf(since):
            message, args = "Klarna rate limited a request (429 %s); %s", (last, pace)
        else:
            noun = "request" if count == 1 else "requests"
            message = "Klarna rate limited %d %s in the last %.0f s (429; the last: %s); %s"
            args = (count, noun, since, last, pace)
        fields.update(
            rate_limited=count,
            interval=None if math.isinf(since) else since,
            pace=rate,
            pause=pause,
        )
        logger.info(message, *args, extra=fields)

    def _cut_stated(
        self,
        stated: StatedRate,
        error: RateLimitError,
        request: Request,
        sent_at: float,
        paused_until: float,
        now: float,
    ) -> None:
        """Cut the stated pace after ``error``, a 429 to ``request`` (see ``StatedRate``)."""
        refused = self._refused_calls(request, now)
        # A 429 that says to wait a second or more: Klarna's window is full until then, and
        # the pause is the slowdown. Cutting the pace too idled the quota the pauses share
        # out (two workers, whole-second Retry-After: 1.29x the floor, against 1.11x).
        told = error.retry_after
        if told is not None and min(told, self._max_pause) >= STATED_TOLD_WAIT:
            return  # (the pause taken, capped: a shorter one leaves the slowdown to the pace)
        cut = stated.limited(
            sent_at=sent_at,
            now=now,
            resume_at=self._resume_at,
            paused_until=paused_until,
            measured=self.adaptive.measured(now),
            backlog=stated.pace.backlog(now),
            refused=refused,
        )
        if cut:
            logger.debug(
                "Klarna answered 429 under its stated limit of %g requests/s: pacing this"
                " client at %.1f requests/s",
                stated.limit,
                1.0 / stated.pace.interval,
                extra={
                    **log_fields(request, status=429, correlation_id=error.correlation_id),
                    "pace": 1.0 / stated.pace.interval,
                    "ceiling": stated.limit,
                },
            )

    def _refused_calls(self, request: Request, now: float) -> int:
        """Note the 429 to ``request`` at ``now``; the calls refused in the last window (a
        call and its retries, one key, count once: a web service's call refused three times
        is no sign of its sending at its pace)."""
        refusals = self._refusals
        refusals.append((now, request.idempotency_key or request.path))
        cutoff = now - ADAPTIVE_WINDOW
        while refusals[0][0] <= cutoff:
            refusals.popleft()
        return len({call for _, call in refusals})

    def _paused(self, now: float) -> None:
        """Note the pause set at ``now``: one longer than a probe's leaves the client's
        answers of the window it falls in too few to measure the limit by (a probe's comes
        only while Klarna's window is full anyway)."""
        if self._resume_at > now + ADAPTIVE_PROBE:
            self._paused_until = max(self._paused_until, self._resume_at)

    def _end_slow_start(self) -> None:
        if self.slow_start is not None:
            self.slow_start.end()
            self.slow_start = None

    async def _wait_pause(self, request: Request) -> None:
        """Wait until no 429 pause is on, however often it is extended meanwhile."""
        while self._resume_at:
            resume_at = self._resume_at
            now = self._clock()
            wait = resume_at - now
            if wait <= 0:
                self._resume_at = 0.0  # the pause is over: later calls skip the clock
                return
            await self._wait(request, now, wait, "paused until Klarna's rate-limit window resets")
            if self.wait_listeners:
                self._waited("pause", wait, request)
            if self._resume_at <= resume_at:
                return  # not extended while this request slept

    def _reserve(self, pace: Pace, request: Request, now: float, why: str) -> float:
        """Take ``pace``'s next slot (the seconds until it), or refuse the request if it lies
        past its deadline: a refused request takes no slot, so refusals never push the grid
        further out."""
        wait = pace.peek(now)
        if wait > 0:
            self._check_deadline(request, now, wait, why)
        return pace.delay(now)

    async def _take_slots(self, request: Request) -> None:
        """Wait for a slot of the batch's pace, then of the client's."""
        why = "waiting for the client's rate limit"
        batch_pace = _batch_pace.get()
        while batch_pace is not None:
            now = self._clock()
            wait = batch_pace.peek(now)
            if wait > 0:
                self._check_deadline(request, now, wait, "waiting for the batch's rate_limit")
            client = self._client_pace(now)
            if client is not None:  # refused after taking the batch's slot, it would waste it
                self._check_deadline(request, now, wait + client.peek(now + wait), why)
            wait = batch_pace.delay(now)
            if wait <= 0:
                break
            await self._sleep(wait)
            if self.wait_listeners:
                self._waited("pace", wait, request)
            if not batch_pace.voided(now + wait):
                break
            # An earlier send of the batch left late, held back by the client's pace, and
            # voided the slots of the interval after it: take a new one.
        while True:
            now = self._clock()
            pace = self._client_pace(now)  # every call's
            if pace is None:
                return
            wait = self._reserve(pace, request, now, why)
            if wait <= 0:
                return
            if batch_pace is not None:
                # This send leaves after its batch slot: the batch's next one keeps its
                # interval after it, or the batch's items that queued here behind the
                # client's other calls would leave together at the client's pace (25 in a
                # second from a batch limited to 10).
                batch_pace.defer(now + wait + batch_pace.interval)
            if pace is self._pace:  # the user's rate_limit: the slot holds
                await self._sleep(wait)
                if self.wait_listeners:
                    self._waited("pace", wait, request)
                return
            # A learned grid may be laid anew while this request sleeps (a 429 lowered the
            # pace, or it climbed; Klarna stated another limit) or forgotten: its slot is then
            # void. Wake in steps to see.
            generation = pace.generation
            left = wait  # counted down by the steps slept, whatever the clock does
            while True:
                step = min(left, ADAPTIVE_STEP)
                await self._sleep(step)
                left -= step
                current = self._client_pace(self._clock())
                if current is not pace or pace.generation != generation:
                    if self.wait_listeners:
                        self._waited("pace", wait - left, request)
                    break  # take a slot on the new grid (or none, if forgotten)
                if left <= 0:
                    if self.wait_listeners:
                        self._waited("pace", wait, request)
                    return

    def _client_pace(self, now: float) -> Pace | None:
        """The client's pace at ``now``: the user's, else the stated one, else the learned."""
        if self._pace is not None:
            return self._pace
        if self.stated is not None:
            return self.stated.pace_at(now)
        return self.adaptive.pace_at(now)

    def _waited(self, reason: WaitReason, seconds: float, request: Request) -> None:
        """Tell every wait listener about a wait that just ended."""
        for listener in self.wait_listeners:
            listener(reason, seconds, request)

    def recheck(self, request: Request) -> Awaitable[None] | None:
        """For the transport, once the attempt has its connection: wait out a 429 pause.

        Raises ``RateLimitError`` (nothing sent) at once when the call queued for the
        connection until past its deadline: no attempt starts after it.

        None (nothing to wait for) unless a 429 paused the client since ``request`` passed
        this middleware (e.g. while it queued for a connection). Then an awaitable that
        sleeps until the pause is over and takes fresh pace slots, so the held-back requests
        leave one by one; or that raises ``RateLimitError`` (nothing sent) when the pause
        lies past the call's deadline.
        """
        now = self._clock()
        # It queued for a connection until past its deadline: no attempt starts later.
        self._check_waited(request, now, "a free connection")
        if not self._resume_at or self._resume_at <= now:
            return None
        return self._after_pause(request)

    async def _after_pause(self, request: Request) -> None:
        await self._wait_pause(request)
        await self._take_slots(request)
        # A loaded event loop wakes a sleeper late: no attempt starts past its deadline.
        self._check_waited(request, self._clock(), "the end of a 429 pause and a pace slot")

    def _learn(self, headers: Mapping[str, str]) -> None:
        """Pace at Klarna's stated limit, and pause when its window is used up."""
        limit = header_number(headers.get(_LIMIT))
        if limit is not None and self._pace is None:
            self._learn_limit(limit)
        remaining = header_number(headers.get(_REMAINING))
        reset = reset_after(headers)
        if remaining is not None and remaining <= 0 and reset is not None:
            now = self._clock()
            self._resume_at = max(self._resume_at, now + min(reset, self._max_pause))
            self._paused(now)

    def _learn_limit(self, limit: float) -> None:
        """Pace at ``limit`` (requests per second, as Klarna counts), which Klarna stated."""
        if not limit >= 1:
            return
        now = self._clock()
        if self.stated is not None:
            self.stated.state(limit, now)
            return
        stated = self.stated = StatedRate(limit, now)
        # What the opening ramp let out this last second is in Klarna's window too: the grid
        # starts after it, or the first second holds it and a full grid.
        ramp = self.slow_start.in_flight - 1 if self.slow_start is not None else 0
        recent = self.adaptive.measured(now) + max(ramp, 0)  # (this one: answered)
        stated.pace.hold(now + recent * stated.pace.interval)
        self._end_slow_start()  # the stated limit paces from now on

    async def _wait(self, request: Request, now: float, wait: float, why: str) -> None:
        """Sleep ``wait`` seconds, unless that passes the call's deadline: then refuse it."""
        self._check_deadline(request, now, wait, why)
        await self._sleep(wait)

    def _check_deadline(self, request: Request, now: float, wait: float, why: str) -> None:
        """Refuse the request (``RateLimitError``) if waiting ``wait`` passes its deadline."""
        # getattr: middlewares are also driven by hand with stand-in requests.
        deadline: float | None = getattr(request, "deadline", None)
        if deadline is not None and now + wait > deadline:
            raise self._refusal(request, wait, deadline - now, why)

    def _refusal(
        self, request: Request, wait: float, left: float, why: str, *, message: str = ""
    ) -> ThrottleRefusal:
        """The error for a call a wait would keep past its deadline; nothing was sent."""
        # Rounded apart (the wait up, the time left down): never "for 0.5s more, and the
        # deadline is 0.5s away".
        more, away = math.ceil(wait * 10) / 10, max(math.floor(left * 10) / 10, 0.0)
        error = ThrottleRefusal(
            status=429,
            error_messages=(
                message
                or f"not sent: this client is {why} for {more:.1f}s more, and the call's"
                f" deadline is {away:.1f}s away",
            ),
            retry_after=wait,
        )
        error.bind(
            method=request.method,
            url=self._base_url + request.path,
            idempotency_key=request.idempotency_key,
            attempts=0,
        )
        return error
