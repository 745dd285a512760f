"""What another server says about a request's prompt: its own token ids (for the oracle) and its
cached-token count (from a response's usage), read in each dialect that real servers speak.

The oracle of a peer's row is built from the peer's tokens, never from warmkv's rendering: another chat
template or tokenizer shifts every prefix, and the row would be judged against prompts it never saw.
- llama.cpp's llama-server: POST /apply-template renders the messages with its chat template, POST /tokenize
  turns that text into ids as its chat endpoint does (special tokens parsed, BOS as the model wants).
- vLLM: POST /tokenize takes the messages (and tools) and renders them with its template itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import httpx

from warmkv.bench.trace import TraceRequest
from warmkv.errors import WarmkvError


class PeerError(WarmkvError):
    """A peer server could not be built, started, reached or understood."""


class Dialect(str, Enum):
    LLAMA_CPP = "llama.cpp"  # /apply-template, then /tokenize {"content"}
    VLLM = "vllm"  # /tokenize {"messages"}


def server_root(url: str) -> str:
    """`http://host:port/v1` -> `http://host:port`: the tokenizer endpoints live outside /v1."""
    root = url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


@dataclass(slots=True)
class ServerTokenizer:
    """A server's own prompt ids for a trace request, through its HTTP endpoints."""

    http: httpx.Client  # base_url is the server's root
    model: str
    dialect: Dialect | None = None  # found on first use when not given

    def prompt_ids(self, request: TraceRequest) -> list[int]:
        if self.dialect is None:
            self.dialect = self._detect()
        if self.dialect is Dialect.LLAMA_CPP:
            return self._llama_cpp_ids(request)
        return self._vllm_ids(request)

    def _detect(self) -> Dialect:
        # /apply-template exists only on llama-server; a bare POST answers 4xx other than 404 there
        probe = self.http.post("/apply-template", json={"messages": []})
        if probe.status_code != 404:
            return Dialect.LLAMA_CPP
        probe = self.http.post("/tokenize", json={"model": self.model, "prompt": "x"})
        if probe.status_code == 200:
            return Dialect.VLLM
        raise PeerError(f"{self.http.base_url} has neither llama.cpp's /apply-template nor vLLM's /tokenize: "
                        "its prompt tokens cannot be read for the oracle")  # fmt: skip

    def _llama_cpp_ids(self, request: TraceRequest) -> list[int]:
        rendered = _json(self.http.post("/apply-template", json=_chat_body(request)), "prompt")
        body = {"content": rendered, "add_special": True, "parse_special": True}
        return _token_ids(_json(self.http.post("/tokenize", json=body), "tokens"))

    def _vllm_ids(self, request: TraceRequest) -> list[int]:
        body = {"model": self.model, **_chat_body(request), "add_generation_prompt": True}
        return _token_ids(_json(self.http.post("/tokenize", json=body), "tokens"))


def _chat_body(request: TraceRequest) -> dict[str, Any]:
    return {"messages": request.messages} | ({"tools": request.tools} if request.tools else {})


def _json(response: httpx.Response, key: str) -> Any:
    if response.status_code != 200:
        raise PeerError(f"{response.request.method} {response.request.url}: HTTP {response.status_code} "
                        f"{response.text[:300]}")  # fmt: skip
    try:
        return response.json()[key]
    except (ValueError, KeyError, TypeError) as err:
        raise PeerError(f"{response.request.url} answered without {key!r}: {response.text[:300]}") from err


def _token_ids(tokens: Any) -> list[int]:
    # llama-server answers {"id", "piece"} objects when asked with_pieces; plain ints otherwise
    if not isinstance(tokens, list):
        raise PeerError(f"tokens are not a list: {str(tokens)[:100]}")
    ids = [t["id"] if isinstance(t, dict) else t for t in tokens]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise PeerError(f"token ids are not integers: {str(ids)[:100]}")
    return ids


def cached_tokens(usage: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> int:
    """Prompt tokens the server says it reused, whichever way it says so: OpenAI's
    usage.prompt_tokens_details.cached_tokens (warmkv, vLLM with --enable-prompt-tokens-details, recent
    llama-server), DeepSeek's usage.prompt_cache_hit_tokens, or llama-server's timings.cache_n beside
    usage in the last chunk."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    for value in (details.get("cached_tokens"), usage.get("prompt_cache_hit_tokens"),
                  ((extra or {}).get("timings") or {}).get("cache_n")):  # fmt: skip
        if isinstance(value, int) and value >= 0:
            return value
    return 0
