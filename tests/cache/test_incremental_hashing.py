"""A new turn chains block keys from the last remembered turn: the same keys, far fewer hashes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warmkv.cache import prefix_index
from warmkv.cache.kv_pool import KVPool
from warmkv.cache.miss_reasons import RecentPrompts
from warmkv.cache.prefix_index import PrefixIndex
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams

BLOCK = 16


@pytest.fixture(scope="module")
def engine(tiny_llama_folder: Path) -> LLMEngine:
    from warmkv.models.loader import load_model

    model = load_model(str(tiny_llama_folder), torch.device("cpu"), torch.float32)
    return LLMEngine(model, EngineConfig(kv_pool_tokens=2048, block_size=BLOCK))


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts block_hash calls: [n]."""
    count = [0]
    real = prefix_index.block_hash

    def counted(parent: bytes, block_tokens: bytes) -> bytes:
        count[0] += 1
        return real(parent, block_tokens)

    monkeypatch.setattr(prefix_index, "block_hash", counted)
    return count


def full_chain(engine: LLMEngine, namespace: str, token_ids: list[int]) -> list[bytes]:
    return engine.prefix_cache.index.chain(namespace, token_ids)  # nothing remembered: every block hashed


def turn(engine: LLMEngine, prompt: list[int], namespace: str = "", max_tokens: int = 5) -> list[int]:
    """Run one request; the prompt plus its reply, as the next turn's history."""
    sequence = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                  cache_namespace=namespace)  # fmt: skip
    while sequence.finish_reason is None:
        engine.step()
    return sequence.token_ids


def test_next_turn_hashes_only_its_new_blocks_and_keys_equal_a_full_recomputation(
    engine: LLMEngine, hashes: list[int]
) -> None:
    history = turn(engine, list(range(100, 260)))  # 160-token prompt + 5 generated
    follow_up = [*history, *range(3000, 3040)]
    hashes[0] = 0
    keys = engine.prefix_cache.chain("", follow_up[:-1])
    incremental = hashes[0]
    assert keys == full_chain(engine, "", follow_up[:-1])
    # 164 of the history's tokens were computed: 10 whole blocks keyed; 204 tokens make 12 blocks
    assert len(keys) == 12 and incremental == 2


def test_a_changed_prefix_is_hashed_from_where_it_differs(engine: LLMEngine, hashes: list[int]) -> None:
    history = turn(engine, list(range(5000, 5100)))
    edited = [*history[:40], 7, *history[41:]]  # token 40 changed: blocks 0-1 still shared
    hashes[0] = 0
    keys = engine.prefix_cache.chain("", edited)
    assert hashes[0] == len(keys) - 2
    assert keys == full_chain(engine, "", edited)


def test_namespaces_never_share_remembered_keys(engine: LLMEngine) -> None:
    history = turn(engine, list(range(7000, 7100)), namespace="tenant a")
    mine = engine.prefix_cache.chain("tenant a", history)
    theirs = engine.prefix_cache.chain("tenant b", history)
    assert theirs == full_chain(engine, "tenant b", history)
    assert not set(mine) & set(theirs)


def test_incremental_turns_keep_exact_outputs(engine: LLMEngine, tiny_llama_folder: Path) -> None:
    """Generated tokens with chained keys equal a cold engine's, turn after turn."""
    cold = LLMEngine(engine.model, EngineConfig(kv_pool_tokens=2048, block_size=BLOCK, prefix_cache=False))
    history: list[int] = list(range(9000, 9070))
    for extra in range(3):
        prompt = [*history, *range(400 + 30 * extra, 420 + 30 * extra)]
        ours, theirs = turn(engine, prompt, "exact"), turn(cold, prompt, "exact")
        assert ours == theirs
        history = ours
    # the last turn is remembered
    assert engine.prefix_cache.recent.nearest("exact", history).known_keys(BLOCK)


def test_a_growing_conversation_is_remembered_once() -> None:
    recent = RecentPrompts()
    for length in range(20, 200, 20):
        recent.remember("", list(range(length)))
    recent.remember("", [*range(30), 5])  # a branch: kept beside the conversation
    assert recent.nearest("", list(range(500))).common == 180
    assert len(recent._by_namespace[""]) == 2


def test_a_finished_turn_remembered_from_its_lookup_bytes_is_the_whole_turn() -> None:
    """The engine remembers a finished sequence with the bytes its prompt's lookup converted: the reply's
    tokens are converted on top of them, and the entry holds prompt and reply."""
    recent = RecentPrompts()
    for namespace, earlier in (("fresh", []), ("known", [7, 8, 9])):  # no entry yet, and one
        recent.remember(namespace, earlier)
        prompt = [7, 8, 9, 10, 300_000]
        looked_up = recent.nearest(namespace, prompt)
        recent.remember(namespace, [*prompt, 11, 12], head=looked_up.query)
        found = recent.nearest(namespace, [*prompt, 11, 12, 13])
        assert found.common == 7 and found.entry.token_ids.tolist() == [*prompt, 11, 12]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2), max_size=12), min_size=1, max_size=12),
    st.lists(st.integers(0, 2), max_size=14),
)
def test_nearest_shares_the_longest_prefix_of_any(remembered: list[list[int]], prompt: list[int]) -> None:
    """Entries are kept sorted and only a prompt's two neighbours are compared: that must find what comparing
    with every remembered sequence finds."""
    recent = RecentPrompts()
    for tokens in remembered:
        recent.remember("", tokens)

    def shared(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    nearest = recent.nearest("", prompt)
    assert nearest.common == max(shared(tokens, prompt) for tokens in remembered)
    assert nearest.entry is None or shared(nearest.entry.token_ids.tolist(), prompt) == nearest.common
    kept = [entry.token_ids.tolist() for entry in recent._by_namespace[""].entries]
    assert not any(a != b and b[: len(a)] == a for a in kept for b in kept)  # none a prefix of another


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 80), st.lists(st.integers(0, 3), min_size=0, max_size=70)),
        min_size=1,
        max_size=6,
    )
)
def test_remembered_keys_always_equal_a_full_chain(turns: list[tuple[int, list[int]]]) -> None:
    """Prompts that keep a prefix of the last one and add tokens: the keys RecentPrompts supplies plus the
    rest hashed equal hashing every block."""
    pool = KVPool(1, 4, BLOCK, 1, 4, torch.float32, torch.device("cpu"))
    index, recent = PrefixIndex(pool, "ab" * 16), RecentPrompts()
    prompt: list[int] = []
    for keep, added in turns:
        prompt = prompt[:keep] + added
        keys = index.chain("", prompt, recent.nearest("", prompt).known_keys(BLOCK))
        assert keys == index.chain("", prompt)
        recent.remember("", prompt, keys[: len(keys) // 2 + 1])  # only some blocks keyed, as after an abort
