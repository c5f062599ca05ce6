"""The life of a benchmark server process: bind, announce the port, stop when told or orphaned."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable

from aiohttp import web


async def serve(
    make_handler: Callable[[str], web.Server], port: int, lifetime: float, backlog: int = 1024
) -> None:
    """Serve ``make_handler(base_url)`` on 127.0.0.1 until SIGTERM/SIGINT, stdin's EOF or
    ``lifetime`` seconds; print ``PORT n`` once listening."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    sock = socket.create_server(("127.0.0.1", port), backlog=backlog)
    bound = sock.getsockname()[1]
    handler = make_handler(f"http://127.0.0.1:{bound}")
    server = await loop.create_server(handler, sock=sock)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Stdin at EOF means the benchmark that started us is gone: never outlive it.
    watch: asyncio.Future[bytes] | None = None
    if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        watch = asyncio.ensure_future(reader.read())
        watch.add_done_callback(lambda _: stop.set())
    print(f"PORT {bound}", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), timeout=lifetime)
    except TimeoutError:
        pass
    finally:
        if watch is not None:
            watch.cancel()
        server.close()
        await handler.shutdown(0.1)
