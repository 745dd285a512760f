"""/metrics counts what happened: hits and misses per tier in blocks and tokens, every response by status."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from warmkv.models.loader import LoadedModel
from warmkv.server.embedded import EmbeddedServer

from .conftest import start_server

BLOCK = 16


@pytest.fixture(scope="module")
def tiny_server(tiny_llama: LoadedModel) -> Iterator[EmbeddedServer]:
    running = start_server(tiny_llama)
    yield running
    running.stop()


def scrape(server: EmbeddedServer) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def complete(server: EmbeddedServer, prompt: list[int], **body: object) -> httpx.Response:
    model = server.client().models.list().data[0].id
    body = {"model": model, "prompt": prompt, "max_tokens": 1, **body}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def test_live_hits_and_misses_are_counted_in_blocks_and_tokens(tiny_server: EmbeddedServer) -> None:
    prompt = list(range(3000, 3000 + 5 * BLOCK + 3))  # 83 tokens: five whole blocks
    before = scrape(tiny_server)
    first = complete(tiny_server, prompt).json()["usage"]
    second = complete(tiny_server, prompt).json()["usage"]
    after = scrape(tiny_server)
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0 and cached >= 5 * BLOCK
    assert delta(before, after, "warmkv_cache_hit_tokens_total", tier="live") == cached
    assert delta(before, after, "warmkv_cache_hits_total", tier="live") == cached // BLOCK
    assert delta(before, after, "warmkv_cache_miss_tokens_total", tier="live") == 2 * len(prompt) - cached
    assert delta(before, after, "warmkv_cache_misses_total", tier="live") == 5 + (5 - cached // BLOCK)
    # what the live tier did not serve was looked for, and missed, below it too
    assert delta(before, after, "warmkv_cache_miss_tokens_total", tier="disk") == 2 * len(prompt) - cached
    assert delta(before, after, "warmkv_cache_writes_total", tier="live") == 5  # computed once, indexed once


def test_every_response_is_counted_by_status(
    tiny_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    before = scrape(tiny_server)
    assert httpx.get(f"{tiny_server.url}/v1/no-such-route").status_code == 404
    body = {"model": "no-such-model", "prompt": [1, 2, 3], "max_tokens": 1}
    assert httpx.post(f"{tiny_server.url}/v1/completions", json=body).status_code == 404
    assert complete(tiny_server, [1, 2, 3], max_tokens="many").status_code == 400  # validation
    with caplog.at_level(logging.INFO, logger="warmkv.server"):
        assert complete(tiny_server, list(range(100, 600)), max_tokens=100_000).status_code == 400
    assert complete(tiny_server, [5, 6, 7]).status_code == 200
    after = scrape(tiny_server)
    responses = "warmkv_http_responses_total"
    assert delta(before, after, responses, route="unmatched", status="404") == 1
    assert delta(before, after, responses, route="/v1/completions", status="404") == 1
    assert delta(before, after, responses, route="/v1/completions", status="400") == 2
    assert delta(before, after, responses, route="/v1/completions", status="200") == 1
    refused = [r.getMessage() for r in caplog.records if "status=400" in r.getMessage()]
    assert refused and all("computed=0" in line for line in refused)  # a refused prompt computed nothing
