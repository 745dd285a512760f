"""warmkv.client against warmkv's own server: warm-ups use max_tokens 0 and the next turn hits them."""

from __future__ import annotations

from warmkv.client import WarmClient
from warmkv.server.embedded import EmbeddedServer

MODEL = "SmolLM2-135M-Instruct"
BLOCK = 16


def test_warmups_prefill_the_history_and_the_turn_hits_it(server: EmbeddedServer) -> None:
    client = WarmClient(server.client(), warmup="always", warmup_wait_s=60)  # never sent past it
    messages = [{"role": "system", "content": "You answer in one short sentence. " * 10},
                {"role": "user", "content": "Name a colour."}]  # fmt: skip
    for question in ("Name a fruit.", "Name a city."):
        reply = client.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                              extra_body={"cache_salt": "client-toolkit"})  # fmt: skip
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": question}]  # fmt: skip
    client.create(model=MODEL, messages=messages, max_tokens=1, extra_body={"cache_salt": "client-toolkit"})
    kinds = [r.kind for r in client.records]
    assert kinds == ["request", "warmup", "request", "warmup", "request"]
    for warmup, turn in zip(client.records[1::2], client.records[2::2], strict=True):
        assert warmup.completion_tokens == 0  # max_tokens 0: warmkv only prefills
        assert turn.cached_tokens >= warmup.prompt_tokens - BLOCK + 1
        assert turn.reason == "only new tail"
