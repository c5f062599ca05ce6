"""An aiohttp.web service that captures an order when the warehouse says it shipped.

One ``KlarnaOM`` lives as long as the application (made in ``cleanup_ctx``) and is shared by
every request. The idempotency key is derived from the shipment id, so when the warehouse
system resends the same "shipped" message, Klarna replays the first answer instead of
capturing twice.

Run against a fake Klarna (no credentials needed)::

    klarna-om fake-server --port 8081 --orders 5 &
    KLARNA_BASE_URL=http://127.0.0.1:8081 KLARNA_USERNAME=test-user \\
        KLARNA_PASSWORD=test-password python examples/web_service.py
    curl -X POST localhost:8080/orders/ORDER_ID/shipments/box-1 \\
        -d '{"amount": 1000, "carrier": "DHL", "tracking_number": "123"}'
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from aiohttp import web

from klarna_om_async import (
    CaptureRequest,
    KlarnaAPIError,
    KlarnaError,
    KlarnaOM,
    ShippingInfo,
    ValidationError,
    deterministic_key,
)

KLARNA = web.AppKey("klarna", KlarnaOM)


async def klarna_client(app: web.Application) -> AsyncIterator[None]:
    """Open one KlarnaOM for the app's lifetime (a cleanup_ctx) and close it at shutdown."""
    async with KlarnaOM(
        os.environ["KLARNA_USERNAME"],
        os.environ["KLARNA_PASSWORD"],
        base_url=os.environ.get("KLARNA_BASE_URL"),
        playground=os.environ.get("KLARNA_PLAYGROUND") == "1",
    ) as om:
        app[KLARNA] = om
        yield


async def ship(request: web.Request) -> web.Response:
    """Capture what was shipped in one box, with its tracking number."""
    order_id = request.match_info["order_id"]
    shipment_id = request.match_info["shipment_id"]
    payload = await request.json()
    om = request.app[KLARNA]
    try:
        capture = CaptureRequest(
            captured_amount=payload["amount"],
            reference=shipment_id,
            shipping_info=[
                ShippingInfo(
                    shipping_company=payload["carrier"],
                    tracking_number=payload["tracking_number"],
                )
            ],
        )
        created = await om.captures.create(
            order_id, capture, idempotency_key=deterministic_key(f"{order_id}:{shipment_id}")
        )
    except (ValidationError, KeyError, TypeError) as error:
        return web.json_response({"error": f"bad shipment: {error}"}, status=400)
    except KlarnaError as error:
        body = {"error": str(error), "idempotency_key": error.idempotency_key}
        if error.outcome_unknown:
            # Not lost: resending this same shipment later replays Klarna's first answer.
            return web.json_response(body, status=503)
        status = error.status if isinstance(error, KlarnaAPIError) else 502
        return web.json_response(body, status=409 if status == 403 else 502)
    return web.json_response({"capture_id": created.capture_id}, status=201)


def make_app() -> web.Application:
    """The service: POST /orders/{order_id}/shipments/{shipment_id}."""
    app = web.Application()
    app.cleanup_ctx.append(klarna_client)
    app.router.add_post("/orders/{order_id}/shipments/{shipment_id}", ship)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), port=int(os.environ.get("PORT", "8080")))
