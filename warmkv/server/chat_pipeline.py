"""The one chat path every chat API translates onto: /v1/chat/completions, /v1/messages and /v1/responses
all become a `ChatRequest` (OpenAI chat messages and function tools), rendered, cached, anchored, logged
and remembered the same way. So one conversation reuses the same KV whichever API carries its turns, and
what the chat path enforces (forced tool calls and JSON replies, by grammar) every API inherits."""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from warmkv.chat.prompt import ChatPrompt
from warmkv.chat.reply import ReplyReader
from warmkv.chat.structure import reply_grammar
from warmkv.chat.tool_calls import ToolCall
from warmkv.engine.llm_engine import StepOutput
from warmkv.engine.sampling import SamplingParams
from warmkv.engine.sequence import FinishReason, Sequence
from warmkv.errors import InvalidRequest
from warmkv.server.generation import Generation
from warmkv.server.request_log import RequestRecord
from warmkv.server.state import ServerState


@dataclass(slots=True)
class ChatRequest:
    """A chat request in the server's internal shape, whichever API it came through."""

    id: str
    endpoint: str  # the request log's name for the API: "chat", "messages", "responses"
    messages: list[dict[str, Any]]  # OpenAI chat messages
    tools: list[dict[str, Any]] | None  # OpenAI function tools
    tool_choice: str | dict[str, Any] | None  # "none" | "auto" | "required" | {"function": {"name": ...}}
    params: SamplingParams  # its max_tokens is set from `max_tokens` once the prompt's length is known
    max_tokens: int | None  # None: whatever the context window leaves
    namespace: str  # the tenant's cache namespace
    breakpoints: frozenset[int] = frozenset()  # messages whose end the client marked for caching
    max_tool_calls: int | None = None  # 1 when the client turned parallel tool calls off
    response_format: dict[str, Any] | None = None  # OpenAI's: the reply must be JSON (under a schema)
    n: int = 1  # choices: sequences sampled from the one prompt
    continue_final: bool = False  # the reply goes on with the last message, an assistant's (a prefill)


class ReplyEnd(str, enum.Enum):
    """Why a reply ended, in the chat path's words; each API names these its own way."""

    STOP = "stop"  # end of turn, or a stop sequence
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    ABORT = "abort"


@dataclass(slots=True)
class ReplyPiece:
    text: str = ""  # content released by this output
    calls: list[ToolCall] = field(default_factory=list)  # tool calls completed by this output
    end: ReplyEnd | None = None  # set on the last piece
    stop_sequence: str | None = None  # the client's stop sequence that ended the reply


class ChatReply:
    """A reply as it streams, split into content and tool calls."""

    def __init__(
        self, state: ServerState, prompt: ChatPrompt, chat: ChatRequest, stops_at_call_end: bool
    ) -> None:
        """stops_at_call_end: the reply ends at a call's end marker (see ReplyReader)."""
        self._reader = ReplyReader(prompt, state.parser, stops_at_call_end)
        self._tokenizer = state.tokenizer
        self._stops = list(chat.params.stop)  # before the forced call's end marker joins them
        self._max_calls = chat.max_tool_calls
        self.calls: list[ToolCall] = []

    def feed(self, output: StepOutput) -> ReplyPiece:
        text = self._reader.feed(output.text)
        if output.finished:
            text += self._reader.finish()
        new = self._reader.calls[len(self.calls) :]
        if self._max_calls is not None:
            new = new[: max(0, self._max_calls - len(self.calls))]
        self.calls += new
        piece = ReplyPiece(text, new)
        if output.finished:
            piece.end, piece.stop_sequence = self._end(output.sequence)
        return piece

    def _end(self, sequence: Sequence) -> tuple[ReplyEnd, str | None]:
        reason = ReplyEnd(sequence.finish_reason.value)  # type: ignore[union-attr]
        if self.calls and reason is ReplyEnd.STOP:  # cut by max_tokens, it is cut, whatever calls it made
            return ReplyEnd.TOOL_CALLS, None
        if reason is not ReplyEnd.STOP or not self._stops or sequence.finish_reason is not FinishReason.STOP:
            return reason, None
        # which stop string ended it: the first one in the text as generated
        generated = self._tokenizer.decode(sequence.output_ids, skip_special_tokens=True)
        found = [(generated.find(s), s) for s in self._stops if s in generated]
        return reason, min(found)[1] if found else None


@dataclass(slots=True)
class ChatRun:
    """A chat request submitted to the engine."""

    chat: ChatRequest
    prompt: ChatPrompt
    generation: Generation
    replies: list[ChatReply]  # one per choice
    breakpoint_tokens: int  # token offset of the last cache breakpoint in the prompt (0: none)

    @property
    def record(self) -> RequestRecord:
        return self.generation.record

    @property
    def reply(self) -> ChatReply:
        """The first choice's reply: the one the conversation goes on with."""
        return self.replies[0]


async def start_chat(state: ServerState, chat: ChatRequest) -> ChatRun:
    """Render and tokenise (in a worker thread: a long history takes a while) and set up the generation."""
    if len(chat.messages) > state.settings.max_messages:
        raise InvalidRequest(f"messages: {len(chat.messages)} messages; this server takes at most "
                             f"{state.settings.max_messages} (--max-messages)")  # fmt: skip
    names = Counter(tool["function"]["name"] for tool in chat.tools or [])
    twice = next((name for name, count in names.items() if count > 1), None)
    if twice is not None:  # a call names its tool: which of the two would it be?
        raise InvalidRequest(f"tools: two tools are named {twice!r}; each needs a name of its own")
    prompt = await asyncio.to_thread(
        state.session.prompt, chat.messages, chat.tools, chat.tool_choice, chat.namespace, chat.continue_final
    )
    prompt_tokens = len(prompt.token_ids)
    # unset: whatever the context window leaves (at least 1, so an overlong prompt is refused as such)
    chat.params.max_tokens = (
        chat.max_tokens if chat.max_tokens is not None else max(1, state.max_model_len - prompt_tokens)
    )
    parallel = chat.max_tool_calls != 1
    grammar = reply_grammar(chat.tools, chat.tool_choice, chat.response_format, state.parser, parallel)
    # compiling takes milliseconds (a second for the first grammar: the vocabulary is indexed)
    chat.params.grammar = await asyncio.to_thread(state.grammars.compile, grammar) if grammar else None
    # one call at most, without a grammar to say so: the reply ends with the first call's end marker
    one_call_by_stop = grammar is None and bool(prompt.tool_names) and not parallel
    replies = [ChatReply(state, prompt, chat, one_call_by_stop) for _ in range(chat.n)]
    if one_call_by_stop:
        chat.params.stop.append(state.parser.end)
    breakpoints = [span.end for span in prompt.spans if span.index in chat.breakpoints]
    record = RequestRecord(id=chat.id, endpoint=chat.endpoint)
    generation = Generation(state.engine, record, prompt.token_ids, chat.params, chat.namespace, prompt.spans,
                            tuple(breakpoints), n=chat.n)  # fmt: skip
    return ChatRun(chat, prompt, generation, replies, max(breakpoints, default=0))


async def remember_reply(state: ServerState, run: ChatRun, sequence: Sequence) -> None:
    """After a reply: remember its turn, and prefill the history a tool-calling client will send back."""
    chat = run.chat
    # (a continued message comes back as the prefill and the reply in one message: not predicted)
    calls = [] if chat.continue_final else run.reply.calls
    predicted = await asyncio.to_thread(
        state.session.after_reply,
        chat.namespace, run.prompt, sequence.output_ids, chat.messages, chat.tools, calls,
    )  # fmt: skip
    if predicted is not None:
        state.engine.prefill_when_idle(predicted, chat.namespace)
