"""Every endpoint fuzzed from its own OpenAPI schema (schemathesis): valid and invalid bodies alike, no
answer is a 5xx, and every error is an OpenAI-style body. A tiny random model with a short context keeps
each case cheap; WARMKV_FUZZ_EXAMPLES sets the cases per endpoint and mode (CI: the default)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from warmkv.cache.config import CacheConfig
from warmkv.engine.config import EngineConfig
from warmkv.models.loader import LoadedModel
from warmkv.server.embedded import EmbeddedServer

from .conftest import start_server

SERVED = "tiny"
EXAMPLES = int(os.environ.get("WARMKV_FUZZ_EXAMPLES", "25"))
HEALTH_CHECKS = list(HealthCheck)  # slow, filtered schema strategies are expected here


@pytest.fixture(scope="module")
def fuzzed(tiny_llama: LoadedModel) -> Iterator[EmbeddedServer]:
    config = EngineConfig(kv_pool_tokens=2048, max_model_len=128, cache=CacheConfig(disk=False))
    running = start_server(tiny_llama, config, served_model_name=SERVED)
    yield running
    running.stop()


def assert_openai_error(body: object) -> None:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_fuzzed_requests_get_no_5xx_and_openai_errors(fuzzed: EmbeddedServer, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    if mode is GenerationMode.NEGATIVE:  # invalid input needs an input: the bodies of the POST endpoints
        operations = [op for op in operations if op.method.upper() == "POST"]
    for operation in operations:

        # derandomized: CI runs the same cases every time (a failure is reproducible, never a flake)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=HEALTH_CHECKS)
        @given(case=operation.as_strategy(generation_mode=mode), served=st.booleans())
        def one_case(case: schemathesis.Case, served: bool) -> None:
            if served and isinstance(case.body, dict):
                case.body["model"] = SERVED  # past the model check, into rendering and the engine
            response = case.call(base_url=fuzzed.url, timeout=120)
            described = f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code}"
            assert response.status_code < 500, f"{described}: {response.text[:300]}"
            if response.status_code >= 400:
                assert_openai_error(response.json())

        one_case()
