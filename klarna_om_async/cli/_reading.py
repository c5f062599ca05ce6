"""A batch file's lines, read on a thread of their own: a slow stream never stalls the loop.

The thread only reads (and decodes) lines; the event loop makes their rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager

from ._batchfile import Line, OpenedLines, Parse, Row

__all__ = ("READ_AHEAD", "READ_AHEAD_CHARS", "StreamRows", "read_rows")

# open_lines(..., stop=stop), given the event that ends its reading.
_Opener = Callable[[threading.Event], AbstractContextManager[OpenedLines]]

#: Lines read ahead of the batch at most, and their characters at most: memory stays
#: bounded for a stream of any length, and of any line length (a line may hold 4 MiB; one
#: line is always taken). A batch takes as many lines at once as it has free workers (128
#: by default): read ahead less, it took them a few at a time, its journal's writer thread
#: ran beside the loop instead of between its turns, and the three threads handed the
#: interpreter lock back and forth: a rerun through a pipe cost 1.4 times the CPU of the
#: same file by its path (benchmarks/SCALING.md, "A stream's rerun").
READ_AHEAD = 1024
READ_AHEAD_CHARS = 16 * 1024 * 1024
# A reader waiting for room is woken once the batch has taken this far down: it then reads
# many lines at a time, not one per line taken.
_WAKE_AT_LINES = READ_AHEAD // 4
_WAKE_AT_CHARS = READ_AHEAD_CHARS // 4


def _size(line: Line) -> int:
    text = line[1]
    return len(text) if isinstance(text, str) else 0


class StreamRows:
    """The lines a reader thread hands over; ``async for`` makes their rows on the event loop.

    A read blocks until its line is there. Read on the event loop, a pipe whose writer is
    slow (a producer that emits a line a minute) held back everything else the loop does
    until the next line came: the items already read were not sent, the answers in flight
    not read, their outcomes not journaled, Ctrl-C and SIGTERM not handled. The thread
    reads instead; the loop is woken only when it waits for a row.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lines: deque[Line] = deque()
        self._chars = 0  # in the lines read ahead
        self._full = False  # the thread waits for room
        # The number of the last line the batch took (0: none yet); its rows' lines without
        # an outcome yet; the first line whose outcome was not done.
        self._taken = 0
        self._unfinished: set[int] = set()
        self._first_not_done: int | None = None
        #: The batch took every line: the stream ended.
        self.ended = False
        # Set by the thread before ``opened`` resolves.
        self._parse: Parse | None = None
        self._header_line = 0
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
            with open_rows(self.stopped) as lines:
                opened = True
                self._parse, self._header_line = lines.parse, lines.header_line
                self._taken = lines.header_line
                self._resolve_soon(self.opened)
                for line in lines.lines:
                    if not self._put(line):
                        return
            self._end(None)
        except BaseException as error:  # handed to the loop, which raises it
            if opened:
                self._end(error)
            else:
                self._resolve_soon(self.opened, error)

    def _put(self, line: Line) -> bool:
        size = _size(line)
        with self._lock:
            while (
                self._lines
                and (len(self._lines) >= READ_AHEAD or self._chars + size > READ_AHEAD_CHARS)
                and not self.stopped.is_set()
            ):
                self._full = True
                self._lock.wait()
            if self.stopped.is_set():
                return False
            self._lines.append(line)
            self._chars += size
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

    def __aiter__(self) -> StreamRows:
        return self

    async def __anext__(self) -> Row:
        parse = self._parse
        assert parse is not None
        while True:
            with self._lock:
                if self._lines:
                    line = self._lines.popleft()
                    self._taken = line[0]
                    self._chars -= _size(line)
                    if (
                        self._full
                        and len(self._lines) <= _WAKE_AT_LINES
                        and self._chars <= _WAKE_AT_CHARS
                    ):
                        self._full = False
                        self._lock.notify()  # the thread waits for room
                    waiter = None
                elif self._done:
                    if self._error is not None:
                        raise self._error
                    self.ended = True
                    raise StopAsyncIteration
                else:
                    waiter = self._waiter = self._loop.create_future()
            if waiter is not None:
                await waiter
            elif (row := parse(line)) is not None:
                self._unfinished.add(line[0])
                return row

    def finished(self, line: int | None, done: bool) -> None:
        """The outcome of the row of ``line`` came: ``done`` (captured or skipped) or not."""
        if line is None:
            return
        self._unfinished.discard(line)
        if not done and (self._first_not_done is None or line < self._first_not_done):
            self._first_not_done = line

    @property
    def first_line(self) -> int:
        """The number of the stream's first line after its header."""
        return self._header_line + 1

    def resume_line(self, *, whole: bool = False) -> int | None:
        """The first line to give the batch again, as the stream cannot be read again: the
        first whose row has no outcome or one not done, else the first line not taken (a
        stream that stopped before its end); ``whole``: the first line (the journal failed:
        an outcome reported done may not be recorded). None when the batch took the whole
        stream."""
        if self.ended:
            return None
        if whole:
            return self.first_line
        firsts = [*self._unfinished, self._taken + 1]
        if self._first_not_done is not None:
            firsts.append(self._first_not_done)
        return min(firsts)

    def stop(self) -> None:
        """No more rows are wanted; the thread stops at its next row (a read it is blocked
        in ends when the stream gives a line, or the process exits: the thread is a daemon)."""
        with self._lock:
            self.stopped.set()
            self._lines.clear()
            self._lock.notify()


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # its waiter was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


@contextlib.asynccontextmanager
async def read_rows(open_rows: _Opener) -> AsyncIterator[StreamRows]:
    """``open_rows(stop)`` (``open_lines``'s context; ``stop`` is set once no more rows
    are wanted, and ends its reading at the next line) entered and read on a daemon thread.

    Gives the rows as an async iterator once the file is open (a ``BatchFileError`` about
    the whole file is raised here, before any row); each line's row is made on the event
    loop as the batch takes it. An error reading on (a ``BatchReadError``) is raised by the
    iterator after the rows read before it. Closing it stops the reading.
    """
    rows = StreamRows(asyncio.get_running_loop())
    # A daemon: a read blocked on a stream nobody writes to never holds up the exit.
    thread = threading.Thread(target=rows.read, args=(open_rows,), daemon=True)
    thread.name = "klarna-om batch file"
    thread.start()
    try:
        await rows.opened
        yield rows
    finally:
        rows.stop()
