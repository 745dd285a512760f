"""Miss classification on its own: the nearest earlier prompt decides the reason."""

from __future__ import annotations

from warmkv.cache.miss_reasons import MissKind, MissReason, RecentPrompts, explain_miss
from warmkv.chat.anchors import MessageSpan


class Digits:
    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


SPANS = [MessageSpan(0, "system", 40), MessageSpan(1, "user", 70)]


def reason(prompt: list[int], cached: int, stopped_by: str | None, recent: RecentPrompts) -> MissReason:
    return explain_miss(
        prompt, cached, stopped_by, recent.nearest("", prompt), SPANS, Digits(), block_size=16
    )


def test_nearest_prompt_is_the_longest_shared_prefix() -> None:
    recent = RecentPrompts()
    recent.remember("", list(range(50)))
    recent.remember("", [*range(30), 999])
    recent.remember("other tenant", list(range(70)))
    assert recent.nearest("", list(range(60)))[1] == 50


def test_each_kind_of_miss() -> None:
    recent = RecentPrompts()
    prompt = list(range(70))
    assert reason(prompt, 0, None, recent).kind is MissKind.NEW_TOKENS
    recent.remember("", list(range(70)))
    assert reason(prompt, 0, None, recent).kind is MissKind.EVICTED
    slow = reason(prompt, 16, "load from disk slower than recompute", recent)
    assert slow.kind is MissKind.SLOWER_THAN_RECOMPUTE and "tokens 16-64" in slow.text
    assert reason(prompt, 64, None, recent).kind is MissKind.BELOW_MINIMUM
    changed = reason([*range(50), 7, 7, 7, *range(53, 70)], 48, None, recent)
    assert (changed.kind, changed.message_index, changed.role) == (MissKind.CHANGED, 1, "user")
    assert "changed at token 50" in changed.text and "7 7 7" in changed.request_excerpt
