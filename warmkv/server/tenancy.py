"""Who sends a request: the API key it presents (`Authorization: Bearer KEY`, or Anthropic's `x-api-key`),
checked against the server's, and the cache namespace that keeps tenants' prefixes apart."""

from __future__ import annotations

import secrets

from fastapi import Request

from warmkv.server.errors import ApiError
from warmkv.server.state import State


def presented_key(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":  # the scheme's case does not matter (RFC 7235)
        return token.strip()
    return request.headers.get("x-api-key", "")


async def authorized(request: Request, state: State) -> None:  # async: on the loop, no worker hop
    expected = state.settings.api_key
    if expected is None:
        return
    if not secrets.compare_digest(presented_key(request).encode(), expected.encode()):
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")


def cache_namespace(request: Request, cache_salt: str | None) -> str:
    """Tenants are kept apart by API key (however presented, so one client's turns through any API share
    their KV) and by an explicit cache_salt."""
    return f"{presented_key(request)}\0{cache_salt or ''}"
