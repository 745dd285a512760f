"""Message ends come from a constant number of template renders, and are exactly the ends the definition
gives (render the conversation up to each message; where that is a prefix of the prompt, it ends there)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import warmkv.chat.anchors as anchors
from warmkv.chat.prompt import build_chat_prompt
from warmkv.chat.template import render_chat
from warmkv.chat.tool_calls import PARSERS

from ..conftest import smollm2_tokenizer

TOKENIZER = AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))
# a tools-aware template in the Qwen 2.5 manner: tool calls as JSON, tool results inside a user turn
TOOLS_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{%- for c in m.tool_calls or [] %}\n<tool_call>\n{{ c.function | tojson }}\n</tool_call>{% endfor %}"
    "<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
# rewrites earlier turns: only the last assistant message keeps its text (as reasoning templates do)
REWRITING_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.role != 'assistant' or loop.last %}{{ m.content }}{% endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
# Qwen3's way: an assistant turn after the last user turn opens with an empty think block when it is the
# last message, so a turn renders one way in a prefix and another once something follows it
LAST_QUERY_TEMPLATE = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last and loop.last %}<think>\n\n</think>\n\n"
    "{%- endif %}{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
TEMPLATES = {"smollm2": TOKENIZER.chat_template, "tools": TOOLS_TEMPLATE, "rewriting": REWRITING_TEMPLATE,
             "last query": LAST_QUERY_TEMPLATE}  # fmt: skip


def by_definition(messages: list[dict[str, Any]], template: str, text: str) -> list[tuple[int, str, int]]:
    ends = []
    for i, message in enumerate(messages):
        prefix = render_chat(TOKENIZER, messages[: i + 1], None, False, template)
        if text.startswith(prefix):
            ends.append((i, message["role"], len(prefix)))
    return ends


CALL = {"type": "function", "function": {"name": "read", "arguments": {"path": "a.py"}}}
message = st.one_of(
    st.builds(lambda role, text: {"role": role, "content": text},
              st.sampled_from(["user", "assistant", "tool"]),
              st.sampled_from(["", "hi", "Hello there.", "\n\nok"])),
    st.just({"role": "assistant", "content": "", "tool_calls": [CALL]}),
)  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(sorted(TEMPLATES)),
    st.booleans(),
    st.booleans(),
    st.lists(message, min_size=1, max_size=8),
)
def test_ends_equal_the_definition(
    name: str, system: bool, opened: bool, messages: list[dict[str, Any]]
) -> None:
    """Of a prompt with the generation prompt (a request's) or without (the history a tool-calling client
    will send back, prefilled ahead of it)."""
    messages = ([{"role": "system", "content": "Be brief."}] if system else []) + messages
    template = TEMPLATES[name]
    text = render_chat(TOKENIZER, messages, None, opened, template)
    assert anchors.message_ends(TOKENIZER, messages, None, template, text, opened) == by_definition(
        messages, template, text
    )


# Qwen3's way with reasoning: written for assistant turns after the last user message that carry it (or are
# last), so an earlier render of the same turn can write it where the whole conversation does not
REASONING_TEMPLATE = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last and (loop.last or m.reasoning_content) %}"
    "<think>\n{{ m.reasoning_content or '' }}\n</think>\n\n{%- endif %}{{ m.content }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_turns_with_and_without_reasoning_learn_their_ends_apart() -> None:
    """The same markup follows both replies, but rendering up to the one without reasoning writes an empty
    think block the whole conversation does not: it ends nowhere, the one with reasoning does."""
    reply = {"role": "assistant", "content": "ok", "reasoning_content": "think"}
    messages = [{"role": "assistant", "content": "hi"}, reply, dict(reply)]
    text = render_chat(TOKENIZER, messages, None, False, REASONING_TEMPLATE)
    ends = anchors.message_ends(TOKENIZER, messages, None, REASONING_TEMPLATE, text, False)
    assert ends == by_definition(messages, REASONING_TEMPLATE, text)
    assert [(index, end == len(text)) for index, _, end in ends] == [(1, False), (2, True)]


def test_two_turns_with_reasoning_each_end_where_the_definition_says() -> None:
    """The same markup follows both replies with reasoning; the whole conversation writes the first one's
    without it (an earlier user message's turn) and the last one's with it: rendered alone, the first ends
    nowhere, the last one does. Learning the stretch after the first must not drop the last's end."""
    reply = {"role": "assistant", "content": "ok", "reasoning_content": "think"}
    tool = {"role": "tool", "content": "result"}
    messages = [{"role": "user", "content": "a"}, reply, tool,
                {"role": "user", "content": "b"}, dict(reply), tool]  # fmt: skip
    text = render_chat(TOKENIZER, messages, None, True, REASONING_TEMPLATE)
    ends = anchors.message_ends(TOKENIZER, messages, None, REASONING_TEMPLATE, text, True)
    assert ends == by_definition(messages, REASONING_TEMPLATE, text)
    assert 4 in [index for index, _, _ in ends]


class Renders:
    """Counts the template renders of warmkv.chat.anchors."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count, real = 0, anchors.render_chat

        def counted(*args: Any, **kwargs: Any) -> str:
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(anchors, "render_chat", counted)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_thousand_messages_take_a_constant_number_of_renders(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    renders = Renders(monkeypatch)
    messages = [{"role": "system", "content": "You are terse."}]
    for turn in range(500):
        messages += [{"role": "user", "content": f"Question {turn}?"},
                     {"role": "assistant", "content": f"Answer {turn}."}]  # fmt: skip
    prompt = build_chat_prompt(TOKENIZER, TEMPLATES[name], PARSERS["hermes"], messages, None, None)
    # the marked render, and a few prefixes per distinct stretch of template markup; rendering every
    # prefix would be 1,001
    assert renders.count <= 10, renders.count
    # the rewriting template hides earlier replies, the last-query one opens only the last with a think
    # block: their ends are no prefix, the last one's is
    hidden = set(range(2, len(messages) - 1, 2)) if name in ("rewriting", "last query") else set()
    assert [span.index for span in prompt.spans] == [i for i in range(len(messages)) if i not in hidden]


# Llama 3.x's way with tools: they go into the first user message, and a conversation without one is refused
TOOLS_IN_FIRST_USER_TEMPLATE = (
    "{%- if tools and not (messages | selectattr('role', 'equalto', 'user') | list) %}"
    "{{ raise_exception('Cannot put tools in the first user message when there is none!') }}{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_a_prefix_the_template_refuses_ends_nowhere() -> None:
    """A system message alone with tools is refused by such a template: it is no end, and the request goes
    on (it used to fail with the template's error)."""
    tools = [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Read a.py"}]
    template = TOOLS_IN_FIRST_USER_TEMPLATE
    text = render_chat(TOKENIZER, messages, tools, True, template)
    whole = render_chat(TOKENIZER, messages, tools, False, template)
    assert anchors.message_ends(TOKENIZER, messages, tools, template, text) == [(1, "user", len(whole))]
    prompt = build_chat_prompt(TOKENIZER, template, PARSERS["hermes"], messages, tools, None)
    assert prompt.text == text


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_ends_of_a_prompt_that_continues_its_last_message_equal_the_definition(name: str) -> None:
    """An assistant prefill: the text stops inside the last message, which therefore ends nowhere."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "JSON?"},
                {"role": "assistant", "content": '{"a": '}]  # fmt: skip
    template = TEMPLATES[name]
    text = render_chat(TOKENIZER, messages, None, False, template, continue_final=True)
    assert text.endswith('{"a": ')
    ends = anchors.message_ends(TOKENIZER, messages, None, template, text, False, continue_final=True)
    assert ends == by_definition(messages, template, text)
    assert len(messages) - 1 not in [index for index, _, _ in ends]
