"""`--device cuda:N`: everything an engine launches, Triton kernels and CUDA graphs included, runs on GPU N,
from the thread that builds it and from the engine's own thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.models.loader import load_model
from warmkv.server.embedded import start_embedded_server

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow, then count to ten."}]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_an_engine_on_the_second_gpu_generates_what_one_on_the_first_does(tiny_llama_folder: Path) -> None:
    replies = []
    for index in (0, 1):
        with torch.cuda.device(index):  # the engine makes its GPU current: this test's thread gets it back
            replies += [(index, text) for text in _replies(tiny_llama_folder, torch.device(f"cuda:{index}"))]
    assert [index for index, _ in replies] == [0, 0, 1, 1]
    assert len({text for _, text in replies}) == 1 and replies[0][1]


def _replies(tiny_llama_folder: Path, device: torch.device) -> list[str]:
    """Two greedy replies of an engine on `device`, the second over the cached prefix."""
    model = load_model(str(tiny_llama_folder), device, torch.float32)
    engine = LLMEngine(model, EngineConfig(device=str(device), kv_pool_tokens=4096))
    assert engine.pool.k.device == device and engine.runner.graphs is not None
    server = start_embedded_server(engine)
    try:
        client = server.client()
        replies = [
            client.chat.completions.create(model=model.name, messages=MESSAGES, max_tokens=24, temperature=0)
            for _ in range(2)
        ]
    finally:
        server.stop()
    return [reply.choices[0].message.content or "" for reply in replies]
