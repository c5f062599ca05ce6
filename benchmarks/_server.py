"""A minimal Klarna-like capture server for the benchmarks; run as its own process.

It answers only what the benchmark sends, as Klarna would and as cheaply as it can, so the
client process does (nearly) all the measured work:

    POST /ordermanagement/v1/orders/{order_id}/captures  -> 201, Capture-Id + Location, no body
    GET  .../captures/{capture_id}                        -> 200, the reference capture body

Requests without an ``Authorization`` header get 401. It binds 127.0.0.1 only, prints
``PORT <n>`` once listening, and exits when its stdin closes (the parent went away), when it
receives SIGTERM, or after ``--lifetime`` seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from pathlib import Path

from _serving import serve
from aiohttp import web

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "samples" / "capture.json"
_CAPTURES = "/captures"


def _capture_body_parts() -> tuple[bytes, bytes]:
    """The sample capture as compact JSON, split around its ``capture_id`` value."""
    capture = json.loads(SAMPLE.read_text())
    capture["capture_id"] = "\0"
    head, tail = json.dumps(capture, separators=(",", ":")).encode().split(b"\\u0000")
    return head, tail


def make_handler(base_url: str) -> web.Server:
    head, tail = _capture_body_parts()
    ids = itertools.count(1)
    unauthorized = b'{"error_code":"UNAUTHORIZED","error_messages":["Missing credentials."]}'

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if "Authorization" not in request.headers:
            return web.Response(status=401, body=unauthorized, content_type="application/json")
        path = request.path
        if request.method == "POST" and path.endswith(_CAPTURES):
            await request.read()
            capture_id = f"{next(ids):08d}-79d0-4d76-99ea-4afaa7c8e552"
            return web.Response(
                status=201,
                headers={"Capture-Id": capture_id, "Location": f"{base_url}{path}/{capture_id}"},
            )
        if request.method == "GET" and _CAPTURES + "/" in path:
            capture_id = path.rsplit("/", 1)[1]
            body = head + capture_id.encode() + tail
            return web.Response(status=200, body=body, content_type="application/json")
        return web.Response(status=404)

    return web.Server(handle, access_log=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=3600.0, help="exit after this (s)")
    args = parser.parse_args()
    asyncio.run(serve(make_handler, args.port, args.lifetime))


if __name__ == "__main__":
    main()
