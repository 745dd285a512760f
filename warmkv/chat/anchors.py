"""Where each message of a rendered conversation ends, and tokenisation that keeps those ends stable.

Works for any chat template. A message ends where the conversation rendered up to it stops, when that
text is a prefix of the full prompt (a template that rewrites earlier turns simply yields no boundary
there). Rendering every prefix costs O(messages^2), so the ends come from two renders instead: the
conversation as the prompt is rendered, and with each message's text wrapped in marker characters, which
locate every message's text in the first. Between two located texts lies template markup (the end of one
message, the start of the next); where ends fall inside such a stretch is learned once per distinct
stretch, by rendering the prefixes that end in it, and reused for every stretch like it. Should the markers
change the rendering in any way, every prefix is rendered, as the definition says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from warmkv.chat.template import encode_batch, render_chat
from warmkv.errors import InvalidRequest

# private-use characters: no template writes them, and a message holding OPEN or CLOSE is left unmarked. A
# message's text is wrapped as OPEN, its number (one character of a private-use plane), text, CLOSE
_OPEN, _CLOSE, _NUMBER_BASE = "\ue000", "\ue001", 0xF0000


@dataclass(slots=True, frozen=True)
class MessageSpan:
    index: int
    role: str
    end: int  # token offset just past the message
    text_end: int  # character offset just past it in the prompt's text


def message_ends(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template: str,
    text: str,
    add_generation_prompt: bool = True,
    continue_final: bool = False,
) -> list[tuple[int, str, int]]:
    """(message index, role, character offset just past it) for each message that ends inside `text`, the
    conversation as rendered with or without the generation prompt, or continuing its last message."""
    render = _Prefixes(tokenizer, messages, tools, template, text, add_generation_prompt, continue_final)
    ends = _ends_from_marked_render(render)
    if ends is not None:
        return ends
    return [(i, m["role"], end) for i, m in enumerate(messages) if (end := render.end_of(i)) is not None]


class _Prefixes:
    """Renders of a conversation: marked, as the prompt was rendered, or up to a message, as the
    definition renders it (without the generation prompt)."""

    def __init__(self, tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 template: str, text: str, add_generation_prompt: bool,
                 continue_final: bool) -> None:  # fmt: skip
        self.messages, self.text = messages, text
        self._render = lambda some, opened=False, continued=False: render_chat(
            tokenizer, some, tools, opened, template, continued
        )
        self._opened, self._continued = add_generation_prompt, continue_final

    def marked(self, messages: list[dict[str, Any]]) -> str:
        return self._render(messages, self._opened, self._continued)

    def end_of(self, index: int) -> int | None:
        """Where message `index` ends, if rendering up to it gives a prefix of the prompt: the definition.
        A template may refuse the shorter conversation (Llama 3 puts tools in the first user message and
        refuses a system message alone): then it ends nowhere, as any prefix that is not the prompt's."""
        try:
            prefix = self._render(self.messages[: index + 1])
        except InvalidRequest:
            return None
        return len(prefix) if self.text.startswith(prefix) else None


_Owner = tuple[str, bool, tuple[str, ...]]  # a message whose end may fall in a stretch: role, marked, fields


def _ends_from_marked_render(render: _Prefixes) -> list[tuple[int, str, int]] | None:
    messages, full = render.messages, render.text  # every end learned below is checked against the prompt
    if len(messages) > 0xFFFFD - _NUMBER_BASE:
        return None
    probe = [{**m, "content": f"{_OPEN}{chr(_NUMBER_BASE + i)}{m['content']}{_CLOSE}"} if _markable(m) else m
             for i, m in enumerate(messages)]  # fmt: skip
    with_marks = render.marked(probe)
    # the texts the template wrote, in order (a template may leave some out, as it may rewrite old turns)
    located = _text_spans(with_marks)
    if located is None:
        return None  # the template treats marked text differently: no shortcut
    marked, starts, stops, unmarked = located
    if unmarked != full or not marked or marked != sorted(set(marked)):
        return None
    if not len(starts) == len(stops) == len(marked) or any(a > b for a, b in zip(starts, stops, strict=True)):
        return None
    # stretch k runs from the end of located text k-1 (or the start) to the start of text k (or the end)
    bounds = [0, *stops], [*starts, len(full)]
    owners = [range(0, marked[0])] + [
        range(marked[k], marked[k + 1] if k + 1 < len(marked) else len(messages)) for k in range(len(marked))
    ]
    learned: dict[tuple[str, str, tuple[_Owner, ...], bool], list[tuple[int, int]]] = {}
    ends = []
    before = ""  # the stretch before the text that opens this one: how the template opened that message
    for low, high, indices in zip(*bounds, owners, strict=True):
        if low > high:
            return None
        # an unmarked message's text is not in the stretch: whether it is empty decides where ends fall; and
        # its other fields, which a template may write in one render and not in another (Qwen3 keeps the
        # reasoning of turns after the last user message: in a prefix, of more turns than in the whole)
        owned = tuple(
            (messages[i]["role"], _markable(messages[i]), _other_fields(messages[i])) for i in indices
        )
        # and how the message before the stretch was opened: a template may write a message one way in the
        # whole conversation and another way when it is the last (Qwen3's reasoning, kept only after the last
        # user message), and then it ends there in one place and not in another of the same markup
        key = (before, full[low:high], owned, high == len(full))
        if key not in learned:  # (position among `indices`, offset within the stretch) of each end in it
            found = [(j, render.end_of(i)) for j, i in enumerate(indices)]
            learned[key] = [(j, end - low) for j, end in found if end is not None and low <= end <= high]
        ends += [(indices[j], messages[indices[j]]["role"], low + offset) for j, offset in learned[key]]
        before = full[low:high]
    return ends


def _other_fields(message: dict[str, Any]) -> tuple[str, ...]:
    """The fields besides role and content a message fills."""
    return tuple(
        sorted(k for k, v in message.items() if k not in ("role", "content") and v not in (None, ""))
    )


def _markable(message: dict[str, Any]) -> bool:
    content = message.get("content")
    if not isinstance(content, str) or not content:
        return False
    # only these two are read as markers: a number character is only read right after an opening one
    return _OPEN not in content and _CLOSE not in content


def _text_spans(with_marks: str) -> tuple[list[int], list[int], list[int], str] | None:
    """Which message texts the marked render holds, the offsets in the unmarked render where each starts
    and stops, and the unmarked render; None if a marker is not where the marking put one."""
    numbers, starts, stops, pieces = [], [], [], []
    at, removed = 0, 0  # next character to read; marker characters removed so far
    next_open, next_close = with_marks.find(_OPEN), with_marks.find(_CLOSE)
    while next_open >= 0 or next_close >= 0:
        mark = next_close if next_open < 0 or 0 <= next_close < next_open else next_open
        pieces.append(with_marks[at:mark])
        if mark == next_close:
            stops.append(mark - removed)
            at, removed = mark + 1, removed + 1
            next_close = with_marks.find(_CLOSE, at)
            continue
        number = ord(with_marks[mark + 1]) - _NUMBER_BASE if mark + 1 < len(with_marks) else -1
        if not 0 <= number <= 0xFFFFD - _NUMBER_BASE:
            return None
        numbers.append(number)
        starts.append(mark - removed)
        at, removed = mark + 2, removed + 2
        next_open = with_marks.find(_OPEN, at)
    pieces.append(with_marks[at:])
    return numbers, starts, stops, "".join(pieces)


def encode_segments(
    tokenizer: Any, text: str, ends: list[tuple[int, str, int]], head: tuple[str, list[int]] | None = None
) -> tuple[list[int], list[MessageSpan]]:
    """Token ids of `text`, tokenised one message at a time, so a message boundary is always a token boundary
    and an earlier prompt stays a token prefix of a later one. `head` (text, ids) supplies the ids of a
    leading part of `text` verbatim (a turn the cache already holds); only the rest is tokenised."""
    ids, done = (list(head[1]), len(head[0])) if head else ([], 0)
    first = done
    pieces = []  # (end, index, role) of each message end past the head, and of the text's end, in order
    for index, role, end in [*ends, (-1, "", len(text))]:
        if end >= done:
            pieces.append((end, index, role))
            done = end
    starts = [first] + [end for end, _, _ in pieces[:-1]]
    texts = [text[start:end] for start, (end, _, _) in zip(starts, pieces, strict=True)]
    spans = []
    # one call for every segment: the tokenizer's fixed cost per call is most of a short segment's
    for (end, index, role), segment_ids in zip(pieces, encode_batch(tokenizer, texts), strict=True):
        ids += segment_ids
        if index >= 0:
            spans.append(MessageSpan(index, role, len(ids), end))
    return ids, spans
