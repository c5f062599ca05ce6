"""One ``capture_many`` batch in a fresh process; prints one JSON line with what happened.

    python benchmarks/_throughput_client.py --url http://127.0.0.1:PORT -n 3000 [--rate 200]
        [--first 0]

Uses the library's public API only, with its default settings: ``KlarnaOM(user, password,
base_url=url)`` and ``om.capture_many(items)``. ``--rate R`` (the limit is known) passes
``rate_limit=R`` to the client if ``KlarnaOM`` takes one (a client-wide limit), else to
``capture_many``; ``--concurrency`` overrides the batch's default. The wall time runs from
the call to the last outcome (the process's start-up is not counted); ``started_at`` is when
the call was made (Unix time), so the runs of several workers can be put on one time line.
``--first`` is the index of the first order (workers of one merchant capture other orders).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import inspect
import json
import resource
import sys
import time
from typing import Any

from _client import PASSWORD, USERNAME, model, order_id

from klarna_om_async import KlarnaOM


def client_takes_rate_limit() -> bool:
    """Whether this version of ``KlarnaOM`` paces every call of a client (``rate_limit=``)."""
    return "rate_limit" in inspect.signature(KlarnaOM).parameters


def default_concurrency() -> object:
    return inspect.signature(KlarnaOM.capture_many).parameters["concurrency"].default


async def run(
    url: str, n: int, rate: float | None, concurrency: int | None, first: int = 0
) -> dict[str, Any]:
    client_kwargs: dict[str, Any] = {}
    batch_kwargs: dict[str, Any] = {}
    rate_limit_on = None
    if rate is not None:
        if client_takes_rate_limit():
            client_kwargs["rate_limit"], rate_limit_on = rate, "KlarnaOM"
        else:
            batch_kwargs["rate_limit"], rate_limit_on = rate, "capture_many"
    if concurrency is not None:
        batch_kwargs["concurrency"] = concurrency
    statuses: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    attempts = 0
    aborted = None
    async with KlarnaOM(USERNAME, PASSWORD, base_url=url, **client_kwargs) as om:
        items = ((order_id(i), model(i)) for i in range(first, first + n))
        started_at = time.time()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            async for outcome in om.capture_many(items, **batch_kwargs):
                statuses[outcome.status.value] += 1
                attempts += outcome.attempts
                if outcome.error is not None:
                    errors[type(outcome.error).__name__] += 1
        except Exception as error:  # a batch that stopped early is a result, not a crash
            aborted = f"{type(error).__name__}: {error}"[:300]
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "n": n,
        "started_at": started_at,
        "wall_s": wall,
        "cpu_s": cpu,
        "captured": statuses["captured"],
        "statuses": dict(statuses),
        "errors": dict(errors),
        "attempts": attempts,
        "aborted": aborted,
        "rate_limit_on": rate_limit_on,
        "concurrency": concurrency if concurrency is not None else default_concurrency(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("-n", type=int, required=True)
    parser.add_argument("--rate", type=float, help="the known limit (requests per second)")
    parser.add_argument("--concurrency", type=int, help="default: capture_many's own")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after (s)")
    parser.add_argument("--first", type=int, default=0, help="the first order's index")
    args = parser.parse_args(argv)
    if not args.url.startswith("http://127.0.0.1:"):
        raise SystemExit("the benchmark only talks to a server on 127.0.0.1")

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(args.timeout):
            return await run(args.url, args.n, args.rate, args.concurrency, args.first)

    json.dump(asyncio.run(bounded()), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
