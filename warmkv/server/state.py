"""What every route of one server shares: its settings, the engine, the chat session memory, metrics and
the request log. Built once by `create_app`; routes reach it through `server_state(request)`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from warmkv.chat.conversations import ConversationStore
from warmkv.chat.session import ChatSession
from warmkv.chat.tool_calls import ToolCallParser
from warmkv.engine.async_engine import AsyncEngine
from warmkv.engine.grammar import GrammarCompiler
from warmkv.errors import UnknownModel
from warmkv.server.limits import DEFAULT_MAX_MESSAGES, DEFAULT_MAX_REQUEST_BYTES
from warmkv.server.metrics import ServerMetrics
from warmkv.server.request_log import RequestLog


@dataclass(slots=True)
class ServerSettings:
    api_key: str | None = None
    served_model_name: str | None = None  # default: the model's name
    chat_template: str | None = None  # overrides the model's own template
    tool_parser: str = "hermes"
    # after a reply with tool calls, prefill the history the client will send back, while it runs its tools
    predictive_prefill: bool = True
    # tokenise per message and reuse remembered turns' ids (off: whole-text tokenisation, for comparisons)
    stable_tokens: bool = True
    trace: Path | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_messages: int = DEFAULT_MAX_MESSAGES


@dataclass(slots=True)
class ServerState:
    engine: AsyncEngine
    settings: ServerSettings
    model_name: str
    parser: ToolCallParser
    session: ChatSession
    metrics: ServerMetrics
    request_log: RequestLog
    grammars: GrammarCompiler  # forced tool calls and JSON replies, compiled for this model's tokenizer
    conversations: ConversationStore = field(default_factory=ConversationStore)  # for previous_response_id
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Any:
        return self.engine.engine.model.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise UnknownModel(f"The model {name!r} does not exist; this server serves {self.model_name!r}")


# async: FastAPI runs a plain function dependency on a worker thread, a hop per request for nothing
async def server_state(request: Request) -> ServerState:
    return request.app.state.warmkv


# a route's parameter `state: State` receives its server's state
State = Annotated[ServerState, Depends(server_state)]
