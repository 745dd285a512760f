"""`warmkv bench replay` end to end on the default model: policies side by side against the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from warmkv.cli import main


@pytest.mark.slow
def test_replay_compares_policies_with_the_oracle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policies = "no_cache,gpu_lru,warmkv"
    main(["bench", "replay", "--synthetic", "restart,single_turns", "--context", "300", "--policies",
          policies,
          "--out", str(tmp_path), "--name", "replay-test"])  # fmt: skip
    table = capsys.readouterr().out
    result = json.loads((tmp_path / "replay-test.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["no_cache", "gpu_lru", "warmkv", "oracle"]
    assert rows["no_cache"]["cached_tokens"] == 0
    assert rows["warmkv"]["efficiency"] > 0.9
    assert rows["warmkv"]["cached_tokens"] <= rows["oracle"]["cached_tokens"]
    # after the restart the GPU-only cache starts cold; warmkv reads the session back from disk
    restarted = 4  # the "restart" shape restarts the server before its fifth request
    warm, cold = rows["warmkv"]["turns"], rows["gpu_lru"]["turns"]
    assert cold[restarted]["cached_tokens"] == 0
    assert warm[restarted]["cached_tokens"] >= warm[restarted - 1]["prompt_tokens"] - 16
    assert result["capacities"]["pool_tokens"] < rows["oracle"]["computed_tokens"]  # GPU tier < working set
    for row in ("no_cache", "gpu_lru", "warmkv", "oracle"):
        assert row in table
    assert (tmp_path / "replay-test-ttft.png").stat().st_size > 10_000
    assert (tmp_path / "replay-test-computed.png").stat().st_size > 10_000


def test_replay_without_matplotlib_stops_at_once_and_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from warmkv.bench import run_replay

    monkeypatch.setattr(run_replay, "plots_available", lambda: False)
    with pytest.raises(SystemExit, match=r"pip install 'warmkv\[bench\]', or pass --no-plots"):
        main(["bench", "replay", "--synthetic", "restart", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing replayed, nothing written
