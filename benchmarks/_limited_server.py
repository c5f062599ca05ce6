"""A rate-limited, slow Klarna-like capture server for the throughput benchmark; its own process.

    python benchmarks/_limited_server.py --rate 200 --window fixed --latency 0.15,0.35

It imitates what limits a real batch, not Klarna's CPU cost:

- ``POST /ordermanagement/v1/orders/{order_id}/captures`` answers 201 with ``Capture-Id`` and
  ``Location`` after a latency drawn (seeded) uniformly from ``--latency LOW,HIGH`` seconds.
- At most ``--rate`` requests per second are admitted, counted on arrival (every request,
  replays included): ``--window fixed`` counts in 1-second windows aligned on the wall clock's
  seconds; ``--window bucket`` is a token bucket refilled at ``--rate`` per second holding at
  most ``--burst`` tokens (default: ``--rate``). Anything beyond gets 429 after
  ``--reject-latency`` seconds, with ``Retry-After`` (whole seconds, rounded up) unless
  ``--no-retry-after``.
- Every answer carries ``X-Ratelimit-Limit``, ``X-Ratelimit-Remaining`` and
  ``X-Ratelimit-Reset`` unless ``--no-ratelimit-headers``. Reset is the seconds until the
  quota is whole again (the window ends; the bucket is full), as a decimal (``--reset-format
  delta``), rounded up to whole seconds (``delta-int``), or as a Unix time (``epoch``).
- Idempotency by ``Klarna-Idempotency-Key``: the same key gets the same answer (a replay of a
  key still in progress waits for its answer). Booking the same (order, ``reference``) under
  two different keys is counted as a double booking (and booked, as Klarna would).
- ``GET /ordermanagement/v1/orders/{order_id}`` (a journaled batch reads one to learn Klarna's
  time before it sends) answers 200 with a minimal order after the same latency, counted
  against the limit like any request.
- ``GET /stats`` returns the counters as JSON: requests, 201s (new bookings and replays),
  429s (and per 1000 requests), double bookings, bookings, and the most requests in flight.

Requests without an ``Authorization`` header get 401. It binds 127.0.0.1 only, prints
``PORT <n>`` once listening, and exits when its stdin closes (the parent went away), on
SIGTERM, or after ``--lifetime`` seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from typing import Any

from _serving import serve
from aiohttp import web

_CAPTURES = "/captures"
_ORDERS = "/ordermanagement/v1/orders/"


class FixedWindow:
    """At most ``rate`` admissions in each 1-second window aligned on wall-clock seconds."""

    def __init__(self, rate: int, clock: Any = time.time) -> None:
        self.rate = rate
        self.clock = clock
        self.window = -1
        self.used = 0

    def admit(self) -> tuple[bool, int, float]:
        """(admitted, remaining afterwards, seconds until the quota is whole again)."""
        now = self.clock()
        window = math.floor(now)
        if window != self.window:
            self.window, self.used = window, 0
        admitted = self.used < self.rate
        if admitted:
            self.used += 1
        return admitted, self.rate - self.used, window + 1 - now


class TokenBucket:
    """Refilled at ``rate`` tokens a second up to ``burst``; one token per admission."""

    def __init__(self, rate: int, burst: int, clock: Any = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.last = clock()

    def admit(self) -> tuple[bool, int, float]:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        admitted = self.tokens >= 1.0
        if admitted:
            self.tokens -= 1.0
        return admitted, int(self.tokens), (self.burst - self.tokens) / self.rate


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.reads = 0
        self.created = 0
        self.replays = 0
        self.rate_limited = 0
        self.other = 0
        self.double_bookings = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.first_request: float | None = None
        self.last_answer: float | None = None

    def as_dict(self, bookings: int) -> dict[str, Any]:
        span = (
            self.last_answer - self.first_request
            if self.first_request is not None and self.last_answer is not None
            else 0.0
        )
        return {
            "requests": self.requests,
            "reads": self.reads,
            "answered_201": self.created + self.replays,
            "created": self.created,
            "replays": self.replays,
            "rate_limited_429": self.rate_limited,
            "per_1000_429": 1000 * self.rate_limited / self.requests if self.requests else 0.0,
            "other": self.other,
            "double_bookings": self.double_bookings,
            "bookings": bookings,
            "max_in_flight": self.max_in_flight,
            "in_flight": self.in_flight,
            "span_s": span,
        }


def make_handler(args: argparse.Namespace, base_url: str) -> web.Server:
    rng = random.Random(args.seed)
    low, high = args.latency
    limiter: FixedWindow | TokenBucket = (
        FixedWindow(args.rate) if args.window == "fixed" else TokenBucket(args.rate, args.burst)
    )
    stats = Stats()
    answers: dict[str, asyncio.Future[str]] = {}  # idempotency key -> capture id
    booked: dict[tuple[str, str], str] = {}  # (order, reference) -> the first key that booked it
    ids = iter(range(1, 1 << 62))
    unauthorized = b'{"error_code":"UNAUTHORIZED","error_messages":["Missing credentials."]}'
    too_many = b'{"error_code":"TOO_MANY_REQUESTS","error_messages":["Rate limit exceeded."]}'

    def limit_headers(remaining: int, reset: float) -> dict[str, str]:
        if not args.ratelimit_headers:
            return {}
        if args.reset_format == "epoch":
            shown = str(math.ceil(time.time() + reset))
        elif args.reset_format == "delta-int":
            shown = str(math.ceil(reset))
        else:
            shown = f"{reset:.3f}"
        return {
            "X-Ratelimit-Limit": str(args.rate),
            "X-Ratelimit-Remaining": str(max(0, remaining)),
            "X-Ratelimit-Reset": shown,
        }

    async def book(order_id: str, key: str, body: bytes) -> str:
        await asyncio.sleep(rng.uniform(low, high))
        try:
            reference = json.loads(body).get("reference") or body.decode()
        except ValueError:
            reference = body.decode(errors="replace")
        first = booked.setdefault((order_id, reference), key)
        if first != key:
            stats.double_bookings += 1
        stats.created += 1
        return f"{next(ids):08d}-79d0-4d76-99ea-4afaa7c8e552"

    async def refused(headers: dict[str, str], reset: float) -> web.StreamResponse:
        stats.rate_limited += 1
        await asyncio.sleep(args.reject_latency)
        if args.retry_after:
            headers["Retry-After"] = str(max(1, math.ceil(reset)))
        return web.Response(
            status=429, body=too_many, headers=headers, content_type="application/json"
        )

    async def capture(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        admitted, remaining, reset = limiter.admit()
        headers = limit_headers(remaining, reset)
        if not admitted:
            return await refused(headers, reset)
        order_id = request.path[len(_ORDERS) : -len(_CAPTURES)]
        key = request.headers.get("Klarna-Idempotency-Key") or f"no-key-{next(ids)}"
        answer = answers.get(key)
        if answer is None:
            answer = answers[key] = asyncio.ensure_future(book(order_id, key, body))
        else:
            stats.replays += 1
            await asyncio.sleep(rng.uniform(low, high))
        capture_id = await asyncio.shield(answer)
        headers["Capture-Id"] = capture_id
        headers["Location"] = f"{base_url}{request.path}/{capture_id}"
        return web.Response(status=201, headers=headers)

    async def read_order(request: web.BaseRequest) -> web.StreamResponse:
        admitted, remaining, reset = limiter.admit()
        headers = limit_headers(remaining, reset)
        if not admitted:
            return await refused(headers, reset)
        stats.reads += 1
        await asyncio.sleep(rng.uniform(low, high))
        order = {"order_id": request.path[len(_ORDERS) :], "status": "AUTHORIZED"}
        return web.json_response(order, headers=headers)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/stats":
            return web.json_response(stats.as_dict(len(booked)))
        if "Authorization" not in request.headers:
            return web.Response(status=401, body=unauthorized, content_type="application/json")
        reading = (
            request.method == "GET"
            and request.path.startswith(_ORDERS)
            and "/" not in request.path[len(_ORDERS) :]
        )
        if not reading and not (
            request.method == "POST"
            and request.path.startswith(_ORDERS)
            and request.path.endswith(_CAPTURES)
        ):
            stats.other += 1
            return web.Response(status=404)
        now = time.monotonic()
        if stats.first_request is None:
            stats.first_request = now
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            return await (read_order(request) if reading else capture(request))
        finally:
            stats.in_flight -= 1
            stats.last_answer = time.monotonic()

    return web.Server(handle, access_log=None)


def _latency(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    bounds = (float(low), float(high or low))
    if not 0 <= bounds[0] <= bounds[1] <= 60:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH seconds with 0 <= LOW <= HIGH: {text}")
    return bounds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=3600.0, help="exit after this (s)")
    parser.add_argument("--rate", type=int, default=200, help="admitted requests per second")
    parser.add_argument("--window", choices=("fixed", "bucket"), default="fixed")
    parser.add_argument("--burst", type=int, help="token bucket size (default: --rate)")
    parser.add_argument(
        "--latency", type=_latency, default=(0.15, 0.35), help="LOW,HIGH seconds per capture"
    )
    parser.add_argument("--reject-latency", type=float, default=0.01, help="seconds per 429")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--retry-after", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ratelimit-headers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--reset-format", choices=("delta", "delta-int", "epoch"), default="delta")
    args = parser.parse_args(argv)
    if args.rate < 1:
        parser.error("--rate must be at least 1")
    args.burst = args.burst or args.rate
    return args


def main() -> None:
    args = parse_args()
    asyncio.run(serve(lambda url: make_handler(args, url), args.port, args.lifetime, backlog=4096))


if __name__ == "__main__":
    main()
