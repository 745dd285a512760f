"""A fake OpenAI-compatible peer speaking llama-server's or vLLM's dialect, for tests that need no build.

Its tokenizer is one token per whitespace-separated word of its own template, deliberately unlike warmkv's
rendering, so a test can tell whose tokens an oracle was built from. Its cache reuses the longest prefix
shared with any earlier prompt, floored to BLOCK tokens: less than the oracle, by a computable amount.
It reports cached tokens as llama-server does (timings.cache_n) or as vLLM does
(usage.prompt_tokens_details.cached_tokens), and streams max_tokens one-word tokens. A message containing
FAIL gets HTTP 500.

Run as a program (`python -m tests.bench.fake_peer --dialect llama.cpp ...`) it stands in for a peer's
binary: of the peer's own command line it reads only --port.
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from warmkv.bench.peer_tokens import Dialect

BLOCK = 4
MODEL = "fake-model"


def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    head = [f"<tools> {json.dumps(tools)}"] if tools else []
    turns = [f"<|{m['role']}|> {m.get('content') or json.dumps(m.get('tool_calls'))}" for m in messages]
    return " ".join([*head, *turns, "<|assistant|>"])


def token_ids(text: str) -> list[int]:
    return [zlib.crc32(word.encode()) % 50_000 for word in text.split()]


def prompt_ids(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    return token_ids(render(messages, tools))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def create_fake_peer(dialect: Dialect) -> FastAPI:
    app = FastAPI()
    seen: list[list[int]] = []

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]}

    if dialect is Dialect.LLAMA_CPP:

        @app.post("/apply-template")
        def apply_template(body: dict[str, Any]) -> dict[str, str]:
            return {"prompt": render(body["messages"], body.get("tools"))}

        @app.post("/tokenize")
        def tokenize_text(body: dict[str, Any]) -> dict[str, Any]:
            return {"tokens": token_ids(body["content"])}

    else:

        @app.post("/tokenize")
        def tokenize_chat(body: dict[str, Any]) -> dict[str, Any]:
            ids = prompt_ids(body["messages"], body.get("tools")) if "messages" in body else token_ids(
                body["prompt"]
            )
            return {"tokens": ids, "count": len(ids), "max_model_len": 8192}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        if any("FAIL" in str(m.get("content")) for m in body["messages"]):
            return JSONResponse({"error": {"message": "induced failure", "type": "server_error"}}, 500)
        ids = prompt_ids(body["messages"], body.get("tools"))
        best = max((common_prefix(ids, earlier) for earlier in seen), default=0)
        cached = min(best, len(ids) - 1) // BLOCK * BLOCK
        seen.append(ids)
        generated = body.get("max_tokens") or 1
        stream = _stream(dialect, len(ids), cached, generated)
        return StreamingResponse(stream, media_type="text/event-stream")

    return app


def _stream(dialect: Dialect, prompt: int, cached: int, generated: int) -> Iterator[str]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
    delta = {"index": 0, "delta": {"role": "assistant", "content": "x "}, "finish_reason": None}
    done = {"index": 0, "delta": {}, "finish_reason": "length"}
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": generated,
                             "total_tokens": prompt + generated}  # fmt: skip
    last = base | {"choices": [], "usage": usage}
    if dialect is Dialect.LLAMA_CPP:
        last["timings"] = {"cache_n": cached, "prompt_n": prompt - cached}
    else:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    chunks = [base | {"choices": [delta]}] * generated + [base | {"choices": [done]}, last]
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


llama_cpp_app = create_fake_peer(Dialect.LLAMA_CPP)  # for a subprocess: uvicorn tests.bench.fake_peer:...


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--dialect", type=Dialect, required=True)
    parser.add_argument("--port", type=int, required=True)
    args, _peer_flags = parser.parse_known_args()
    uvicorn.run(create_fake_peer(args.dialect), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
