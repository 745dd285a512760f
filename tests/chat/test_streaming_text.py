"""Streaming text: stop strings and tool calls that arrive split across pieces."""

from __future__ import annotations

from transformers import AutoTokenizer

from warmkv.chat.tool_calls import PARSERS, ToolCallStreamer
from warmkv.engine.detokenizer import IncrementalDetokenizer

from ..conftest import smollm2_tokenizer


def test_stop_string_split_across_tokens_is_never_released() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))
    ids = tokenizer("Paris is lovely. END of answer", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=[". END"])
    released = ""
    for token in ids:
        released += detok.add(token)
        assert "." not in released  # the only "." starts the stop string: it is held, never released
        if detok.stopped:
            break
    assert detok.stopped and released + detok.flush() == "Paris is lovely"


def test_tool_call_split_into_single_characters_streams_as_one_call() -> None:
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    streamer = ToolCallStreamer(PARSERS["hermes"], {"get_weather"})
    content = "".join(streamer.feed(ch) for ch in text)
    tail, malformed = streamer.finish()
    assert content + tail == "Let me check. " and not malformed
    assert [(c.name, c.arguments) for c in streamer.calls] == [("get_weather", '{"city": "Paris"}')]


def test_call_to_unknown_function_stays_text() -> None:
    streamer = ToolCallStreamer(PARSERS["hermes"], {"get_weather"})
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    content = streamer.feed(text)
    assert content == text and streamer.calls == [] and streamer.finish()[1]


def test_incremental_text_equals_decoding_everything_at_once() -> None:
    import torch

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))
    sample = "Ünïcödé — naïve café 東京 🙂 résumé\n  indented code: x = [1, 2, 3]\n" * 3
    ids = [
        *tokenizer(sample, add_special_tokens=False)["input_ids"],
        *torch.randint(0, 49152, (300,), generator=torch.Generator().manual_seed(0)).tolist(),
    ]
    detok = IncrementalDetokenizer(tokenizer, stop=[])
    streamed = "".join(detok.add(t) for t in ids) + detok.flush()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
