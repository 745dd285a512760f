"""Request size limits, enforced before any work: a body past the limit is refused with 413 while it is
still arriving, so neither memory nor parsing time goes to it."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# written once here: the flags (warmkv/config_flags.py, which must stay cheap to import) and the server's
# settings share them
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20  # larger bodies get 413 before they are read whole
DEFAULT_MAX_MESSAGES = 4096  # a chat request with more gets 400 before rendering
API_KEY_ENV = "WARMKV_API_KEY"


def too_large(limit: int) -> JSONResponse:
    message = f"the request body is larger than this server's limit of {limit:,} bytes (--max-request-bytes)"
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": "request_too_large"}}  # fmt: skip
    return JSONResponse(body, status_code=413)


class BodyLimit:
    """ASGI middleware: reads each request body up to `limit` bytes, then hands it on whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(self.limit)(scope, receive, send)
            return
        chunks, size = [], 0
        while True:  # a body without (or with a false) length is counted as it arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before it finished sending: nothing to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await too_large(self.limit)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would say it

        await self.app(scope, replay, send)
