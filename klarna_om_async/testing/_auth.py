"""HTTP Basic credentials, built and checked by hand (aiohttp 3.14 deprecates ``BasicAuth``)."""

from __future__ import annotations

import base64
import binascii

__all__ = ("basic_auth_header", "parse_basic_auth")


def basic_auth_header(username: str, password: str) -> str:
    """The ``Authorization`` header value for these credentials."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def parse_basic_auth(header: str | None) -> tuple[str, str] | None:
    """``(username, password)`` from an ``Authorization`` header, or ``None`` if not Basic."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, colon, password = decoded.partition(":")
    if not colon:
        return None
    return username, password
