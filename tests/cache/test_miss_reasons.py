"""Miss classification on its own: the nearest earlier prompt decides the reason."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from warmkv.cache.miss_reasons import (
    LookupStop,
    MissKind,
    MissReason,
    RecentPrompts,
    _common_prefix,
    explain_miss,
)
from warmkv.chat.anchors import MessageSpan
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams


class Digits:
    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


SPANS = [MessageSpan(0, "system", 40, 160), MessageSpan(1, "user", 70, 280)]


def reason(
    prompt: list[int], cached: int, stop: LookupStop | None, recent: RecentPrompts, text: str | None = None
) -> MissReason:
    nearest = recent.nearest("", prompt)
    return explain_miss(prompt, cached, stop, text, nearest, SPANS, Digits(), block_size=16)


def test_nearest_prompt_is_the_longest_shared_prefix() -> None:
    recent = RecentPrompts()
    recent.remember("", list(range(50)))
    recent.remember("", [*range(30), 999])
    recent.remember("other tenant", list(range(70)))
    assert recent.nearest("", list(range(60))).common == 50


def test_each_kind_of_miss() -> None:
    recent = RecentPrompts()
    prompt = list(range(70))
    assert reason(prompt, 0, None, recent).kind is MissKind.NEW_TOKENS
    recent.remember("", list(range(70)))
    assert reason(prompt, 0, None, recent).kind is MissKind.EVICTED
    slow = reason(prompt, 16, LookupStop.SLOWER_THAN_RECOMPUTE, recent, "load from disk slower than…")
    assert slow.kind is MissKind.SLOWER_THAN_RECOMPUTE and "tokens 16-64" in slow.text
    assert reason(prompt, 64, None, recent).kind is MissKind.BELOW_MINIMUM
    changed = reason([*range(50), 7, 7, 7, *range(53, 70)], 48, None, recent)
    assert (changed.kind, changed.message_index, changed.role) == (MissKind.CHANGED, 1, "user")
    assert "changed at token 50" in changed.text and "7 7 7" in changed.request_excerpt


def test_lookup_stopped_by_a_full_pool_is_named_so() -> None:
    recent = RecentPrompts()
    recent.remember("", list(range(70)))
    full = reason(list(range(70)), 16, LookupStop.POOL_FULL, recent, "KV pool full")
    assert full.kind is MissKind.POOL_FULL and full.text.endswith("KV pool full: tokens 16-64 recomputed")
    unreadable = reason(list(range(70)), 16, LookupStop.UNREADABLE, recent, "disk block unreadable (dropped)")
    assert unreadable.kind is MissKind.UNREADABLE


def test_first_request_after_a_restart_served_from_disk_is_not_called_unshared() -> None:
    fresh_memory = RecentPrompts()  # a restarted server remembers no prompt; its disk tier served 64
    after_restart = reason(list(range(70)), 64, None, fresh_memory)
    assert after_restart.kind is MissKind.NEW_TOKENS
    assert "no earlier request" not in after_restart.text
    assert "new tokens after the 64 served from the cache" in after_restart.text


def test_unrelated_prompt_sharing_less_than_a_block_is_new_not_changed() -> None:
    recent = RecentPrompts()
    recent.remember("", [*range(5), *range(500, 560)])  # shares only a 5-token template header
    unrelated = reason([*range(5), *range(900, 960)], 0, None, recent)
    assert unrelated.kind is MissKind.NEW_TOKENS and "changed" not in unrelated.text
    assert "no earlier request with this API key and cache_salt shares a whole block" in unrelated.text


def test_a_prompt_only_another_tenant_sent_is_new_and_the_reason_says_whose_requests_count() -> None:
    recent = RecentPrompts()
    recent.remember("other key\0", list(range(70)))
    alone = reason(list(range(70)), 0, None, recent)  # the namespace "": no API key
    assert alone.kind is MissKind.NEW_TOKENS
    assert "no earlier request with this API key and cache_salt shares its start" in alone.text
    recent.remember("", list(range(70)))
    assert reason(list(range(70)), 69, None, recent).text.endswith(
        "1 more token matches an earlier request: less than a whole 16-token block, or the prompt's last "
        "token, which is always computed"
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 3000), st.integers(0, 3000))
def test_common_prefix_finds_the_first_difference_at_any_distance(length: int, other: int, cut: int) -> None:
    a = np.arange(length)
    b = np.arange(other)
    if cut < min(length, other):
        b[cut] = -1
    expected = next((i for i in range(min(length, other)) if a[i] != b[i]), min(length, other))
    assert _common_prefix(a, b) == expected


def test_a_hundred_concurrent_sessions_in_one_namespace_are_all_remembered() -> None:
    recent = RecentPrompts()
    system = list(range(1000))
    for session in range(100):
        recent.remember("", [*system, 5000 + session, *range(6000, 6100)])
    nearest = recent.nearest("", [*system, 5000, *range(6000, 6100), 7])  # the oldest session's next turn
    assert nearest.common == 1101


tokens = st.lists(st.integers(0, 3), max_size=14)


@settings(max_examples=80, deadline=None)
@given(st.lists(tokens, max_size=12), tokens)
def test_nearest_is_the_longest_prefix_shared_with_any(remembered: list[list[int]], query: list[int]) -> None:
    recent = RecentPrompts()
    for earlier in remembered:
        recent.remember("", earlier)
    shared = [_common_prefix(np.array(earlier), np.array(query)) for earlier in remembered]
    assert recent.nearest("", query).common == max(shared, default=0)


def test_a_reply_resent_whole_is_not_called_evicted_for_its_last_token(tiny_llama) -> None:
    """A reply's last token is sampled, never computed: a next turn that resends the reply finds all but it
    cached (a partial block kept at the reply's end), and that token is new, not 'cached and evicted'
    (a helper's probe saw 'tokens 367-368 were cached by an earlier request and evicted' on a pool that
    never evicted)."""
    engine = LLMEngine(tiny_llama, EngineConfig(kv_pool_tokens=4096))
    first = list(engine.generate(list(range(500, 525)), SamplingParams(max_tokens=7, ignore_eos=True)))[-1]
    history = first.sequence.token_ids  # 32 tokens, the last of them never computed
    prompt = [*history, *range(700, 710)]
    seq = list(engine.generate(prompt, SamplingParams(max_tokens=1)))[-1].sequence
    assert seq.num_cached == 31
    miss = explain_miss(prompt, seq.num_cached, seq.cache_hit.stop, seq.cache_hit.stopped_by,
                        seq.cache_hit.nearest, [], Digits(), 16)  # fmt: skip
    assert miss.kind is MissKind.NEW_TOKENS and "evicted" not in miss.text
