"""Agent workloads through the real server: what each turn computes, and what it reuses."""

from __future__ import annotations

import json
import time

from warmkv.cache.config import CacheConfig
from warmkv.engine.config import EngineConfig
from warmkv.server.embedded import EmbeddedServer

from .conftest import start_server

MODEL = "SmolLM2-135M-Instruct"
BLOCK = 16
SYSTEM = "You are a careful coding agent working in a large repository. Use tools to inspect files. " * 4
TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]  # fmt: skip


def ask(server: EmbeddedServer, messages: list[dict], salt: str, **options: object):
    return server.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=1,
        extra_body={"cache_salt": salt},
        **options,
    )


def test_tool_loop_computes_only_each_rounds_new_tokens(server: EmbeddedServer) -> None:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Find the bug in the parser."},
    ]
    previous_prompt = ask(server, messages, "tool-loop", tools=TOOLS).usage.prompt_tokens
    for n in range(6):
        arguments = json.dumps({"path": f"src/m{n}.py"})
        call = {
            "id": f"call_{n}",
            "type": "function",
            "function": {"name": "read_file", "arguments": arguments},
        }
        result = f"def f{n}():\n    return {n}\n" * 8
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": result},
        ]
        usage = ask(server, messages, "tool-loop", tools=TOOLS).usage
        computed = usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
        new_tokens = usage.prompt_tokens - previous_prompt
        assert computed <= new_tokens + BLOCK, (n, computed, new_tokens)
        previous_prompt = usage.prompt_tokens


def test_requests_sharing_a_system_prompt_all_hit_it(server: EmbeddedServer, default_model) -> None:
    system = {"role": "system", "content": SYSTEM}
    system_tokens = len(default_model.tokenizer.apply_chat_template([system])["input_ids"])
    ask(server, [system, {"role": "user", "content": "Warm up."}], "shared-system")
    for n in range(20):
        usage = ask(server, [system, {"role": "user", "content": f"Question {n}: what does module {n} do?"}],
                    "shared-system").usage  # fmt: skip
        assert usage.prompt_tokens_details.cached_tokens >= system_tokens  # to the system message's end


def test_early_block_rewrite_misses_once_then_hits_in_full(server: EmbeddedServer) -> None:
    def session(status: str) -> tuple[int, int]:
        messages = [{"role": "system", "content": f"Repository status: M {status}\n" + SYSTEM},
                    {"role": "user", "content": "Summarise the status."}]  # fmt: skip
        usage = ask(server, messages, "rewrite").usage
        return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens

    session("src/a.py")
    prompt, cached = session("src/b.py")  # the rewritten early block: a miss from there on
    assert cached < BLOCK
    prompt, cached = session("src/b.py")  # the next session with the new prefix hits it in full
    assert cached == prompt - 1  # all but the last token, whose logits start the reply


def test_interleaved_sessions_under_a_tiny_pool_hit_from_lower_tiers(default_model, tmp_path) -> None:
    config = EngineConfig(kv_pool_tokens=160, cache=CacheConfig(kv_dir=tmp_path / "kv"))  # 10 blocks
    small = start_server(default_model, config)
    sessions = [[{"role": "system", "content": f"Session {n}. " + SYSTEM[:200]},
                 {"role": "user", "content": "Start."}] for n in range(3)]  # fmt: skip
    try:
        for messages in sessions:
            ask(small, messages, "interleaved")
        hits = []
        for messages in sessions:  # each session's blocks were pushed out of the pool by the others
            messages.append({"role": "user", "content": "Continue."})
            hits.append(ask(small, messages, "interleaved").usage.prompt_tokens_details.cached_tokens)
        stats = small.engine.engine.prefix_cache.stats()
    finally:
        small.stop()
    assert all(hit >= 48 for hit in hits), hits
    assert stats[next(t for t in stats if t.value == "host")].hits > 0


THINK_STRIPPING_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- set c = m['content'] or '' -%}"
    "{%- if m['role'] == 'assistant' and '</think>' in c -%}"
    "{%- set c = c.split('</think>')[-1].lstrip() -%}"
    "{%- endif -%}"
    "<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)  # like Qwen3's: earlier turns' reasoning is not sent back to the model


def test_reasoning_dropped_by_the_template_still_hits_the_previous_frontier(default_model) -> None:
    server = start_server(default_model, chat_template=THINK_STRIPPING_TEMPLATE)
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which file has the bug?"}]
    try:
        first = ask(server, history, "think")
        history += [
            {
                "role": "assistant",
                "content": "<think>The parser fails on empty input, so...</think>\nparser.py",
            },
            {"role": "user", "content": "Fix it."},
        ]
        second = ask(server, history, "think")
    finally:
        server.stop()
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // BLOCK * BLOCK
    assert second.usage.prompt_tokens < first.usage.prompt_tokens + 20  # the reasoning really was dropped


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip


def _tool_round_trip(server: EmbeddedServer) -> int:
    """Cached tokens of the request that returns a tool's result."""
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    force = {"type": "function", "function": {"name": "get_weather"}}
    reply = server.client().chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice=force, temperature=0, max_tokens=60
    )
    call = reply.choices[0].message.tool_calls[0]
    time.sleep(0.5)  # the client runs its tool; the server may use the time
    while server.engine.engine.has_work:
        time.sleep(0.05)
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "celsius": 21}'}
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}, result]
    answer = server.client().chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=1
    )
    return answer.usage.prompt_tokens_details.cached_tokens


def test_history_is_prefilled_while_the_client_runs_its_tools(default_model) -> None:
    with_prefill, without = start_server(default_model), start_server(default_model, predictive_prefill=False)
    try:
        predicted_hit, plain_hit = _tool_round_trip(with_prefill), _tool_round_trip(without)
    finally:
        with_prefill.stop()
        without.stop()
    assert predicted_hit > plain_hit  # the assistant's tool-call message was already in the cache
