"""Who may call the server: one bearer key, given by environment, file or flag (a flag shows in `ps`).

With a key set, every /v1 route needs it, and so do the metrics and the API's own description (they
name the model and show its traffic); /health stays open for load balancers.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from warmkv.errors import WarmkvError
from warmkv.server.limits import API_KEY_ENV

GUARDED_PATHS = frozenset({"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
UNAUTHORIZED: dict[str, Any] = {
    "error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": None,
              "code": "invalid_api_key"}
}  # fmt: skip


def bearer_matches(authorization: str, key: str) -> bool:
    """Whether an Authorization header carries the key (the scheme's case does not matter: RFC 7235)."""
    scheme, _, token = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def resolve_api_key(flag: str | None, file: str | None) -> str | None:
    """--api-key, else --api-key-file, else $WARMKV_API_KEY, else None (no key: an open server)."""
    if flag is not None and file is not None:
        raise WarmkvError("give --api-key or --api-key-file, not both")
    if file is not None:
        try:
            key = Path(file).read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise WarmkvError(f"--api-key-file {file}: {err}") from err
        if not key:
            raise WarmkvError(f"--api-key-file {file}: the file is empty")
        return key
    if flag is not None:
        return flag
    return os.environ.get(API_KEY_ENV) or None


class GuardPaths:
    """ASGI middleware: the GUARDED_PATHS answer 401 without the key (the /v1 routes check it themselves)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in GUARDED_PATHS:
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not bearer_matches(authorization, self.key):
                await JSONResponse(UNAUTHORIZED, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
