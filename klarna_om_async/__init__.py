"""Asyncio client for Klarna Order Management captures: exactly-once, typed, fast.

::

    async with KlarnaOM("user", "password", region=Region.EU, playground=True) as om:
        created = await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
"""

from ._keys import new_idempotency_key
from ._version import __version__
from .batch import BatchAbortedError, BatchItem, BatchProgress, CaptureOutcome, CaptureStatus
from .client import KlarnaOM
from .config import Region, RetryPolicy
from .errors import (
    AuthenticationError,
    BadRequestError,
    CaptureNotAllowedError,
    ConflictError,
    ItemConflictError,
    KlarnaAPIError,
    KlarnaConnectionError,
    KlarnaError,
    KlarnaResponseError,
    KlarnaTimeoutError,
    NeedsReviewError,
    NoSuchCaptureError,
    NoSuchOrderError,
    NotAllowedError,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
    ServerError,
    UnprocessableEntityError,
    ValidationError,
)
from .journal import (
    Claim,
    ClaimAction,
    ItemRecord,
    Journal,
    JournalEntry,
    JournalError,
    JournalInUseError,
    JournalStatus,
    MemoryJournal,
    NotAJournalError,
    deterministic_key,
)
from .middleware import Handler, Middleware, Request, Response
from .models import (
    Address,
    Capture,
    CaptureCreated,
    CaptureRequest,
    FraudStatus,
    Order,
    OrderLine,
    OrderLineType,
    OrderStatus,
    Refund,
    ShippingInfo,
    ShippingMethod,
)
from .reconcile import Reconciliation, Verdict
from .sqlite_journal import SQLiteJournal

__all__ = (
    "Address",
    "AuthenticationError",
    "BadRequestError",
    "BatchAbortedError",
    "BatchItem",
    "BatchProgress",
    "Capture",
    "CaptureCreated",
    "CaptureNotAllowedError",
    "CaptureOutcome",
    "CaptureRequest",
    "CaptureStatus",
    "Claim",
    "ClaimAction",
    "ConflictError",
    "FraudStatus",
    "Handler",
    "ItemConflictError",
    "ItemRecord",
    "Journal",
    "JournalEntry",
    "JournalError",
    "JournalInUseError",
    "JournalStatus",
    "KlarnaAPIError",
    "KlarnaConnectionError",
    "KlarnaError",
    "KlarnaOM",
    "KlarnaResponseError",
    "KlarnaTimeoutError",
    "MemoryJournal",
    "Middleware",
    "NeedsReviewError",
    "NoSuchCaptureError",
    "NoSuchOrderError",
    "NotAJournalError",
    "NotAllowedError",
    "NotFoundError",
    "Order",
    "OrderLine",
    "OrderLineType",
    "OrderStatus",
    "RateLimitError",
    "Reconciliation",
    "Refund",
    "Region",
    "Request",
    "RequestTooLargeError",
    "Response",
    "RetryPolicy",
    "SQLiteJournal",
    "ServerError",
    "ShippingInfo",
    "ShippingMethod",
    "UnprocessableEntityError",
    "ValidationError",
    "Verdict",
    "__version__",
    "deterministic_key",
    "new_idempotency_key",
)
