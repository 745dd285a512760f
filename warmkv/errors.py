"""Errors a user can act on. Each is mapped once to an HTTP status (here: the server and the router answer
with these bodies) and an exit message (CLI). Nothing here imports more than the standard library."""

from __future__ import annotations

from typing import Any


class WarmkvError(Exception):
    """Base class: the message is written for the user."""


class ModelLoadError(WarmkvError):
    """A model folder or GGUF file is missing, incomplete, corrupt or unsupported."""


class UnsupportedArchitecture(ModelLoadError):
    """The model's architecture is not one warmkv implements."""


class ContextOverflow(WarmkvError):
    """A prompt (plus the requested completion) does not fit the context window."""


class PoolExhausted(WarmkvError):
    """The KV block pool has no free block left, even after evicting unreferenced cached blocks."""


class InvalidRequest(WarmkvError):
    """Request parameters that no model could honour (negative max_tokens, top_p > 1, ...)."""


class UnknownModel(WarmkvError):
    """The request names a model this server does not serve."""


class QueueFull(WarmkvError):
    """More requests are pending than the server's queue bound allows."""


class EngineFailure(WarmkvError):
    """The step that served a request failed; the request is lost, the server is not."""


class EngineStopped(EngineFailure):
    """The engine thread died: no request can be served any more (the server reports it and exits)."""


class CacheCorruption(WarmkvError):
    """A stored KV unit failed verification: truncated, altered, or written by another model."""


# error type -> HTTP status, OpenAI error type, code
_HTTP: dict[type[WarmkvError], tuple[int, str, str | None]] = {
    ContextOverflow: (400, "invalid_request_error", "context_length_exceeded"),
    InvalidRequest: (400, "invalid_request_error", None),
    UnknownModel: (404, "invalid_request_error", "model_not_found"),
    QueueFull: (429, "rate_limit_error", "rate_limit_exceeded"),
    EngineStopped: (503, "server_error", "engine_stopped"),  # before its base class: first match wins
    EngineFailure: (500, "server_error", None),
}


def http_error(err: BaseException) -> tuple[int, str, str | None]:
    """HTTP status, OpenAI error type and code of an error (subclasses map like their base)."""
    return next((v for t, v in _HTTP.items() if isinstance(err, t)), (500, "server_error", None))


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# HTTP status -> Anthropic's error type
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}  # fmt: skip


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """An Anthropic-style error body."""
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
