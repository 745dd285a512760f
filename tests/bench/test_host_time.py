"""bench/host_time.py: the trace replayed with the forward pass taken out, the rest of the server as it is."""

from __future__ import annotations

from typing import Any

import pytest

from bench.host_time import host_ttfts
from warmkv.bench.trace import TraceRequest
from warmkv.engine.model_runner import ModelRunner
from warmkv.models.loader import LoadedModel


def test_rounds_serve_each_turn_its_history_without_running_the_model(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*_: Any, **__: Any) -> None:
        raise AssertionError("the model ran")

    monkeypatch.setattr(tiny_llama.module, "forward", no_model)
    history = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "Hi"}]
    follow_up = [*history, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    requests = [TraceRequest("s", history), TraceRequest("s", follow_up)]
    forward = ModelRunner.forward
    rounds = host_ttfts(tiny_llama, requests, 2, 2048)
    assert ModelRunner.forward is forward  # put back for whatever runs next
    assert len(rounds) == 2
    for first, second in rounds:  # each round on a fresh server: its first turn cold, its second a hit
        assert (first.error, second.error) == ("", "")
        assert first.cached_tokens == 0 < first.ttft_s
        assert second.cached_tokens >= 5 * 16 and second.ttft_s > 0
