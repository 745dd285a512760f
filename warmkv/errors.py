"""Errors a user can act on. Each is mapped once to an HTTP status (server) and an exit message (CLI)."""


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
