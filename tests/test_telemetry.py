"""OpenTelemetry spans and metrics of every call, against FakeKlarna over loopback, read back
from the SDK's in-memory span exporter and metric reader."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import served_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics._internal import _ProxyMeterProvider
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from klarna_om_async import (
    CaptureNotAllowedError,
    CaptureRequest,
    KlarnaConnectionError,
    KlarnaOM,
    NoSuchOrderError,
    RefundRequest,
    RetryPolicy,
    _routes,
)
from klarna_om_async.middleware import (
    AuthMiddleware,
    ErrorMiddleware,
    Handler,
    IdempotencyMiddleware,
    Request,
    Response,
    RetryMiddleware,
)
from klarna_om_async.telemetry import (
    OtelMiddleware,
    instrument,
    operation_name,
    otel_middleware,
)
from klarna_om_async.testing import (
    Delay,
    DropAfterProcessing,
    FakeKlarna,
    InstantSleep,
    RateLimited,
    ServerFailure,
)
from klarna_om_async.testing._auth import basic_auth_header
from klarna_om_async.throttle import LIMIT_SHARE, ThrottleMiddleware, ThrottleRefusal

SCOPE = "klarna_om_async"


class Telemetry:
    """An SDK tracer provider and meter provider that keep everything in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, kind: SpanKind | None = None) -> list[ReadableSpan]:
        """Finished spans in the order they ended (of one kind, if given)."""
        return [
            span for span in self.exporter.get_finished_spans() if kind is None or span.kind is kind
        ]

    def metrics(self, scope: str = SCOPE) -> dict[str, Metric]:
        data = self.reader.get_metrics_data()
        found: dict[str, Metric] = {}
        for resource in data.resource_metrics if data else ():
            for scoped in resource.scope_metrics:
                if scoped.scope.name == scope:
                    found.update({metric.name: metric for metric in scoped.metrics})
        return found

    def instrument(self, om: KlarnaOM) -> KlarnaOM:
        return instrument(
            om, tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )

    def middleware(self) -> OtelMiddleware:
        return otel_middleware(self.tracer_provider, self.meter_provider)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    telemetry = Telemetry()
    yield telemetry
    telemetry.shutdown()


@pytest.fixture
def propagator() -> Iterator[None]:
    """The W3C trace context as the global propagator, for one test."""
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(TraceContextTextMapPropagator())
    yield
    propagate.set_global_textmap(before)


def client(fake: FakeKlarna, sleeps: InstantSleep, **kwargs: object) -> KlarnaOM:
    """A client of ``fake`` with 4 attempts and instant, un-jittered retries (not started)."""
    policy = RetryPolicy(max_attempts=4, jitter=lambda d: d, sleep=sleeps)
    return KlarnaOM(
        fake.username,
        fake.password,
        base_url=fake.base_url,
        retry=policy,
        clock=kwargs.pop("clock", sleeps.clock),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
async def traced(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> AsyncIterator[KlarnaOM]:
    """A client of ``fake`` instrumented with ``otel``'s providers."""
    async with otel.instrument(client(fake, sleeps)) as om:
        yield om


def attributes(span: ReadableSpan) -> Mapping[str, object]:
    return span.attributes or {}


def one(spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, spans
    return spans[0]


def points(metric: Metric) -> list[NumberDataPoint | HistogramDataPoint]:
    return list(metric.data.data_points)  # type: ignore[arg-type]


CAPTURES = "/ordermanagement/v1/orders/{}/captures"


async def test_a_retried_capture_is_one_call_span_around_two_attempt_spans(
    fake: FakeKlarna, traced: KlarnaOM, otel: Telemetry
) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(ServerFailure(503), method="POST", path="/captures")
    created = await traced.captures.create(order_id, CaptureRequest(captured_amount=6000))
    assert created.attempts == 2

    first, second = otel.spans(SpanKind.CLIENT)
    call = one(otel.spans(SpanKind.INTERNAL))
    assert (first.name, second.name) == ("POST", "POST")
    url = fake.base_url + CAPTURES.format(order_id)
    port = int(fake.base_url.rsplit(":", 1)[1])
    first_attributes = dict(attributes(first))
    assert isinstance(first_attributes.pop("klarna.correlation_id"), str)  # from the 503's body
    assert first_attributes == {
        "http.request.method": "POST",
        "url.full": url,
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.response.status_code": 503,
        "error.type": "503",
    }
    assert first.status.status_code is StatusCode.ERROR
    assert attributes(second) == {
        "http.request.method": "POST",
        "url.full": url,
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.request.resend_count": 1,
        "http.response.status_code": 201,
    }
    assert second.status.status_code is StatusCode.UNSET

    assert call.name == "klarna.captures.create"
    assert attributes(call) == {
        "klarna.operation": "klarna.captures.create",
        "klarna.order_id": order_id,
        "klarna.idempotency_key": created.idempotency_key,
        "klarna.attempts": 2,
        "klarna.outcome": "captured",
    }
    # Both attempts are children of the call, in one trace.
    assert call.parent is None
    for attempt in (first, second):
        assert attempt.parent is not None
        assert attempt.parent.span_id == call.context.span_id
        assert attempt.context.trace_id == call.context.trace_id


async def test_a_refused_capture_says_refused_with_the_status_and_correlation_id(
    fake: FakeKlarna, traced: KlarnaOM, otel: Telemetry
) -> None:
    order_id = fake.add_order(amount=1000)
    with pytest.raises(CaptureNotAllowedError) as refused:
        await traced.captures.create(order_id, CaptureRequest(captured_amount=2000))

    attempt = one(otel.spans(SpanKind.CLIENT))
    assert attributes(attempt)["error.type"] == "403"
    assert attributes(attempt)["http.response.status_code"] == 403
    call = one(otel.spans(SpanKind.INTERNAL))
    assert call.status.status_code is StatusCode.ERROR
    assert attributes(call)["klarna.outcome"] == "refused"
    assert attributes(call)["error.type"] == "403"
    assert attributes(call)["klarna.attempts"] == 1
    assert attributes(call)["klarna.idempotency_key"] == refused.value.idempotency_key
    assert refused.value.correlation_id
    assert attributes(call)["klarna.correlation_id"] == refused.value.correlation_id
    assert [event.name for event in call.events] == ["exception"]


async def test_a_lost_answer_on_every_attempt_is_an_unknown_outcome_retried_by_its_cause(
    fake: FakeKlarna, traced: KlarnaOM, otel: Telemetry
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(DropAfterProcessing(), method="POST", times=None)
    with pytest.raises(KlarnaConnectionError) as lost:
        await traced.captures.create(order_id, CaptureRequest(captured_amount=1000))
    assert lost.value.outcome_unknown

    attempts = otel.spans(SpanKind.CLIENT)
    assert len(attempts) == 4
    cause = "klarna_om_async.errors.KlarnaConnectionError"
    assert {attributes(span)["error.type"] for span in attempts} == {cause}
    assert [attributes(span).get("http.request.resend_count") for span in attempts] == [
        None,
        1,
        2,
        3,
    ]
    # The URL comes from the error when there is no answer.
    assert all(attributes(span)["url.full"] == lost.value.url for span in attempts)
    call = one(otel.spans(SpanKind.INTERNAL))
    assert attributes(call)["klarna.outcome"] == "unknown"
    assert attributes(call)["klarna.attempts"] == 4

    retries = otel.metrics()["klarna.retries"]
    (point,) = points(retries)
    assert isinstance(point, NumberDataPoint)
    assert point.value == 3
    assert dict(point.attributes or {}) == {
        "klarna.operation": "klarna.captures.create",
        "error.type": cause,
    }


async def test_other_calls_are_ok_or_error_and_refunds_say_refunded(
    fake: FakeKlarna, traced: KlarnaOM, otel: Telemetry
) -> None:
    order_id = fake.add_order(amount=1000)
    await traced.orders.get(order_id)
    with pytest.raises(NoSuchOrderError):
        await traced.orders.get("no-such-order")
    await traced.captures.create(order_id, CaptureRequest(captured_amount=1000))
    await traced.refunds.create(order_id, RefundRequest(refunded_amount=400))

    calls = [
        (span.name, attributes(span)["klarna.outcome"]) for span in otel.spans(SpanKind.INTERNAL)
    ]
    assert calls == [
        ("klarna.orders.get", "ok"),
        ("klarna.orders.get", "error"),
        ("klarna.captures.create", "captured"),
        ("klarna.refunds.create", "refunded"),
    ]
    get = otel.spans(SpanKind.INTERNAL)[0]
    assert "klarna.idempotency_key" not in attributes(get)  # GETs have none


async def test_a_201_replayed_for_another_request_is_refused_not_captured(
    answer_201: tuple[dict[str, str], KlarnaOM], otel: Telemetry
) -> None:
    headers, om = answer_201
    # The started fixture's chain is fixed: trace a fresh client of the same server instead.
    base_url = om.base_url
    headers["Location"] = "{origin}/ordermanagement/v1/orders/other/captures/c1"
    async with otel.instrument(KlarnaOM("u", "p", base_url=base_url)) as traced:
        with pytest.raises(Exception, match="earlier request"):
            await traced.captures.create("mine", CaptureRequest(captured_amount=100))
        headers["Location"] = ""
        with pytest.raises(Exception, match="booked the capture"):
            await traced.captures.create("mine", CaptureRequest(captured_amount=200))
    replayed, unreadable = otel.spans(SpanKind.INTERNAL)
    assert attributes(replayed)["klarna.outcome"] == "refused"
    assert attributes(replayed)["error.type"] == (
        "klarna_om_async.errors.IdempotencyKeyReusedError"
    )
    assert attributes(unreadable)["klarna.outcome"] == "unknown"
    assert attributes(unreadable)["error.type"] == "klarna_om_async.errors.KlarnaResponseError"


async def test_a_capture_cancelled_after_it_reached_klarna_is_an_unknown_outcome(
    fake: FakeKlarna, traced: KlarnaOM, otel: Telemetry
) -> None:
    order_id = fake.add_order(amount=100)
    fake.inject(Delay(30), method="POST")
    capture = traced.captures.create(order_id, CaptureRequest(captured_amount=100))
    task = asyncio.create_task(capture)
    await fake.wait_for_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    cancelled = "asyncio.exceptions.CancelledError"
    attempt = one(otel.spans(SpanKind.CLIENT))
    assert attributes(attempt)["error.type"] == cancelled
    assert "http.response.status_code" not in attributes(attempt)
    call = one(otel.spans(SpanKind.INTERNAL))
    assert attributes(call)["klarna.outcome"] == "unknown"
    assert attributes(call)["klarna.attempts"] == 1
    assert attributes(call)["error.type"] == cancelled


async def test_the_trace_context_goes_out_in_a_copy_of_the_headers(
    fake: FakeKlarna, traced: KlarnaOM, otel: Telemetry, propagator: None
) -> None:
    order_id = fake.add_order(amount=1000)
    fake.inject(ServerFailure(503), method="GET")
    await traced.orders.get(order_id)

    sent = [request.headers.get("traceparent") for request in fake.requests]
    expected = [
        f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-{span.context.trace_flags:02x}"
        for span in otel.spans(SpanKind.CLIENT)
    ]
    assert sent == expected
    assert len(set(sent)) == 2  # one per attempt
    # The shared header mappings the request values are built from are left alone.
    assert "traceparent" not in _routes._GET_HEADERS


async def test_no_trace_context_goes_out_without_a_propagator(
    fake: FakeKlarna, traced: KlarnaOM, otel: Telemetry
) -> None:
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([]))
    try:
        await traced.orders.get(fake.add_order(amount=1000))
    finally:
        propagate.set_global_textmap(before)
    assert "traceparent" not in fake.requests[0].headers
    assert len(otel.spans(SpanKind.CLIENT)) == 1


async def test_the_duration_histogram_and_the_calls_counter_are_recorded(
    fake: FakeKlarna, traced: KlarnaOM, otel: Telemetry
) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(ServerFailure(503), method="POST", path="/captures")
    await traced.captures.create(order_id, CaptureRequest(captured_amount=6000))

    found = otel.metrics()
    duration = found["http.client.request.duration"]
    assert duration.unit == "s"
    port = int(fake.base_url.rsplit(":", 1)[1])
    by_status = {}
    for point in points(duration):
        assert isinstance(point, HistogramDataPoint)
        assert point.count == 1
        assert 0 < point.sum < 10
        assert point.explicit_bounds[:3] == (0.005, 0.01, 0.025)  # seconds, as advised
        by_status[(point.attributes or {})["http.response.status_code"]] = dict(
            point.attributes or {}
        )
    assert by_status == {
        503: {
            "http.request.method": "POST",
            "server.address": "127.0.0.1",
            "server.port": port,
            "http.response.status_code": 503,
            "error.type": "503",
        },
        201: {
            "http.request.method": "POST",
            "server.address": "127.0.0.1",
            "server.port": port,
            "http.response.status_code": 201,
        },
    }
    (calls,) = points(found["klarna.calls"])
    assert isinstance(calls, NumberDataPoint)
    assert calls.value == 1
    assert dict(calls.attributes or {}) == {
        "klarna.operation": "klarna.captures.create",
        "klarna.outcome": "captured",
    }
    (retries,) = points(found["klarna.retries"])
    assert dict(retries.attributes or {})["error.type"] == "503"


def every_attribute_value(otel: Telemetry) -> list[str]:
    """Every attribute value of every span, span event and metric point, as text."""
    values: list[str] = []
    for span in otel.spans():
        values += [str(value) for value in attributes(span).values()]
        for event in span.events:
            values += [str(value) for value in (event.attributes or {}).values()]
    data = otel.reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scoped in resource.scope_metrics:
            for metric in scoped.metrics:
                for point in metric.data.data_points:
                    values += [str(value) for value in (point.attributes or {}).values()]
    return values


async def credentials_scenario(username: str, password: str, otel: Telemetry) -> None:
    sleeps = InstantSleep()
    async with FakeKlarna(username=username, password=password) as fake:
        order_id = fake.add_order(amount=1000)
        fake.inject(ServerFailure(503), method="POST", path="/captures")
        async with otel.instrument(client(fake, sleeps)) as om:
            await om.captures.create(order_id, CaptureRequest(captured_amount=600))
            with pytest.raises(CaptureNotAllowedError):
                await om.captures.create(order_id, CaptureRequest(captured_amount=600))
        assert fake.requests[0].headers["Authorization"] == basic_auth_header(username, password)


# Any printable text; the ones Basic auth cannot carry are refused before anything is sent.
_credential_text = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    username=_credential_text.filter(lambda name: ":" not in name),
    # Long enough not to turn up by chance inside an id, a URL or a traceback.
    password=st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=12, max_size=40),
)
def test_no_credentials_in_any_attribute(username: str, password: str) -> None:
    otel = Telemetry()
    try:
        asyncio.run(credentials_scenario(username, password, otel))
        values = every_attribute_value(otel)
        assert values
        header = basic_auth_header(username, password)
        for value in values:
            assert password not in value
            assert header not in value
            assert header.removeprefix("Basic ") not in value
    finally:
        otel.shutdown()


async def test_url_credentials_and_query_values_are_redacted_from_url_full(
    otel: Telemetry,
) -> None:
    middleware = OtelMiddleware(
        otel.tracer_provider,
        otel.meter_provider,
        base_url="https://user:s3cret@klarna.example:8443/",
    )

    async def answer(request: Request) -> Response:
        return Response(204, {}, b"", request, "https://user:s3cret@klarna.example:8443/x?t=1")

    await middleware(Request("GET", "/ordermanagement/v1/orders/o1?token=abc#frag"), answer)
    span = one(otel.spans(SpanKind.CLIENT))
    assert attributes(span)["url.full"] == (
        "https://REDACTED:REDACTED@klarna.example:8443/ordermanagement/v1/orders/o1?token=REDACTED"
    )
    assert attributes(span)["server.address"] == "klarna.example"
    assert attributes(span)["server.port"] == 8443
    assert "s3cret" not in str(every_attribute_value(otel))


async def test_the_middleware_alone_traces_attempts_and_tells_calls_apart(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    order_id = fake.add_order(amount=6000)
    fake.inject(ServerFailure(503), method="POST", path="/captures")
    async with client(fake, sleeps, middlewares=[otel.middleware()]) as om:
        await om.captures.create(order_id, CaptureRequest(captured_amount=3000))
        await om.captures.create(order_id, CaptureRequest(captured_amount=3000))
    resends = [attributes(span).get("http.request.resend_count") for span in otel.spans()]
    assert resends == [None, 1, None]  # the second call starts again at its first attempt
    assert all(span.kind is SpanKind.CLIENT for span in otel.spans())
    assert attributes(otel.spans()[0])["url.full"] == fake.base_url + CAPTURES.format(order_id)
    assert "klarna.calls" not in otel.metrics()


async def test_instrument_puts_the_call_span_after_the_key_and_the_attempt_span_inside(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    om = client(fake, sleeps)
    assert otel.instrument(om) is om
    kinds = [type(middleware) for middleware in om.chain]
    assert kinds[0] is IdempotencyMiddleware
    assert kinds[1].__name__ == "_CallSpanMiddleware"
    assert kinds[2:] == [
        RetryMiddleware,
        ThrottleMiddleware,
        OtelMiddleware,
        ErrorMiddleware,
        AuthMiddleware,
    ]
    assert "_CallSpanMiddleware()" in repr(om.chain)
    assert "OtelMiddleware()" in repr(om.chain)
    chain = om.chain
    otel.instrument(om)  # again: nothing changes
    assert om.chain == chain
    assert not om.chain_fixed
    async with om:
        assert om.chain_fixed
        with pytest.raises(RuntimeError, match=r"before `async with om`"):
            otel.instrument(om)
    assert om.chain_fixed
    with pytest.raises(RuntimeError, match="before"):
        otel.instrument(om)  # closed


async def test_instrument_keeps_the_users_own_attempt_middleware(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    mine = otel.middleware()
    om = otel.instrument(client(fake, sleeps, middlewares=[mine]))
    assert [m for m in om.chain if isinstance(m, OtelMiddleware)] == [mine]
    async with om:
        await om.orders.get(fake.add_order(amount=100))
    call = one(otel.spans(SpanKind.INTERNAL))
    attempt = one(otel.spans(SpanKind.CLIENT))
    assert attempt.parent is not None
    assert attempt.parent.span_id == call.context.span_id


async def test_suppressed_instrumentation_records_nothing(
    fake: FakeKlarna, traced: KlarnaOM, otel: Telemetry
) -> None:
    order_id = fake.add_order(amount=100)
    with suppress_instrumentation():
        await traced.orders.get(order_id)
    assert otel.spans() == []


async def test_no_double_spans_with_the_aiohttp_client_instrumentation(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    instrumentor = AioHttpClientInstrumentor()
    instrumentor.instrument(
        tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    )
    try:
        order_id = fake.add_order(amount=6000)
        fake.inject(ServerFailure(503), method="POST", path="/captures")
        # The client's session is made at `async with`, after instrument(): it is traced.
        async with otel.instrument(client(fake, sleeps)) as om:
            await om.captures.create(order_id, CaptureRequest(captured_amount=6000))
        attempts = otel.spans(SpanKind.CLIENT)
        assert len(attempts) == 2
        assert {span.instrumentation_scope.name for span in attempts} == {SCOPE}  # type: ignore[union-attr]
        # Control: the instrumentation is on, and traces a session of the user's own.
        url = fake.base_url + "/ordermanagement/v1/orders/x"
        async with aiohttp.ClientSession() as session, session.get(url) as answer:
            await answer.read()
    finally:
        instrumentor.uninstrument()
    theirs = otel.spans(SpanKind.CLIENT)[2:]
    assert [span.instrumentation_scope.name for span in theirs] == [  # type: ignore[union-attr]
        "opentelemetry.instrumentation.aiohttp_client"
    ]
    # Nor did it measure this client's attempts: its one measurement is the control's.
    counted = 0
    for metric in otel.metrics("opentelemetry.instrumentation.aiohttp_client").values():
        for point in metric.data.data_points:
            assert isinstance(point, HistogramDataPoint)
            counted += point.count
    assert counted == 1


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("GET", "/ordermanagement/v1/orders/o1", "klarna.orders.get"),
        ("POST", "/ordermanagement/v1/orders/o1/captures", "klarna.captures.create"),
        ("GET", "/ordermanagement/v1/orders/o1/captures", "klarna.captures.list"),
        ("GET", "/ordermanagement/v1/orders/o%2F1/captures/c1", "klarna.captures.get"),
        (
            "POST",
            "/ordermanagement/v1/orders/o1/captures/c1/shipping-info",
            "klarna.captures.add_shipping_info",
        ),
        (
            "POST",
            "/ordermanagement/v1/orders/o1/captures/c1/trigger-send-out",
            "klarna.captures.trigger_send_out",
        ),
        ("POST", "/ordermanagement/v1/orders/o1/refunds", "klarna.refunds.create"),
        ("GET", "/ordermanagement/v1/orders/o1/refunds/r1", "klarna.refunds.get"),
        ("POST", "/ordermanagement/v1/orders/o1/cancel", "klarna.orders.cancel"),
        (
            "POST",
            "/ordermanagement/v1/orders/o1/release-remaining-authorization",
            "klarna.orders.release_remaining_authorization",
        ),
        (
            "PATCH",
            "/ordermanagement/v1/orders/o1/authorization",
            "klarna.orders.update_authorization",
        ),
        ("DELETE", "/ordermanagement/v1/orders/o1", "klarna.request"),
        ("GET", "/somewhere/else", "klarna.request"),
    ],
)
def test_every_endpoint_has_an_operation_name(method: str, path: str, name: str) -> None:
    assert operation_name(method, path) == name


_WITHOUT_OPENTELEMETRY = """
import asyncio, importlib.abc, sys

asked = []

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            asked.append(name)
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Blocker())

from klarna_om_async import CaptureRequest, KlarnaOM
from klarna_om_async.testing import FakeKlarna

async def main():
    async with FakeKlarna() as fake:
        order_id = fake.add_order(amount=100)
        async with KlarnaOM(fake.username, fake.password, base_url=fake.base_url) as om:
            created = await om.captures.create(order_id, CaptureRequest(captured_amount=100))
    assert created.capture_id

asyncio.run(main())
assert asked == [], asked
try:
    import klarna_om_async.telemetry
except ImportError as exc:
    print(exc)
"""


def test_the_package_works_without_opentelemetry_and_never_imports_it() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(_WITHOUT_OPENTELEMETRY)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'klarna-om-async[otel]'" in done.stdout


class FrozenClock:
    """A clock that moves only when the test moves it (instant sleeps leave it still)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def waits(otel: Telemetry) -> dict[str, tuple[int, float]]:
    """``klarna.wait.duration`` as ``{reason: (count, sum)}``."""
    found = otel.metrics().get("klarna.wait.duration")
    by_reason: dict[str, tuple[int, float]] = {}
    for point in points(found) if found else ():
        assert isinstance(point, HistogramDataPoint)
        by_reason[str((point.attributes or {})["klarna.wait.reason"])] = (point.count, point.sum)
    return by_reason


async def test_a_429_pause_is_an_event_on_the_span_of_a_call_it_held_back(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    first_order, second_order = fake.add_order(amount=6000), fake.add_order(amount=6000)
    fake.inject(RateLimited("2"), method="POST", path=f"/{first_order}/captures")
    read_during_the_pause = asyncio.Event()
    clock = FrozenClock()  # moved by the waits only

    async def sleep(seconds: float) -> None:
        if not read_during_the_pause.is_set():  # the first wait: the retry after the 429
            read_during_the_pause.set()
            await om.orders.get(second_order)
        await sleeps(seconds)
        clock.now += seconds

    policy = RetryPolicy(max_attempts=4, jitter=lambda d: d, sleep=sleep)
    om = KlarnaOM(fake.username, fake.password, base_url=fake.base_url, retry=policy, clock=clock)
    async with otel.instrument(om):
        created = await om.captures.create(first_order, CaptureRequest(captured_amount=6000))
    assert created.attempts == 2
    assert sleeps.waits == [2.0, 2.0]  # the read waited out the pause, then the retry

    held_back, retried = otel.spans(SpanKind.INTERNAL)
    assert held_back.name == "klarna.orders.get"
    (event,) = held_back.events
    assert event.name == "klarna.wait"
    assert dict(event.attributes or {}) == {
        "klarna.wait.reason": "pause",
        "klarna.wait.seconds": 2.0,
    }
    assert retried.events == ()  # its own wait was the retry's, after Klarna's 429
    refused = next(
        span
        for span in otel.spans(SpanKind.CLIENT)
        if attributes(span).get("http.response.status_code") == 429
    )
    assert refused.events == ()  # the wait is the call's, not an attempt's
    assert waits(otel) == {"pause": (1, 2.0)}
    assert otel.metrics()["klarna.wait.duration"].unit == "s"


async def test_a_pacing_wait_is_an_event_too(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    order_id = fake.add_order(amount=6000)
    async with otel.instrument(client(fake, sleeps, clock=FrozenClock(), rate_limit=4)) as om:
        await om.orders.get(order_id)
        await om.orders.get(order_id)  # its slot: 1 / (4 x 99%) s after the first
    first, second = otel.spans(SpanKind.INTERNAL)
    assert first.events == ()
    (event,) = second.events
    slot = 1 / (4 * LIMIT_SHARE)
    assert dict(event.attributes or {}) == {
        "klarna.wait.reason": "pace",
        "klarna.wait.seconds": pytest.approx(slot),
    }
    assert waits(otel) == {"pace": (1, pytest.approx(slot))}


async def test_no_wait_no_event_and_no_listener_without_instrument(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    plain = client(fake, sleeps, middlewares=[otel.middleware()])
    throttle = next(m for m in plain.chain if isinstance(m, ThrottleMiddleware))
    assert throttle.wait_listeners == []  # otel_middleware() alone adds no listener
    instrumented = otel.instrument(client(fake, sleeps))
    throttle = next(m for m in instrumented.chain if isinstance(m, ThrottleMiddleware))
    assert len(throttle.wait_listeners) == 1
    otel.instrument(instrumented)
    assert len(throttle.wait_listeners) == 1  # instrumenting again adds nothing
    order_id = fake.add_order(amount=6000)
    async with instrumented:
        await instrumented.orders.get(order_id)
    assert one(otel.spans(SpanKind.INTERNAL)).events == ()
    assert waits(otel) == {}


async def test_a_call_the_throttle_refuses_before_sending_is_no_429_from_klarna(
    fake: FakeKlarna, sleeps: InstantSleep, otel: Telemetry
) -> None:
    order_id = fake.add_order(amount=6000)
    policy = RetryPolicy(max_attempts=1, sleep=sleeps, deadline=0.5)
    om = KlarnaOM(
        fake.username,
        fake.password,
        base_url=fake.base_url,
        retry=policy,
        clock=FrozenClock(),
        rate_limit=1,
    )
    async with otel.instrument(om):
        await om.captures.create(order_id, CaptureRequest(captured_amount=100))
        with pytest.raises(ThrottleRefusal) as caught:  # its slot is 1 s away, past 0.5 s
            await om.captures.create(order_id, CaptureRequest(captured_amount=100))
    assert caught.value.request_sent is False
    assert om.rate_limited_count == 0
    refusal = "klarna_om_async.throttle.ThrottleRefusal"

    one(otel.spans(SpanKind.CLIENT))  # only the capture that was sent has an attempt span
    _booked, refused = otel.spans(SpanKind.INTERNAL)
    assert attributes(refused)["klarna.outcome"] == "refused"
    assert attributes(refused)["error.type"] == refusal
    found = otel.metrics()
    outcomes = {
        (
            dict(point.attributes or {})["klarna.outcome"],
            dict(point.attributes or {}).get("error.type"),
        )
        for point in points(found["klarna.calls"])
    }
    assert outcomes == {("captured", None), ("refused", refusal)}
    statuses = {
        dict(point.attributes or {}).get("http.response.status_code")
        for point in points(found["http.client.request.duration"])
    }
    assert statuses == {201}


async def test_an_attempt_refused_after_queueing_for_a_connection_is_no_429_either(
    otel: Telemetry,
) -> None:
    # One connection, held by "a" until the clock has passed "b"'s deadline: the transport's
    # re-check refuses "b" inside its attempt span, unsent.
    clock = FrozenClock()
    arrivals: list[str] = []
    first_arrived, release = asyncio.Event(), asyncio.Event()

    async def capture(request: web.Request) -> web.Response:
        arrivals.append(request.match_info["order"])
        if len(arrivals) == 1:
            first_arrived.set()
            await release.wait()
        return web.Response(status=201, headers={"Capture-Id": "cap"})

    passed = asyncio.Event()

    async def note_b(request: Request, call_next: Handler) -> Response:
        if "/orders/b/" in request.path:
            passed.set()
        return await call_next(request)

    app = web.Application()
    app.router.add_post("/ordermanagement/v1/orders/{order}/captures", capture)
    async with served_app(app) as url:
        policy = RetryPolicy(max_attempts=1, sleep=InstantSleep(), deadline=2)
        om = KlarnaOM(
            "u",
            "p",
            base_url=url,
            retry=policy,
            clock=clock,
            max_connections=1,
            middlewares=[note_b, otel.middleware()],
        )
        async with otel.instrument(om):
            first = asyncio.ensure_future(
                om.captures.create("a", CaptureRequest(captured_amount=1))
            )
            await first_arrived.wait()
            second = asyncio.ensure_future(
                om.captures.create("b", CaptureRequest(captured_amount=1))
            )
            await passed.wait()
            clock.now = 3.0  # past "b"'s deadline
            release.set()
            await first
            with pytest.raises(ThrottleRefusal, match="not sent"):
                await second
    assert arrivals == ["a"]
    refusal = "klarna_om_async.throttle.ThrottleRefusal"
    sent, refused = sorted(
        otel.spans(SpanKind.CLIENT), key=lambda span: "error.type" in attributes(span)
    )
    assert attributes(sent)["http.response.status_code"] == 201
    assert attributes(refused)["error.type"] == refusal
    assert "http.response.status_code" not in attributes(refused)
    found = otel.metrics()
    (duration,) = points(found["http.client.request.duration"])  # the sent attempt only
    assert dict(duration.attributes or {})["http.response.status_code"] == 201
    assert om.rate_limited_count == 0


@pytest.fixture
def no_sdk(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No global tracer provider (as before ``trace.set_tracer_provider``) and the W3C trace
    context and baggage as the global propagator, for one test."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(
        CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
    )
    yield
    propagate.set_global_textmap(before)


async def test_with_no_sdk_the_attempts_go_through_untouched_and_nothing_is_recorded(
    fake: FakeKlarna, sleeps: InstantSleep, no_sdk: None
) -> None:
    received: list[Request] = []
    sent: list[Request] = []

    async def before(request: Request, call_next: Handler) -> Response:
        received.append(request)
        return await call_next(request)

    async def after(request: Request, call_next: Handler) -> Response:
        sent.append(request)
        return await call_next(request)

    meters = _ProxyMeterProvider()  # the API's global meter provider before the SDK is set
    middleware = otel_middleware(meter_provider=meters)
    order_id = fake.add_order(amount=1000)
    fake.inject(ServerFailure(503), method="GET")
    async with client(fake, sleeps, middlewares=[before, middleware, after]) as om:
        await om.orders.get(order_id)
        assert len(sent) == 2
        assert all(out is into for out, into in zip(sent, received, strict=True))  # as is
        assert "traceparent" not in fake.requests[0].headers

        # What the context carries still goes out: a remote parent's trace, the baggage.
        parent = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1))
        context = baggage.set_baggage(
            "tenant", "t1", trace.set_span_in_context(NonRecordingSpan(parent))
        )
        token = otel_context.attach(context)
        try:
            await om.orders.get(order_id)
        finally:
            otel_context.detach(token)
    out, into = sent[-1], received[-1]
    assert out is not into
    assert out.headers == {
        **into.headers,
        "traceparent": f"00-{0xABC:032x}-{0xDEF:016x}-01",
        "baggage": "tenant=t1",
    }
    assert (out.method, out.path, out.body, out.idempotency_key, out.deadline) == (
        into.method,
        into.path,
        into.body,
        into.idempotency_key,
        into.deadline,
    )
    assert "baggage" not in into.headers  # the shared mappings are left alone


class TenantPropagator(TextMapPropagator):
    """A user's own propagator: adds a header whatever the context holds."""

    def extract(
        self, carrier: object, context: Context | None = None, getter: object = None
    ) -> Context:
        return context or Context()

    def inject(self, carrier: Any, context: Context | None = None, setter: Any = None) -> None:
        carrier["x-tenant"] = "t9"

    @property
    def fields(self) -> set[str]:
        return {"x-tenant"}


@pytest.mark.parametrize(
    ("propagators", "carried", "expected"),
    [
        # Baggage alone, without any trace: the W3C baggage header still goes out.
        ([TraceContextTextMapPropagator(), W3CBaggagePropagator()], True, {"baggage": "tenant=t1"}),
        # A propagator of the user's own is always asked, even for an empty context.
        ([TraceContextTextMapPropagator(), TenantPropagator()], False, {"x-tenant": "t9"}),
        ([TenantPropagator()], False, {"x-tenant": "t9"}),
        ([TraceContextTextMapPropagator(), W3CBaggagePropagator()], False, {}),
    ],
)
async def test_with_no_sdk_what_the_propagators_add_goes_out(
    fake: FakeKlarna,
    sleeps: InstantSleep,
    no_sdk: None,
    propagators: list[TextMapPropagator],
    carried: bool,
    expected: dict[str, str],
) -> None:
    propagate.set_global_textmap(CompositePropagator(propagators))
    middleware = otel_middleware(meter_provider=_ProxyMeterProvider())
    order_id = fake.add_order(amount=1000)
    context = baggage.set_baggage("tenant", "t1") if carried else otel_context.get_current()
    token = otel_context.attach(context)
    try:
        async with client(fake, sleeps, middlewares=[middleware]) as om:
            await om.orders.get(order_id)
    finally:
        otel_context.detach(token)
    headers = fake.requests[-1].headers
    added = {k: headers[k] for k in ("baggage", "x-tenant", "traceparent") if k in headers}
    assert added == expected


async def test_setting_the_sdk_after_instrumenting_starts_the_recording(
    fake: FakeKlarna,
    sleeps: InstantSleep,
    otel: Telemetry,
    no_sdk: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    meters = _ProxyMeterProvider()
    async with instrument(client(fake, sleeps), meter_provider=meters) as om:
        order_id = fake.add_order(amount=6000)
        await om.captures.create(order_id, CaptureRequest(captured_amount=1000))
        assert "traceparent" not in fake.requests[-1].headers

        # trace.set_tracer_provider and metrics.set_meter_provider, as the SDK's setup does.
        monkeypatch.setattr(trace, "_TRACER_PROVIDER", otel.tracer_provider)
        meters.on_set_meter_provider(otel.meter_provider)
        fake.inject(ServerFailure(503), method="POST", path="/captures")
        await om.captures.create(order_id, CaptureRequest(captured_amount=1000))

    first, second = otel.spans(SpanKind.CLIENT)
    call = one(otel.spans(SpanKind.INTERNAL))
    assert call.name == "klarna.captures.create"
    assert attributes(call)["klarna.attempts"] == 2
    assert first.parent is not None
    assert first.parent.span_id == call.context.span_id
    assert attributes(second)["http.request.resend_count"] == 1
    assert fake.requests[-1].headers["traceparent"].split("-")[2] == (
        f"{second.context.span_id:016x}"
    )
    found = otel.metrics()
    assert sum(point.count for point in points(found["http.client.request.duration"])) == 2  # type: ignore[union-attr]
    (calls,) = points(found["klarna.calls"])
    assert calls.value == 1  # type: ignore[union-attr]
    (retries,) = points(found["klarna.retries"])
    assert dict(retries.attributes or {})["error.type"] == "503"
