"""Fresh idempotency keys: one per logical call, made on every capture of a batch."""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

from .errors import ValidationError

__all__ = (
    "KEY_RESEND_WINDOW_S",
    "check_idempotency_key",
    "fresh_key",
    "key_time_left",
    "new_idempotency_key",
    "random_key",
)

#: Klarna honours a key for 24 hours after its first use and then books a resend again; no
#: attempt under a key starts later than this after the call's first (an hour's margin for
#: clock skew, as the journal's default ``key_max_age``).
KEY_RESEND_WINDOW_S = 23 * 3600.0

#: Seconds left, as the call under a key begins, before that key is older than the journal's
#: ``key_max_age``: a batch resending a key an earlier run sent sets it, and no attempt of
#: the call starts after that (see ``RetryMiddleware``). ``None``: the key is new to this
#: call, which may resend it for ``KEY_RESEND_WINDOW_S``.
key_time_left: ContextVar[float | None] = ContextVar("klarna_om_key_time_left", default=None)

#: A key the caller gives that it vouches was never sent before this call: a batch's own new
#: key. Any other key a caller gives may have been sent by an earlier call, so an error that
#: says nothing of that send leaves the call's outcome unknown (see ``IdempotencyMiddleware``).
fresh_key: ContextVar[str | None] = ContextVar("klarna_om_fresh_key", default=None)

# Printable ASCII, no space at either end: anything else breaks the header (a newline is
# refused by aiohttp) or is trimmed by HTTP, and would then name another key.
_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?").fullmatch


def check_idempotency_key(key: object) -> str:
    """Return ``key`` if it can be a ``Klarna-Idempotency-Key``, else raise ``ValidationError``.

    A key is 1 to 255 printable ASCII characters with no space at either end; a UUID (see
    :func:`new_idempotency_key`) is what Klarna documents.
    """
    if isinstance(key, str) and _KEY(key):
        return key
    raise ValidationError(
        "idempotency_key",
        "must be 1 to 255 printable ASCII characters with no space at either end"
        f" (a UUID is best), got {key!r}",
    )


def new_idempotency_key() -> str:
    """A fresh ``Klarna-Idempotency-Key`` (a random UUID4 string) for one money-moving call.

    Make it and store it (with the order and amount) before calling, then pass it as
    ``idempotency_key=``: if the call ends with its outcome unknown (a crash, a timeout, a
    cancellation, ``err.outcome_unknown``), calling again with the same key and the same
    request within 24 hours finishes it exactly once. Use a new key for any other request.
    """
    return random_key()


def random_key() -> str:
    """A random (version 4) UUID string, as ``str(uuid.uuid4())`` makes, at a quarter the cost.

    ``uuid.UUID`` validates and converts in Python; a batch makes one key per order, and
    profiling put uuid4 at a tenth of a batch's own CPU.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
