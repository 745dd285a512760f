"""Load-or-recompute costs: measured once per machine, model and device, saved, and sanity-checked."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch

from warmkv.cache import load_costs
from warmkv.cache.config import CacheConfig, LoadPolicy
from warmkv.cache.kv_pool import KVPool
from warmkv.cache.load_costs import calibrated_load_costs
from warmkv.cache.prefix_cache import PrefixCache
from warmkv.cache.tiers.base import TierName
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams


class CountingPrefill:
    """A stand-in for the model: each call takes `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def __call__(self, tokens: list[int]) -> None:
        self.calls += 1
        time.sleep(self.seconds)


@pytest.fixture
def pool() -> KVPool:
    return KVPool(2, 16, 16, 2, 8, torch.float32, torch.device("cpu"))


@pytest.fixture(autouse=True)
def _own_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WARMKV_CACHE_DIR", str(tmp_path / "home"))
    return tmp_path / "home"


def test_second_start_reads_the_saved_costs_instead_of_measuring(pool: KVPool, tmp_path: Path) -> None:
    first = CountingPrefill(0.002)
    measured = calibrated_load_costs(pool, first, False, tmp_path / "kv", "model-a")
    assert first.calls > 0 and set(measured.bytes_per_s) == {TierName.HOST, TierName.DISK}
    again = CountingPrefill(0.002)
    saved = calibrated_load_costs(pool, again, False, tmp_path / "kv", "model-a")
    assert again.calls == 0 and saved == measured


def test_recalibrate_another_model_or_other_tiers_measure_again(pool: KVPool, tmp_path: Path) -> None:
    calibrated_load_costs(pool, CountingPrefill(0.002), False, tmp_path / "kv", "model-a")
    for call in (
        lambda p: calibrated_load_costs(pool, p, False, tmp_path / "kv", "model-a", recalibrate=True),
        lambda p: calibrated_load_costs(pool, p, False, tmp_path / "kv", "model-b"),
        lambda p: calibrated_load_costs(pool, p, None, tmp_path / "kv", "model-a"),  # no host tier
    ):
        prefill = CountingPrefill(0.002)
        call(prefill)
        assert prefill.calls > 0


def test_a_disk_folder_on_another_file_system_is_measured_again(pool: KVPool, tmp_path: Path) -> None:
    """The disk tier's speed is its file system's: another folder on the same one reuses the figures, a
    --kv-dir on another (here a tmpfs) is measured."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    calibrated_load_costs(pool, CountingPrefill(0.002), False, tmp_path / "kv", "model-a")
    same = CountingPrefill(0.002)
    calibrated_load_costs(pool, same, False, tmp_path / "elsewhere" / "kv", "model-a")
    assert same.calls == 0
    with tempfile.TemporaryDirectory(dir=shm) as other:
        moved = CountingPrefill(0.002)
        calibrated_load_costs(pool, moved, False, Path(other) / "kv", "model-a")
        assert moved.calls > 0


def test_damaged_or_absurd_saved_costs_are_measured_again(
    pool: KVPool, tmp_path: Path, _own_cache_home: Path
) -> None:
    calibrated_load_costs(pool, CountingPrefill(0.002), None, None, "model-a")
    (saved,) = (_own_cache_home / "calibration").glob("*.json")
    for content in ("{not json", json.dumps({"prefill_tok_s": -5.0, "bytes_per_s": {}}),
                    json.dumps({"prefill_tok_s": "fast", "bytes_per_s": {}})):  # fmt: skip
        saved.write_text(content)
        prefill = CountingPrefill(0.002)
        costs = calibrated_load_costs(pool, prefill, None, None, "model-a")
        assert prefill.calls > 0 and 100 < costs.prefill_tok_s < 1e6


def test_implausible_measurement_is_retried_then_clipped(
    pool: KVPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(load_costs, "PLAUSIBLE_PREFILL_TOK_S", (1.0, 100.0))  # so any real run is "absurd"
    prefill = CountingPrefill(0.001)  # 128 tokens a millisecond: far above the bound
    costs = calibrated_load_costs(pool, prefill, None, None, "model-a")
    assert prefill.calls == load_costs.ATTEMPTS * 6  # warm-up + five timed runs, each attempt
    assert costs.prefill_tok_s == 100.0


def test_the_cache_calibrates_its_own_tiers_only_when_it_weighs_loads(tmp_path: Path) -> None:
    """The engine hands over a prefill and nothing else: which tiers to time is the cache's business."""
    pool = KVPool(2, 64, 16, 2, 8, torch.float32, torch.device("cpu"))
    config = CacheConfig(host_tokens=256, kv_dir=tmp_path / "kv")
    cache = PrefixCache(pool, "model-a", config)
    prefill = CountingPrefill(0.002)
    cache.calibrate(prefill)
    assert prefill.calls > 0 and cache.costs is not None
    assert set(cache.costs.bytes_per_s) == {TierName.HOST, TierName.DISK}
    cache.close()
    for config in (
        CacheConfig(host_tokens=256, kv_dir=tmp_path / "kv", load_policy=LoadPolicy.ALWAYS),
        CacheConfig(host_tokens=0, disk=False),  # nothing below the live pool
    ):
        cache, prefill = PrefixCache(pool, "model-a", config), CountingPrefill(0.002)
        cache.calibrate(prefill)
        assert prefill.calls == 0 and cache.costs is None
        cache.close()


def test_a_pool_smaller_than_the_probe_prompt_calibrates_and_serves(
    tmp_path: Path, tiny_llama, _own_cache_home: Path
) -> None:
    """The timed prefill fits the pool: an engine of four blocks (64 tokens) measured a prompt of eight and
    could not start (PoolExhausted), whenever it had no saved figures for its disk. Figures from the
    shorter prompt are saved apart: they must not stand for a later start with a larger pool."""
    cache = CacheConfig(host_tokens=64, kv_dir=tmp_path / "kv", load_policy=LoadPolicy.AUTO)
    engine = LLMEngine(tiny_llama, EngineConfig(kv_pool_tokens=64, max_batch_tokens=64, cache=cache))
    assert engine.prefix_cache is not None and engine.prefix_cache.costs is not None
    engine.close()
    larger = LLMEngine(tiny_llama, EngineConfig(kv_pool_tokens=1024, max_batch_tokens=64, cache=cache))
    assert len(list(_own_cache_home.glob("calibration/*.json"))) == 2  # measured again, saved apart
    larger.close()
    engine = LLMEngine(tiny_llama, EngineConfig(kv_pool_tokens=64, max_batch_tokens=64, cache=cache))
    seq = engine.add_request(list(range(500, 540)), SamplingParams(max_tokens=8, ignore_eos=True))
    while engine.has_work:
        engine.step()
    assert len(seq.output_ids) == 8
    engine.close()
