"""A batch file's rows, read on a thread of their own: a slow stream never stalls the loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager

from ._batchfile import Row

__all__ = ("read_rows",)

# open_batch(..., stop=stop), given the event that ends its reading.
_Opener = Callable[[threading.Event], AbstractContextManager[Iterator[Row]]]

#: Rows read ahead of the batch at most: memory stays bounded for a stream of any length,
#: and of any line length (a row may hold a line of up to 4 MiB).
READ_AHEAD = 16


class _Rows:
    """The rows a reader thread hands over; ``async for`` takes them on the event loop.

    A read blocks until its line is there. Read on the event loop, a pipe whose writer is
    slow (a producer that emits a line a minute) held back everything else the loop does
    until the next line came: the items already read were not sent, the answers in flight
    not read, their outcomes not journaled, Ctrl-C and SIGTERM not handled. The thread
    reads instead; the loop is woken only when it waits for a row.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._rows: deque[Row] = deque()
        self._lock = threading.Condition()
        self._waiter: asyncio.Future[None] | None = None  # the loop, waiting for a row
        self._done = False  # the thread read the last row, or failed
        self._error: BaseException | None = None  # why it failed after the file opened
        #: Set when the batch takes no more rows: the thread stops reading at its next line.
        self.stopped = threading.Event()
        #: Resolved once the file is open and its header checked, or with why it is not.
        self.opened: asyncio.Future[None] = loop.create_future()

    # --- on the reader thread ---

    def read(self, open_rows: _Opener) -> None:
        opened = False
        try:
            with open_rows(self.stopped) as rows:
                opened = True
                self._resolve_soon(self.opened)
                for row in rows:
                    if not self._put(row):
                        return
            self._end(None)
        except BaseException as error:  # handed to the loop, which raises it
            if opened:
                self._end(error)
            else:
                self._resolve_soon(self.opened, error)

    def _put(self, row: Row) -> bool:
        with self._lock:
            while len(self._rows) >= READ_AHEAD and not self.stopped.is_set():
                self._lock.wait()
            if self.stopped.is_set():
                return False
            self._rows.append(row)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._resolve_soon(waiter)
        return True

    def _end(self, error: BaseException | None) -> None:
        with self._lock:
            self._done, self._error = True, error
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._resolve_soon(waiter)

    def _resolve_soon(
        self, future: asyncio.Future[None], error: BaseException | None = None
    ) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            self._loop.call_soon_threadsafe(_resolve, future, error)

    # --- on the event loop ---

    def __aiter__(self) -> _Rows:
        return self

    async def __anext__(self) -> Row:
        while True:
            with self._lock:
                if self._rows:
                    row = self._rows.popleft()
                    self._lock.notify()  # the thread may wait for room
                    return row
                if self._done:
                    if self._error is not None:
                        raise self._error
                    raise StopAsyncIteration
                waiter = self._waiter = self._loop.create_future()
            await waiter

    def stop(self) -> None:
        """No more rows are wanted; the thread stops at its next row (a read it is blocked
        in ends when the stream gives a line, or the process exits: the thread is a daemon)."""
        with self._lock:
            self.stopped.set()
            self._rows.clear()
            self._lock.notify()


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # its waiter was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


@contextlib.asynccontextmanager
async def read_rows(open_rows: _Opener) -> AsyncIterator[AsyncIterator[Row]]:
    """``open_rows(stop)`` (``open_batch``'s context; ``stop`` is set once no more rows are
    wanted, and ends its reading at the next line) entered and read on a daemon thread.

    Gives the rows as an async iterator once the file is open (a ``BatchFileError`` about
    the whole file is raised here, before any row); an error reading on (a
    ``BatchReadError``) is raised by the iterator after the rows read before it. Closing
    it stops the reading.
    """
    rows = _Rows(asyncio.get_running_loop())
    # A daemon: a read blocked on a stream nobody writes to never holds up the exit.
    thread = threading.Thread(target=rows.read, args=(open_rows,), daemon=True)
    thread.name = "klarna-om batch file"
    thread.start()
    try:
        await rows.opened
        yield rows
    finally:
        rows.stop()
