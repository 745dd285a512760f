"""The router's placement without servers: which replica a request goes to, by its anchors and the load."""

from __future__ import annotations

from warmkv.router.affinity import Router, anchor_chain

SYSTEM = {"role": "system", "content": "You are a helpful agent."}


def chat(*users: str) -> list[str]:
    messages = [SYSTEM, *({"role": "user", "content": user} for user in users)]
    return anchor_chain({"model": "m", "messages": messages})


def test_idle_replicas_gather_sessions_sharing_a_system_prompt() -> None:
    router = Router(["http://a", "http://b", "http://c"])
    homes = {router.candidates(chat(f"task {n}"))[0][0].url for n in range(20)}
    assert len(homes) == 1  # the shared system prompt's KV is computed once


def test_new_sessions_go_to_the_least_loaded_replica() -> None:
    router = Router(["http://a", "http://b"])
    first, _ = router.candidates(chat("task 0"))
    first[0].in_flight += 1
    second, depth = router.candidates(chat("task 1"))
    assert second[0] is not first[0] and depth == 0


def test_a_session_stays_with_its_kv_until_its_replica_is_busier_than_the_slack() -> None:
    router = Router(["http://a", "http://b"], slack=2)
    history = chat("task 0", "step 1")
    home = router.candidates(history)[0][0]
    router.served(history, home)
    other = next(r for r in router.replicas if r is not home)
    grown = chat("task 0", "step 1", "step 2")
    home.in_flight = 2  # within the slack of the idle replica: still home, two anchors deep
    assert router.candidates(grown) == ([home, other], 3)
    home.in_flight = 3  # past it: the load goes elsewhere, and the history is not claimed
    assert router.candidates(grown) == ([other, home], 0)
    router.failed(other)  # a replica that is down is not tried while another is up
    assert router.candidates(grown)[0] == [home]
