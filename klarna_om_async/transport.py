"""The one place that talks to aiohttp: send a request, read the whole answer, release it."""

from __future__ import annotations

import aiohttp

from .errors import KlarnaConnectionError, KlarnaTimeoutError
from .middleware import Request, Response

__all__ = ("AiohttpTransport",)


class AiohttpTransport:
    """Sends one HTTP attempt with its own timeout and returns the fully read response.

    The per-attempt timeout is passed on every request, so a session's own ``total``
    timeout never spans the retry loop and its sleeps.
    """

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        self._session = session
        self._base_url = base_url
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def __call__(self, request: Request) -> Response:
        """Send ``request``; raise KlarnaTimeoutError / KlarnaConnectionError on failure."""
        url = self._base_url + request.path
        try:
            async with self._session.request(
                request.method,
                url,
                data=request.body,
                headers=request.headers,
                timeout=self._timeout,
                # A redirected POST could be replayed elsewhere; surface 3xx as an error.
                allow_redirects=False,
            ) as answer:
                body = await answer.read()
                return Response(
                    status=answer.status,
                    headers=answer.headers,
                    body=body,
                    request=request,
                    url=url,
                )
        except TimeoutError as exc:  # before ClientError: ServerTimeoutError is both
            error: KlarnaConnectionError = KlarnaTimeoutError(
                f"No answer from Klarna within {self._timeout.total}s"
            )
            cause: BaseException = exc
        except aiohttp.ClientError as exc:
            error = KlarnaConnectionError(f"Connection to Klarna failed: {exc!r}")
            cause = exc
        error.bind(
            method=request.method, url=url, idempotency_key=request.idempotency_key, attempts=1
        )
        raise error from cause
