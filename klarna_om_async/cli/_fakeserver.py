"""``klarna-om fake-server``: serve FakeKlarna with seeded orders until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import signal
from collections.abc import Callable

import click

from ..testing import FakeKlarna
from ._demo import inject_demo_faults
from ._options import InputError, finite, json_option
from ._render import echo_json

__all__ = ("fake_server",)


@click.command(name="fake-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--orders",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Authorized orders to seed.",
)
@click.option(
    "--amount",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Amount of each seeded order, in minor units.",
)
@click.option(
    "--write-batch",
    type=click.Path(dir_okay=False),
    help="Write a CSV batch file capturing every seeded order in full.",
)
@click.option(
    "--fault-rate",
    type=click.FloatRange(0, 0.9),
    callback=finite,
    default=0.0,
    show_default=True,
    help="Share of capture attempts that hit a fault (lost answers, 503s, 429s), as in demo.",
)
@click.option("--seed", type=int, help="Seed of the fault draws, to repeat a run.")
@json_option
def fake_server(
    host: str,
    port: int,
    orders: int,
    amount: int,
    write_batch: str | None,
    fault_rate: float,
    seed: int | None,
    json_output: bool,
) -> None:
    """Serve a fake Klarna Order Management API for manual tests, until Ctrl-C or SIGTERM.

    Prints its base URL and its (fake) credentials; point the other commands at it with
    --base-url or KLARNA_BASE_URL. With --json, prints one JSON object with base_url,
    username, password, order_ids and batch_file instead.
    """
    fake = FakeKlarna(seed=seed)
    order_ids = fake.add_orders(orders, amount=amount)
    inject_demo_faults(fake, fault_rate)
    # Written once the port is bound: a server that cannot start must leave the file alone.
    write = None if write_batch is None else lambda: _write_batch(write_batch, order_ids, amount)
    with contextlib.suppress(KeyboardInterrupt):  # where signal handlers are not supported
        asyncio.run(_serve(fake, host, port, order_ids, write_batch, json_output, write=write))


def _write_batch(path: str, order_ids: list[str], amount: int) -> None:
    try:
        with open(path, "w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(("order_id", "captured_amount"))
            writer.writerows((order_id, amount) for order_id in order_ids)
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None


async def _serve(
    fake: FakeKlarna,
    host: str,
    port: int,
    order_ids: list[str],
    batch_file: str | None,
    json_output: bool,
    stop: asyncio.Event | None = None,
    *,
    write: Callable[[], None] | None = None,
) -> None:
    """Serve until ``stop`` is set, by SIGINT or SIGTERM unless a ``stop`` is given.

    ``write`` (the batch file's writer) is called once the port is bound, before the
    announcement.
    """
    loop = asyncio.get_running_loop()
    signals: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows
                loop.add_signal_handler(signum, stop.set)
                signals.append(signum)

    def listening() -> None:
        if write is not None:
            write()
        _announce(fake, order_ids, batch_file, json_output)

    try:
        await _serve_until(fake, host, port, stop, listening)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    if not json_output:
        click.echo("FakeKlarna stopped.")


async def _serve_until(
    fake: FakeKlarna, host: str, port: int, stop: asyncio.Event, announce: Callable[[], None]
) -> None:
    try:
        await fake.start(host, port)
    except OSError as error:
        raise InputError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    try:
        announce()
        await stop.wait()
    finally:
        await fake.close()


def _announce(
    fake: FakeKlarna, order_ids: list[str], batch_file: str | None, json_output: bool
) -> None:
    if json_output:
        echo_json(
            {
                "base_url": fake.base_url,
                "username": fake.username,
                "password": fake.password,
                "order_ids": order_ids,
                "batch_file": batch_file,
            }
        )
        return
    lines = [
        f"FakeKlarna serving on {fake.base_url} (Ctrl-C or SIGTERM stops it)",
        f"  fake credentials: username {fake.username}, password {fake.password}",
        f"  {len(order_ids)} authorized orders" + (f", e.g. {order_ids[0]}" if order_ids else ""),
    ]
    if batch_file is not None:
        lines.append(f"  batch file: {batch_file}")
    lines += [
        "Point the CLI at it:",
        f"  export KLARNA_BASE_URL={fake.base_url} KLARNA_USERNAME={fake.username} "
        f"KLARNA_PASSWORD={fake.password}",
    ]
    click.echo("\n".join(lines))
