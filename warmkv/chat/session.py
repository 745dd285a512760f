"""Session memory of a server: the prompts it rendered and the replies it generated, per tenant, so that a
client re-sending its history reuses their exact token ids (stable tokens), and, after a reply with tool
calls, the history the client will send back next (predictive prefill)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from warmkv.chat.prompt import ChatPrompt, build_chat_prompt
from warmkv.chat.tool_calls import ToolCall, ToolCallParser
from warmkv.chat.turns import TurnMemory


@dataclass(slots=True)
class ChatSession:
    tokenizer: Any
    template: str
    parser: ToolCallParser
    # tokenise per message and reuse remembered turns' ids (off: whole-text tokenisation, for comparisons)
    stable_tokens: bool = True
    predictive_prefill: bool = True
    turns: TurnMemory = field(default_factory=TurnMemory)

    def prompt(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        tool_choice: str | dict[str, Any] | None,
        namespace: str,
        continue_final: bool = False,
    ) -> ChatPrompt:
        """The prompt a chat request continues, reusing the ids of a remembered turn it starts with;
        `continue_final`: the reply goes on with the last (assistant) message."""
        return build_chat_prompt(
            self.tokenizer, self.template, self.parser, messages, tools, tool_choice, self.turns, namespace,
            stable_tokens=self.stable_tokens, continue_final=continue_final,
        )  # fmt: skip

    def after_reply(
        self,
        namespace: str,
        prompt: ChatPrompt,
        reply_ids: list[int],
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        calls: list[ToolCall],
    ) -> list[int] | None:
        """Remember the prompt, and the prompt with the reply as generated: the next turn's history starts
        so. Returns the ids of the history the client will send back, to prefill while its tools run, when
        the reply called tools."""
        if reply_ids and reply_ids[-1] in self.tokenizer.all_special_ids:
            reply_ids = reply_ids[:-1]  # the end-of-turn token: the template writes it back itself
        # both turns with the prompt's message ends: a later request finds a turn it begins with at the last
        # of them (the reply's turn, the longer lived, takes them over for branches)
        ends = prompt.message_ends()
        self.turns.remember(namespace, prompt.text, prompt.token_ids, ends)
        reply_text = self.tokenizer.decode(reply_ids, skip_special_tokens=False)
        self.turns.remember(namespace, prompt.text + reply_text, prompt.token_ids + reply_ids, ends)
        if not (self.predictive_prefill and calls):
            return None
        reply_message = {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in calls]}
        predicted = build_chat_prompt(
            self.tokenizer, self.template, self.parser, [*messages, reply_message], tools, None, self.turns,
            namespace, add_generation_prompt=False, stable_tokens=self.stable_tokens,
        )  # fmt: skip
        self.turns.remember(namespace, predicted.text, predicted.token_ids, predicted.message_ends())
        return predicted.token_ids
