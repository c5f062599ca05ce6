"""OpenTelemetry traces and metrics for every call (the optional ``[otel]`` extra).

Nothing here runs unless you ask for it: the package never imports this module, so a client
without it has no OpenTelemetry import and no extra work per call. Two ways in::

    om = instrument(KlarnaOM(username, password))   # before `async with` or the first call
    KlarnaOM(username, password, middlewares=[otel_middleware()])   # attempts only

``instrument(om)`` gives every logical call an INTERNAL span named after its operation
(``klarna.captures.create``) that wraps all its attempts, and every HTTP attempt a CLIENT span
named after its method (``POST``) with the stable HTTP client semantic conventions
(``http.request.method``, ``url.full``, ``server.address``, ``server.port``,
``http.response.status_code``, ``error.type``, ``http.request.resend_count``). The attempt
carries the W3C trace context (``traceparent``) of its span, injected through the globally
configured propagator. ``otel_middleware()`` alone gives the attempt spans and their metrics.

Metrics, through the metrics API: ``http.client.request.duration`` (histogram, seconds, per
attempt), ``klarna.calls`` (counter by ``klarna.operation`` and ``klarna.outcome``; with
``instrument`` only) and ``klarna.retries`` (counter by ``klarna.operation`` and the cause
of the retry, ``error.type``: the status code or the exception class of the attempt before).

Tracing off costs next to nothing: while the tracer is the API's no-op one and the
instruments are no-ops (no SDK set, or ``OTEL_SDK_DISABLED``), an attempt only propagates
what its context carries (a remote parent's ``traceparent``, any ``baggage``) and otherwise
passes the request on as it is; the call span's middleware passes it straight on. Both ask
again at every call, so they start recording as soon as the SDK is set, even after
``instrument(om)``.

With ``instrument`` only, every wait the client's throttle imposes shows on the call span as
an event ``klarna.wait`` (``klarna.wait.reason``: ``pause`` after a 429, ``pace`` for a pacing
slot, ``ramp`` for the slow-start ramp; ``klarna.wait.seconds``), recorded when the wait ends,
and in the histogram ``klarna.wait.duration`` (seconds, by ``klarna.wait.reason``). A call the
throttle refuses without sending (``ThrottleRefusal``) is no 429 from Klarna: its
``error.type`` is ``klarna_om_async.throttle.ThrottleRefusal``, its attempt span has no
status code, and it records no ``http.client.request.duration``.

With ``instrument`` only, a batch the client runs (``om.capture_many``, ``om.run_many``) is
one INTERNAL span ``klarna.batch`` from its start to its end, with its counts as attributes
(``klarna.batch.items``; one per status: ``klarna.batch.captured``, ``klarna.batch.refused``,
``klarna.batch.failed``, ``klarna.batch.skipped``, ``klarna.batch.needs_review``; one per
operation present: ``klarna.batch.operation.capture``, ...), and the counter
``klarna.batch.items`` (by ``klarna.operation`` and ``klarna.batch.status``). The calls of its
items are not its children: each call span starts a trace of its own, linked to the batch
span, so a batch of a million items is not one trace of a million spans. Reconciling an item
(in a batch, or ``om.reconcile``) is an INTERNAL span ``klarna.reconcile`` around the order
read (``klarna.order_id``, ``klarna.item_key``, ``klarna.reconcile.verdict``).
``instrument_journal(journal)`` records an ``SQLiteJournal``'s group commits:
``klarna.journal.commit.duration`` (seconds) and ``klarna.journal.commit.entries``.

With ``opentelemetry-instrumentation-aiohttp-client`` also enabled, this client's attempts
are not traced twice: the attempt span suppresses HTTP instrumentations below it (the
context key OpenTelemetry's instrumentations share), so that instrumentation records no span,
no metric and no header for them, and keeps tracing your other sessions.

No span attribute carries credentials: the attempt middleware sits outside the one that adds
``Authorization``, and ``url.full`` has any user info and query values redacted.
"""

from __future__ import annotations

import contextvars
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, TypeVar
from urllib.parse import unquote

import yarl

try:
    from opentelemetry import baggage, metrics, trace
    from opentelemetry import context as otel_context
    from opentelemetry import propagate as otel_propagate
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.metrics import (
        Counter,
        Histogram,
        MeterProvider,
        NoOpCounter,
        NoOpHistogram,
    )
    from opentelemetry.propagate import inject
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import (
        Link,
        NonRecordingSpan,
        NoOpTracer,
        ProxyTracer,
        Span,
        SpanKind,
        StatusCode,
        Tracer,
        TracerProvider,
    )
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:  # pragma: no cover - tested in a subprocess without OpenTelemetry
    raise ImportError(
        "klarna_om_async.telemetry needs OpenTelemetry's API: pip install 'klarna-om-async[otel]'"
    ) from exc

from . import _routes
from . import batch as _batch
from . import reconcile as _reconcile
from ._version import __version__
from .batch import BatchAbortedError, BatchStart, CaptureOutcome, CaptureStatus
from .errors import IdempotencyKeyReusedError, KlarnaAPIError, KlarnaError
from .journal import JournalEntry
from .middleware import (
    AuthMiddleware,
    ErrorMiddleware,
    Handler,
    IdempotencyMiddleware,
    Middleware,
    Request,
    Response,
)
from .operations import Operation
from .orders import OrdersService
from .reconcile import Reconciliation
from .throttle import ThrottleMiddleware, ThrottleRefusal, WaitReason

if TYPE_CHECKING:
    from .client import KlarnaOM

__all__ = (
    "OtelMiddleware",
    "instrument",
    "instrument_journal",
    "operation_name",
    "otel_middleware",
)

#: The instrumentation scope of every tracer and meter made here.
SCOPE: Final = "klarna_om_async"
# The semantic conventions version whose stable HTTP client names are used.
_SCHEMA_URL = "https://opentelemetry.io/schemas/1.26.0"
# The conventions' advice for http.client.request.duration (seconds).
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)

# Shared by every OpenTelemetry instrumentation (they import these from here too): a context
# with the first set traces nothing; the second stops HTTP client instrumentations only.
_SUPPRESS_ALL = otel_context._SUPPRESS_INSTRUMENTATION_KEY
_SUPPRESS_HTTP = otel_context._SUPPRESS_HTTP_INSTRUMENTATION_KEY

_ORDERS = "/ordermanagement/v1/orders/"
_ID = "{id}"
# (method, path below the order with any capture/refund id as {id}) -> operation name.
_OPERATIONS: Final[Mapping[tuple[str, ...], str]] = {
    ("GET",): "klarna.orders.get",
    ("POST", "acknowledge"): "klarna.orders.acknowledge",
    ("POST", "cancel"): "klarna.orders.cancel",
    ("POST", "extend-authorization-time"): "klarna.orders.extend_authorization_time",
    ("POST", "release-remaining-authorization"): "klarna.orders.release_remaining_authorization",
    ("PATCH", "authorization"): "klarna.orders.update_authorization",
    ("PATCH", "customer-details"): "klarna.orders.update_customer_details",
    ("PATCH", "merchant-references"): "klarna.orders.update_merchant_references",
    ("POST", "shipping-info"): "klarna.orders.add_shipping_info",
    ("GET", "captures"): "klarna.captures.list",
    ("POST", "captures"): "klarna.captures.create",
    ("GET", "captures", _ID): "klarna.captures.get",
    ("POST", "captures", _ID, "shipping-info"): "klarna.captures.add_shipping_info",
    ("POST", "captures", _ID, "trigger-send-out"): "klarna.captures.trigger_send_out",
    ("PATCH", "captures", _ID, "extend-due-date"): "klarna.captures.extend_due_date",
    ("GET", "captures", _ID, "extend-due-date-options"): (
        "klarna.captures.get_extend_due_date_options"
    ),
    ("POST", "refunds"): "klarna.refunds.create",
    ("GET", "refunds", _ID): "klarna.refunds.get",
}
#: The name of a call to a path this module does not know.
OTHER_OPERATION: Final = "klarna.request"
# The calls that move money: operation -> (id header of the 201, noun, the booked outcome).
_MONEY: Final = {
    "klarna.captures.create": ("Capture-Id", "capture", "captured"),
    "klarna.refunds.create": ("Refund-Id", "refund", "refunded"),
}


def operation_name(method: str, path: str) -> str:
    """The operation a request is, e.g. ``klarna.captures.create`` for
    ``POST /ordermanagement/v1/orders/{order_id}/captures``; ``klarna.request`` if unknown."""
    return _parse(method, path)[0]


def _parse(method: str, path: str) -> tuple[str, str | None]:
    """``(operation name, order id)`` of a request path (ids come quoted: one segment each)."""
    if not path.startswith(_ORDERS):
        return OTHER_OPERATION, None
    order, *rest = path[len(_ORDERS) :].split("/")
    if len(rest) >= 2:
        rest[1] = _ID
    return _OPERATIONS.get((method, *rest), OTHER_OPERATION), unquote(order)


def _error_type(exc: BaseException) -> str:
    """``error.type``: the status code Klarna answered with, else the exception's class."""
    if isinstance(exc, KlarnaAPIError) and not isinstance(exc, ThrottleRefusal):
        return str(exc.status)
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _safe_url(url: str) -> str:
    """``url`` with any user info and query values redacted, as the conventions ask."""
    if "@" not in url and "?" not in url and "#" not in url:
        return url  # every URL this client builds
    parsed = yarl.URL(url).with_fragment(None)
    if parsed.user is not None or parsed.password is not None:
        parsed = parsed.with_user("REDACTED").with_password("REDACTED")
    if parsed.query_string:
        parsed = parsed.with_query([(name, "REDACTED") for name in parsed.query])
    return str(parsed)


def _safe_path(path: str) -> str:
    """``path`` with its query values redacted and no fragment."""
    if "?" not in path and "#" not in path:
        return path  # every path this client builds: ids are quoted
    path = path.partition("#")[0]
    path, marked, query = path.partition("?")
    if not marked:
        return path
    names = (pair.partition("=")[0] for pair in query.split("&"))
    return path + "?" + "&".join(f"{name}=REDACTED" for name in names)


class _Target:
    """The attributes of the server a base URL names, worked out once per base URL."""

    __slots__ = ("address", "base", "port")

    def __init__(self, base: str) -> None:
        self.base = _safe_url(base)
        parsed = yarl.URL(base)
        self.address = parsed.host or ""
        self.port = parsed.port

    def add_to(self, attributes: dict[str, AttributeValue], path: str) -> None:
        attributes["url.full"] = self.base + _safe_path(path)
        attributes["server.address"] = self.address
        if self.port is not None:
            attributes["server.port"] = self.port


class _Targets:
    """``_Target``s by base URL, for middlewares that learn it from each answer's URL."""

    def __init__(self) -> None:
        self._known: dict[str, _Target] = {}

    def of(self, url: str, path: str) -> _Target:
        base = url[: -len(path)] if path and url.endswith(path) else url
        target = self._known.get(base)
        if target is None:
            if len(self._known) >= 64:  # a client has one base URL; never grow without bound
                self._known.clear()
            target = self._known[base] = _Target(base)
        return target


class _Call:
    """What the attempts of one logical call share: how many there were and how the last ended.

    The call span's middleware starts one per call (``owned``). Without it, the attempt
    middleware starts one at the first attempt of each request value, which every attempt of
    a call shares (the retry middleware sends the same value each time), held weakly.
    """

    __slots__ = ("attempts", "last_error", "owned", "request", "span")

    def __init__(self, *, owned: bool, span: Span | None = None) -> None:
        self.owned = owned
        self.span = span
        self.attempts = 0
        self.last_error: str | None = None
        self.request: weakref.ref[Request] | None = None

    def sends(self, request: Request) -> bool:
        """Whether ``request`` is the very value this call's attempts are sent with."""
        return self.request is not None and self.request() is request


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "klarna_om_async.telemetry.call", default=None
)


def _this_call(request: Request) -> _Call:
    """The call this attempt belongs to: the call span's, else the one of this request value."""
    call = _CALL.get()
    if call is None or not (call.owned or call.sends(request)):
        call = _Call(owned=False)
        call.request = weakref.ref(request)
        _CALL.set(call)
    return call


# Set in the context of a span that already belongs to one batch item (its reconciliation):
# the calls inside are its children, not traces of their own.
_IN_ITEM = otel_context.create_key("klarna_om_async.batch_item")
# The parent of a span that starts a trace: none.
_NO_PARENT = otel_context.Context()


def _batch_links() -> list[Link] | None:
    """Links to the span of the batch running this code, unless it is already in an item's
    trace; None outside a traced batch (then a span is the current span's child)."""
    watches = _batch.current_batch.get()
    if not watches or otel_context.get_value(_IN_ITEM):
        return None
    links = [Link(w.span.get_span_context()) for w in watches if isinstance(w, _BatchSpan)]
    return links or None


def _tracer(provider: TracerProvider | None) -> Tracer:
    return trace.get_tracer(SCOPE, __version__, provider, schema_url=_SCHEMA_URL)


def _meter(provider: MeterProvider | None) -> metrics.Meter:
    return metrics.get_meter(SCOPE, __version__, provider, _SCHEMA_URL)


# Whether tracing or metrics are off is asked at every call, not once: the global providers
# are proxies until the SDK is set, which may happen after a client is instrumented.
def _traces_nothing(tracer: Tracer) -> bool:
    """Whether ``tracer`` is, for now, the API's no-op one (no SDK, or the SDK disabled)."""
    if isinstance(tracer, ProxyTracer):
        # The global provider's tracer once one is set, else a no-op. A private attribute:
        # should a later API drop it, the proxy counts as tracing (the full, correct path).
        tracer = getattr(tracer, "_tracer", tracer)
    return isinstance(tracer, NoOpTracer)


def _measures_nothing(instrument: object) -> bool:
    """Whether ``instrument`` is, for now, a no-op: the API's, or a proxy no SDK backs yet."""
    # The API's proxies (see set_meter_provider) hold the SDK's instrument once it is set.
    # Types are compared, not isinstance: these are ABCs, and this runs at every attempt.
    while type(instrument) not in _NO_OP_INSTRUMENTS:
        instrument = getattr(instrument, "_real_instrument", _NOT_A_PROXY)
        if instrument is _NOT_A_PROXY:
            return False
        if instrument is None:
            return True
    return True


_NO_OP_INSTRUMENTS = frozenset({NoOpCounter, NoOpHistogram})
_NOT_A_PROXY = object()


#: The propagators that add nothing to a request whose context holds no valid span context
#: and no baggage (the W3C defaults); any other (B3, a user's own) is always asked.
_W3C_PROPAGATORS = (TraceContextTextMapPropagator, W3CBaggagePropagator)
# The last global propagator judged, and whether it is only the W3C ones.
_judged: tuple[TextMapPropagator | None, bool] = (None, False)


def _only_w3c(propagator: TextMapPropagator) -> bool:
    global _judged
    if propagator is not _judged[0]:
        parts = [propagator]
        if type(propagator) is CompositePropagator:
            # A private attribute: should a later API drop it, the propagator is always asked.
            parts = list(getattr(propagator, "_propagators", [propagator]))
        _judged = (propagator, all(type(p) in _W3C_PROPAGATORS for p in parts))
    return _judged[1]


def _nothing_to_propagate() -> bool:
    """Whether injecting the current context would add no header: only the W3C propagators
    are set, and the context holds no valid span context and no baggage."""
    return (
        _only_w3c(otel_propagate.get_global_textmap())
        and not trace.get_current_span().get_span_context().is_valid
        and not baggage.get_all()
    )


class OtelMiddleware:
    """One CLIENT span and one ``http.client.request.duration`` measurement per HTTP attempt.

    Put it in ``KlarnaOM(..., middlewares=[...])`` (first, so your other middlewares' copies
    of the request do not hide which attempt of a call this is), or let ``instrument(om)``
    do it. ``base_url`` (the client's) puts ``url.full`` and ``server.*`` on the span from
    its start, for samplers; without it they are read from the answer.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        base_url: str | None = None,
    ) -> None:
        self._tracer = _tracer(tracer_provider)
        meter = _meter(meter_provider)
        self._duration: Histogram = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of HTTP client requests.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._retries: Counter = meter.create_counter(
            "klarna.retries",
            unit="{retry}",
            description="HTTP attempts that resent a call, by the cause (error.type) of the retry.",
        )
        self._target = None if base_url is None else _Target(base_url.rstrip("/"))
        self._targets = _Targets()

    def __repr__(self) -> str:
        return "OtelMiddleware()"

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Send ``request`` inside a CLIENT span, with its trace context in the headers."""
        if otel_context.get_value(_SUPPRESS_ALL) or otel_context.get_value(_SUPPRESS_HTTP):
            return await call_next(request)  # e.g. inside another OtelMiddleware's attempt
        # Both instruments come from one meter: the first says whether metrics are off.
        if _traces_nothing(self._tracer) and _measures_nothing(self._duration):
            # Off: no attributes, no measurement, but what the context carries (a remote
            # parent's trace, any baggage) still goes out, as with the no-op span.
            if _nothing_to_propagate():
                return await call_next(request)  # the common case: as cheap as no middleware
            current = trace.get_current_span()
            if isinstance(current, NonRecordingSpan):  # the no-op tracer's span is this one
                context = otel_context.get_current()
            else:
                span = self._tracer.start_span(request.method, kind=SpanKind.CLIENT)
                context = trace.set_span_in_context(span)
            context = otel_context.set_value(_SUPPRESS_HTTP, True, context)
            added: dict[str, str] = {}
            inject(added, context=context)
            if added:  # else the very request goes on: nothing to add, nothing to copy
                request = Request(
                    request.method,
                    request.path,
                    request.body,
                    {**request.headers, **added},
                    request.idempotency_key,
                    request.deadline,
                )
            token = otel_context.attach(context)
            try:
                return await call_next(request)
            finally:
                otel_context.detach(token)
        call = _this_call(request)
        resend = call.attempts
        call.attempts += 1
        method, path = request.method, request.path
        attributes: dict[str, AttributeValue] = {"http.request.method": method}
        target = self._target
        if target is not None:
            target.add_to(attributes, path)
        if resend:
            attributes["http.request.resend_count"] = resend
            self._retries.add(
                1,
                {
                    "klarna.operation": operation_name(method, path),
                    "error.type": call.last_error or "_OTHER",
                },
            )
        span = self._tracer.start_span(method, kind=SpanKind.CLIENT, attributes=attributes)
        context = trace.set_span_in_context(span)
        headers = dict(request.headers)  # the request's own mapping is shared: never add to it
        inject(headers, context=context)
        sent = Request(
            method, path, request.body, headers, request.idempotency_key, request.deadline
        )
        token = otel_context.attach(otel_context.set_value(_SUPPRESS_HTTP, True, context))
        started = time.perf_counter()
        try:
            response = await call_next(sent)
        except BaseException as exc:
            elapsed = time.perf_counter() - started
            otel_context.detach(token)
            call.last_error = error_type = _error_type(exc)
            url = exc.url if isinstance(exc, KlarnaError) else None
            if isinstance(exc, ThrottleRefusal):  # never sent: no answer, no request duration
                self._end(span, attributes, None, path, url, None, error_type, None)
                raise
            status = exc.status if isinstance(exc, KlarnaAPIError) else None
            correlation_id = exc.correlation_id if isinstance(exc, KlarnaAPIError) else None
            self._end(span, attributes, elapsed, path, url, status, error_type, correlation_id)
            raise
        elapsed = time.perf_counter() - started
        otel_context.detach(token)
        status = response.status
        failed = str(status) if status >= 400 else None
        correlation_id = response.headers.get("Klarna-Correlation-Id")
        self._end(span, attributes, elapsed, path, response.url, status, failed, correlation_id)
        return response

    def _end(
        self,
        span: Span,
        attributes: dict[str, AttributeValue],
        elapsed: float | None,
        path: str,
        url: str | None,
        status: int | None,
        error_type: str | None,
        correlation_id: str | None,
    ) -> None:
        """Finish the attempt's span and record its duration (None: it was never sent)."""
        ended: dict[str, AttributeValue] = {}
        if "url.full" not in attributes and url is not None:
            self._targets.of(url, path).add_to(ended, path)
        if status is not None:
            ended["http.response.status_code"] = status
        if error_type is not None:
            ended["error.type"] = error_type
            span.set_status(StatusCode.ERROR)
        if correlation_id:
            ended["klarna.correlation_id"] = correlation_id
        span.set_attributes(ended)
        span.end()
        if elapsed is None:
            return
        measured: dict[str, AttributeValue] = {
            name: value
            for source in (attributes, ended)
            for name, value in source.items()
            if name in _DURATION_ATTRIBUTES
        }
        self._duration.record(elapsed, measured)


# The attributes the conventions put on http.client.request.duration (low cardinality).
_DURATION_ATTRIBUTES = frozenset(
    {
        "http.request.method",
        "http.response.status_code",
        "error.type",
        "server.address",
        "server.port",
    }
)


def otel_middleware(
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> OtelMiddleware:
    """A middleware tracing every HTTP attempt: ``KlarnaOM(..., middlewares=[otel_middleware()])``.

    Uses the global tracer and meter providers unless given others. For the span around each
    logical call and the ``klarna.calls`` counter too, use ``instrument(om)`` instead.
    """
    return OtelMiddleware(tracer_provider, meter_provider)


class _CallSpanMiddleware:
    """One INTERNAL span per logical call, around all its attempts, and ``klarna.calls``.

    Sits between the idempotency and retry middlewares: the key is known, the retries are
    inside. ``klarna.outcome`` is ``captured``/``refunded`` (booked), ``refused`` (not booked:
    Klarna refused it or it was never sent) or ``unknown`` (may have been booked) for the
    calls that move money; ``ok``/``error`` for the others, and ``unknown`` for any POST or
    PATCH whose effect is unknown (retry it with its ``klarna.idempotency_key``).
    """

    def __init__(self, tracer: Tracer, meter: metrics.Meter) -> None:
        self._tracer = tracer
        self._calls: Counter = meter.create_counter(
            "klarna.calls",
            unit="{call}",
            description="Logical Klarna calls (all their attempts), by operation and outcome.",
        )

    def __repr__(self) -> str:
        return "_CallSpanMiddleware()"

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Run the whole call, retries included, inside its span."""
        if otel_context.get_value(_SUPPRESS_ALL):
            return await call_next(request)
        if (
            _traces_nothing(self._tracer)
            and _measures_nothing(self._calls)
            and not _batch.current_batch.get()  # a batch item's span starts a new trace
        ):
            return await call_next(request)  # the no-op span would be the current one anyway
        operation, order_id = _parse(request.method, request.path)
        attributes: dict[str, AttributeValue] = {"klarna.operation": operation}
        if order_id is not None:
            attributes["klarna.order_id"] = order_id
        if request.idempotency_key is not None:
            attributes["klarna.idempotency_key"] = request.idempotency_key
        links = _batch_links()
        if links is None:
            span = self._tracer.start_span(operation, kind=SpanKind.INTERNAL, attributes=attributes)
        else:  # a batch item: a trace of its own, linked to the batch's span
            span = self._tracer.start_span(
                operation,
                context=_NO_PARENT,
                kind=SpanKind.INTERNAL,
                attributes=attributes,
                links=links,
            )
        call = _Call(owned=True, span=span)
        call_token = _CALL.set(call)
        token = otel_context.attach(trace.set_span_in_context(span))
        money = _MONEY.get(operation)
        try:
            response = await call_next(request)
        except BaseException as exc:
            otel_context.detach(token)
            _CALL.reset(call_token)
            if isinstance(exc, KlarnaError):
                attempts = exc.attempts or call.attempts
                unknown = exc.outcome_unknown
            else:  # cancelled, or a bug: a keyed call that reached the wire may have happened
                attempts = call.attempts
                unknown = attempts > 0 and request.idempotency_key is not None
            outcome = "unknown" if unknown else "refused" if money else "error"
            ended: dict[str, AttributeValue] = {
                "klarna.attempts": attempts,
                "klarna.outcome": outcome,
                "error.type": _error_type(exc),
            }
            if isinstance(exc, KlarnaAPIError) and exc.correlation_id:
                ended["klarna.correlation_id"] = exc.correlation_id
            span.set_attributes(ended)
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR)
            span.end()
            self._calls.add(
                1, {"klarna.operation": operation, "klarna.outcome": outcome, **_low(ended)}
            )
            raise
        otel_context.detach(token)
        _CALL.reset(call_token)
        outcome, error_type = _booked(response, money) if money else ("ok", None)
        ended = {"klarna.attempts": response.attempts, "klarna.outcome": outcome}
        if error_type is not None:
            ended["error.type"] = error_type
            span.set_status(StatusCode.ERROR)
        span.set_attributes(ended)
        span.end()
        self._calls.add(1, {"klarna.operation": operation, "klarna.outcome": outcome})
        return response


class _WaitRecorder:
    """A throttle wait listener: an event on the call span, and ``klarna.wait.duration``."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._duration: Histogram = meter.create_histogram(
            "klarna.wait.duration",
            unit="s",
            description="Time calls waited in the client's throttle, by klarna.wait.reason.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )

    def __repr__(self) -> str:
        return "_WaitRecorder()"

    def __call__(self, reason: WaitReason, seconds: float, request: Request) -> None:
        self._duration.record(seconds, {"klarna.wait.reason": reason})
        call = _CALL.get()
        span = None if call is None else call.span
        if span is not None and span.is_recording():
            span.add_event(
                "klarna.wait", {"klarna.wait.reason": reason, "klarna.wait.seconds": seconds}
            )


def _low(attributes: Mapping[str, AttributeValue]) -> dict[str, AttributeValue]:
    """The low-cardinality attributes of a call fit for a metric: its ``error.type``."""
    return {"error.type": attributes["error.type"]} if "error.type" in attributes else {}


def _booked(response: Response, money: tuple[str, str, str]) -> tuple[str, str | None]:
    """``(outcome, error.type)`` of a money call's 2xx answer, read as the endpoint reads it:
    a replayed answer to another request booked nothing; an unreadable one booked something."""
    id_header, noun, booked = money
    try:
        _routes.created(response, id_header, noun)
    except IdempotencyKeyReusedError as error:
        return "refused", _error_type(error)
    except KlarnaError as error:
        return "unknown", _error_type(error)
    return booked, None


# The call each batch item's operation is (``klarna.operation`` of ``klarna.batch.items``).
_ITEM_OPERATIONS: Final[Mapping[Operation, str]] = {
    Operation.CAPTURE: "klarna.captures.create",
    Operation.REFUND: "klarna.refunds.create",
    Operation.RELEASE: "klarna.orders.release_remaining_authorization",
    Operation.EXTEND: "klarna.orders.extend_authorization_time",
    Operation.CANCEL: "klarna.orders.cancel",
}


class _Observer:
    """The tracer and instruments of one instrumented client, for its batches and
    reconciliations (found through its services: see ``_OBSERVED``)."""

    def __init__(self, tracer: Tracer, meter: metrics.Meter) -> None:
        self.tracer = tracer
        self.items: Counter = meter.create_counter(
            "klarna.batch.items",
            unit="{item}",
            description="Batch items, by klarna.operation and klarna.batch.status.",
        )


# The services of every instrumented client -> its observer (held weakly: no client is kept).
_OBSERVED: weakref.WeakKeyDictionary[object, _Observer] = weakref.WeakKeyDictionary()


class _BatchSpan:
    """A batch listener's watch: the ``klarna.batch`` span and the ``klarna.batch.items``
    counter of one batch."""

    __slots__ = ("counts", "observer", "operations", "span")

    def __init__(self, observer: _Observer, start: BatchStart) -> None:
        self.observer = observer
        attributes: dict[str, AttributeValue] = {"klarna.batch.concurrency": start.concurrency}
        if start.only is not None:
            attributes["klarna.batch.only"] = start.only.value
        self.span = observer.tracer.start_span(
            "klarna.batch", kind=SpanKind.INTERNAL, attributes=attributes
        )
        self.counts = dict.fromkeys(CaptureStatus, 0)
        self.operations: dict[Operation, int] = {}

    def __repr__(self) -> str:
        return "_BatchSpan()"

    def outcome(self, outcome: CaptureOutcome) -> None:
        self.counts[outcome.status] += 1
        operation = outcome.operation
        self.operations[operation] = self.operations.get(operation, 0) + 1
        self.observer.items.add(
            1,
            {
                "klarna.operation": _ITEM_OPERATIONS.get(operation, OTHER_OPERATION),
                "klarna.batch.status": outcome.status.value,
            },
        )

    def ended(self, error: BaseException | None) -> None:
        span = self.span
        ended: dict[str, AttributeValue] = {"klarna.batch.items": sum(self.counts.values())}
        ended.update({f"klarna.batch.{s.value}": n for s, n in self.counts.items()})
        ended.update({f"klarna.batch.operation.{o.value}": n for o, n in self.operations.items()})
        if isinstance(error, GeneratorExit):  # the consumer stopped early: no failure
            ended["klarna.batch.stopped_early"] = True
        elif error is not None:
            ended["error.type"] = _error_type(error)
            if isinstance(error, BatchAbortedError) and error.not_sent_count is not None:
                ended["klarna.batch.not_sent"] = error.not_sent_count
            span.record_exception(error)
            span.set_status(StatusCode.ERROR)
        span.set_attributes(ended)
        span.end()


def _watch_batch(start: BatchStart) -> _BatchSpan | None:
    """The batch listener: a span for each batch an instrumented client runs."""
    services = start.services
    for service in (services.captures, services.refunds, services.orders):
        observer = None if service is None else _OBSERVED.get(service)
        if observer is not None:
            return _BatchSpan(observer, start)
    return None


class _ReconcileSpan:
    """A reconcile listener's watch: the ``klarna.reconcile`` span, current while it lasts."""

    __slots__ = ("span", "token")

    def __init__(self, tracer: Tracer, entry: JournalEntry) -> None:
        attributes: dict[str, AttributeValue] = {
            "klarna.order_id": entry.order_id,
            "klarna.item_key": entry.item_key,
            "klarna.idempotency_key": entry.idempotency_key,
            "klarna.item.operation": entry.operation.value,
        }
        links = _batch_links()
        if links is None:
            span = tracer.start_span("klarna.reconcile", attributes=attributes)
        else:  # in a batch: the item's trace, linked to the batch, with the order read in it
            span = tracer.start_span(
                "klarna.reconcile", context=_NO_PARENT, attributes=attributes, links=links
            )
        self.span = span
        context = otel_context.set_value(_IN_ITEM, True, trace.set_span_in_context(span))
        self.token = otel_context.attach(context)

    def __repr__(self) -> str:
        return "_ReconcileSpan()"

    def ended(self, result: Reconciliation | None, error: BaseException | None) -> None:
        otel_context.detach(self.token)
        span = self.span
        if result is not None:
            verdict = result.verdict
            ended: dict[str, AttributeValue] = {
                "klarna.reconcile.verdict": "unread" if verdict is None else verdict.value,
                "klarna.reconcile.evidence": result.evidence,
            }
            if result.capture_id is not None:
                ended["klarna.reconcile.created_id"] = result.capture_id
            if result.error is not None:  # the order could not be read
                ended["error.type"] = _error_type(result.error)
                span.set_status(StatusCode.ERROR)
            span.set_attributes(ended)
        if error is not None:
            span.set_attribute("error.type", _error_type(error))
            span.record_exception(error)
            span.set_status(StatusCode.ERROR)
        span.end()


def _watch_reconcile(orders: OrdersService, entry: JournalEntry) -> _ReconcileSpan | None:
    """The reconcile listener: a span for each reconciliation through an instrumented client."""
    observer = _OBSERVED.get(orders)
    return None if observer is None else _ReconcileSpan(observer.tracer, entry)


def _observe(om: KlarnaOM, tracer: Tracer, meter: metrics.Meter) -> None:
    """Watch the batches and reconciliations of ``om`` (the hooks are installed once)."""
    observer = _Observer(tracer, meter)
    for service in (om.captures, om.refunds, om.orders):
        _OBSERVED[service] = observer
    if _watch_batch not in _batch.batch_listeners:
        _batch.batch_listeners.append(_watch_batch)
    if _watch_reconcile not in _reconcile.reconcile_listeners:
        _reconcile.reconcile_listeners.append(_watch_reconcile)


def instrument(
    om: KlarnaOM,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> KlarnaOM:
    """Trace and measure every call of ``om``; returns ``om``: ``instrument(KlarnaOM(...))``.

    Adds a span per logical call (after the idempotency middleware, so its key is known,
    and outside the retries) and, unless ``om`` already has one, an ``OtelMiddleware`` for
    each attempt (innermost of the user middlewares, right before error decoding), and
    listens to the throttle's waits (``klarna.wait`` events, ``klarna.wait.duration``), to
    its batches (``klarna.batch`` spans, ``klarna.batch.items``; through
    ``klarna_om_async.batch.batch_listeners``) and to its reconciliations
    (``klarna.reconcile`` spans; through ``klarna_om_async.reconcile.reconcile_listeners``).
    Calling it again does nothing. Raises ``RuntimeError`` once ``om`` has built its chain (at
    ``async with`` or its first call) or is closed: the chain is fixed from then on.
    """
    if om.chain_fixed:
        raise RuntimeError(
            "instrument(om) must run before `async with om` and before its first call: the"
            " client's middleware chain is fixed from then on. Call it right after"
            " KlarnaOM(...), or pass middlewares=[otel_middleware()] to the constructor"
        )
    chain: list[Middleware] = list(om.chain)
    if any(isinstance(middleware, _CallSpanMiddleware) for middleware in chain):
        return om
    tracer = _tracer(tracer_provider)
    meter = _meter(meter_provider)
    if not any(isinstance(middleware, OtelMiddleware) for middleware in chain):
        attempts = OtelMiddleware(tracer_provider, meter_provider, base_url=om.base_url)
        chain.insert(_index_of(chain, ErrorMiddleware, AuthMiddleware), attempts)
    keys = _index_of(chain, IdempotencyMiddleware)
    chain.insert(keys + 1 if keys < len(chain) else 0, _CallSpanMiddleware(tracer, meter))
    om.chain = tuple(chain)
    _observe(om, tracer, meter)
    recorder = _WaitRecorder(meter)
    for middleware in chain:
        if isinstance(middleware, ThrottleMiddleware):
            middleware.wait_listeners.append(recorder)
    return om


def _index_of(chain: list[Middleware], *kinds: type) -> int:
    """The index of the first middleware of the first of ``kinds`` in ``chain``, else its end."""
    for kind in kinds:
        for index, middleware in enumerate(chain):
            if isinstance(middleware, kind):
                return index
    return len(chain)


# How many entries one group commit wrote (powers of two and a half, up to a large group).
_ENTRIES_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

_Journal = TypeVar("_Journal")


class _CommitRecorder:
    """A journal commit listener: ``klarna.journal.commit.duration`` and ``.entries``."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._duration: Histogram = meter.create_histogram(
            "klarna.journal.commit.duration",
            unit="s",
            description="Duration of the journal's group commits (the COMMIT, its fsync included).",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._entries: Histogram = meter.create_histogram(
            "klarna.journal.commit.entries",
            unit="{entry}",
            description="Journal entries written together in one group commit.",
            explicit_bucket_boundaries_advisory=_ENTRIES_BUCKETS,
        )

    def __repr__(self) -> str:
        return "_CommitRecorder()"

    def __call__(self, seconds: float, entries: int) -> None:
        self._duration.record(seconds)
        self._entries.record(entries)


def instrument_journal(
    journal: _Journal, *, meter_provider: MeterProvider | None = None
) -> _Journal:
    """Measure every group commit of ``journal`` (an ``SQLiteJournal``); returns ``journal``.

    Records ``klarna.journal.commit.duration`` (histogram, seconds: how long each COMMIT
    took, its fsync included with ``durability="full"``) and ``klarna.journal.commit.entries``
    (histogram: the entries the group wrote, claims that send and finishes) through
    ``journal.commit_listeners`` (see ``SQLiteJournal.commit_listeners``). Calling it again
    does nothing. Raises ``TypeError`` for a journal without ``commit_listeners`` (e.g.
    ``MemoryJournal``: it commits nothing).
    """
    listeners: list[Callable[[float, int], None]] | None = getattr(
        journal, "commit_listeners", None
    )
    if listeners is None:
        raise TypeError(
            f"instrument_journal needs a journal with commit_listeners (an SQLiteJournal),"
            f" got {type(journal).__name__}"
        )
    if not any(isinstance(listener, _CommitRecorder) for listener in listeners):
        listeners.append(_CommitRecorder(_meter(meter_provider)))
    return journal
