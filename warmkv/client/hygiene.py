"""Prefix hygiene: text that changes every request near the start of the prompt defeats any prefix cache."""

from __future__ import annotations

import re
from collections.abc import Sequence

from warmkv.client.prefix import tool_name

# Where a volatile value sits early in the system prompt, everything after it is recomputed every time.
VOLATILE_PATTERNS: dict[str, re.Pattern[str]] = {
    "date/time": re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?)?|\b\d{1,2}:\d{2}:\d{2}\b"),
    "written date": re.compile(
        r"\b(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day\b|\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
        r"[a-z]* \d{1,2}(?:st|nd|rd|th)?,? \d{4}\b"
    ),
    "UUID": re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.IGNORECASE),
    "Unix timestamp": re.compile(r"\b1[5-9]\d{8}(?:\d{3})?\b"),
}


def volatile_text_warnings(system: str, within_chars: int = 2000) -> list[str]:
    """Warnings for values that look per-request (dates, times, ids) in the first `within_chars`."""
    head = system[:within_chars]
    warnings = []
    for kind, pattern in VOLATILE_PATTERNS.items():
        for match in pattern.finditer(head):
            warnings.append(
                f"system prompt has a {kind} at char {match.start()} ({match.group()!r}): if it changes per "
                f"request, the {len(system) - match.start()} characters after it are never cached; "
                "move it to the end of the prompt or the last user message"
            )
    return warnings


def tool_order_warning(tools: Sequence[dict] | None) -> str | None:
    names = [tool_name(t) for t in tools or []]
    if names != sorted(names):
        return f"tools are not in canonical (name) order: {names}; pass them sorted to keep the prefix stable"
    return None
