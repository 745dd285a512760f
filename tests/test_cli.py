"""The command line as a user meets it: fast help, flags the README names, clear refusals, python -m."""

from __future__ import annotations

import argparse
import ast
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from warmkv.cache.config import CacheConfig
from warmkv.cli import build_parser, main
from warmkv.config_flags import engine_config_from
from warmkv.engine.config import EngineConfig
from warmkv.errors import WarmkvError
from warmkv.models.generation_config import generation_defaults

from .conftest import REPO_ROOT

PYTHON_ON_THIS_TREE = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found |= {o for o in action.option_strings if o.startswith("--")}
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def _bench_script_flags() -> set[str]:
    """Flags of the scripts under bench/ (`python -m bench.engine ...`, `python -m bench.peers ...`), read
    from their source."""
    found = set()
    for script in [*(REPO_ROOT / "bench").glob("*.py"), *(REPO_ROOT / "bench").glob("*/__main__.py")]:
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                names = [a.value for a in node.args if isinstance(a, ast.Constant)]
                found |= {n for n in names if str(n).startswith("--")}
    return found


def _peer_server_flags() -> set[str]:
    """Flags warmkv passes to the peers it benchmarks (llama-server, vLLM), which the README quotes."""
    source = (REPO_ROOT / "warmkv" / "bench" / "peers.py").read_text()
    return set(re.findall(r'"(--[a-z][a-z0-9-]*)"', source))


def test_every_flag_the_readme_names_exists() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", readme))
    pip_flags = {"--no-deps"}  # the README's set-up commands
    known = _option_strings(build_parser()) | _bench_script_flags() | _peer_server_flags() | pip_flags
    unknown = named - known
    assert not unknown, f"README names flags no parser has: {sorted(unknown)}"


def test_readme_names_the_load_policy_flag_that_exists() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert "--load-policy" not in readme and "--kv-load auto" in readme
    assert build_parser().parse_args(["serve", "--kv-load", "always"]).kv_load == "always"


def test_decode_steps_flag() -> None:
    """Unset, the engine picks by device (4 on CUDA, 1 on CPU); a count is taken; 0 is refused by name."""
    parse = build_parser().parse_args
    assert engine_config_from(parse(["serve"])).decode_steps is None
    assert engine_config_from(parse(["serve", "--decode-steps", "1"])).decode_steps == 1
    with pytest.raises(WarmkvError, match="--decode-steps must be a positive number, got 0"):
        engine_config_from(parse(["serve", "--decode-steps", "0"]))


def test_disk_write_policy_flag() -> None:
    assert engine_config_from(build_parser().parse_args(["serve"])).cache.disk_write.value == "back"
    args = build_parser().parse_args(["serve", "--kv-disk-write", "through"])
    assert engine_config_from(args).cache.disk_write.value == "through"
    with pytest.raises(SystemExit):  # argparse names the flag and its choices
        build_parser().parse_args(["serve", "--kv-disk-write", "sometimes"])


def test_serve_with_block_size_128_is_accepted() -> None:
    config = engine_config_from(build_parser().parse_args(["serve", "--block-size", "128"]))
    assert config.block_size == 128
    # unset benchmark-only sizes follow the block size instead of refusing it
    args = build_parser().parse_args(["serve", "--block-size", "128", "--hit-policy", "checkpoints"])
    emulation = engine_config_from(args).hit_emulation
    assert emulation is not None and emulation.checkpoint_align % 128 == 0


def test_units_policy_with_large_blocks_rounds_its_default_unit_up() -> None:
    args = build_parser().parse_args(["serve", "--block-size", "128", "--hit-policy", "units"])
    emulation = engine_config_from(args).hit_emulation
    assert emulation is not None and emulation.unit == 128


def test_benchmark_size_without_its_policy_is_refused_not_ignored() -> None:
    args = build_parser().parse_args(["serve", "--cache-unit", "64"])
    with pytest.raises(WarmkvError, match="--cache-unit applies only to --hit-policy units"):
        engine_config_from(args)


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "(default: 8000)" in text and "(default: 16)" in text and "(default: auto)" in text
    assert " ".join(text.split()).count("search bits (default: 600)") == 1  # octal, as the flag takes it
    assert build_parser().parse_args(["serve"]).kv_dir_mode == 0o600 == CacheConfig().kv_file_mode


@pytest.mark.parametrize(
    "argv", [["--help"], ["serve", "--help"], ["router", "--help"], ["report", "--help"], ["cache", "stats"]]
)
def test_thin_commands_do_not_import_torch(argv: list[str], tmp_path: Path) -> None:
    code = (
        "import sys\nfrom warmkv.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    env = PYTHON_ON_THIS_TREE | {"WARMKV_KV_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_python_dash_m_warmkv_is_the_warmkv_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "warmkv", "--help"], env=PYTHON_ON_THIS_TREE, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: warmkv") and "generate" in result.stdout


def test_serve_on_a_busy_port_fails_before_loading_anything() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = (
            "import sys\nfrom warmkv.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as exit:\n    print(exit.code)\n"
            "assert 'torch' not in sys.modules, 'loaded torch before checking the port'\n"
        )
        result = subprocess.run([sys.executable, "-c", code, "serve", "--port", str(port)],
                                env=PYTHON_ON_THIS_TREE, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"--port {port}" in result.stdout and "already in use" in result.stdout


def test_model_generation_config_sets_sampling_defaults(tmp_path: Path) -> None:
    assert generation_defaults(tmp_path).temperature == 0  # no file: greedy
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1})
    )
    defaults = generation_defaults(tmp_path)
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.6, 0.9, 50)  # top_k: transformers'
    assert defaults.repetition_penalty == 1.1
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert generation_defaults(tmp_path).temperature == 0


def test_generate_uses_model_defaults_and_prints_one_stats_line(
    tiny_llama_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"do_sample": True, "temperature": 0.5, "top_k": 7, "repetition_penalty": 1.2}
    model = tmp_path / "with-defaults"
    model.mkdir()
    for file in tiny_llama_folder.iterdir():
        if file.name != "generation_config.json":  # written below; a link would write through to the model
            (model / file.name).symlink_to(file)
    (model / "generation_config.json").write_text(json.dumps(config))
    common = ["generate", "--model", str(model), "--device", "cpu", "--no-disk-cache", "--kv-pool-tokens",
              "1024", "--max-tokens", "5", "--seed", "1", "Hello"]  # fmt: skip
    main(common)
    err = capsys.readouterr().err
    unset_from_file = "(unset flags from generation_config.json)"
    assert f"temperature 0.5, top_p 1, top_k 7, repetition_penalty 1.2 {unset_from_file}" in err
    stats = [line for line in err.splitlines() if "completion tokens" in line]
    assert len(stats) == 1
    assert re.search(r"\d+ prompt tokens, [1-5] completion tokens, TTFT \d+\.\d\d s, [\d.]+ tok/s", stats[0])
    main([*common, "--temperature", "0", "--repetition-penalty", "1"])
    # a flag beats the model's default
    assert "temperature 0, top_p 1, top_k 7, repetition_penalty 1 (" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "command"),
    [(["serve", "--bogus"], "serve"), (["bench", "load", "--bogus"], "bench load"),
     (["cache", "stats", "--bogus"], "cache")],
)  # fmt: skip
def test_a_stray_flag_is_named_with_its_command_usage(
    argv: list[str], command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """(argparse named it under the top-level usage, which lists no flags of the command.)"""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: warmkv {command} ")
    assert f"warmkv {command}: error: unrecognized arguments: --bogus" in err


@pytest.mark.parametrize("device", ["tpu", "cuda:abc", "mps"])
def test_a_device_warmkv_cannot_run_on_is_one_line_naming_the_flag(device: str) -> None:
    """It was torch's traceback (an unknown device string) or a failure later on (a device torch knows)."""
    with pytest.raises(WarmkvError, match=f"^--device {device}: "):
        EngineConfig(device=device).torch_device()


def test_a_trace_file_that_cannot_be_written_is_one_line_before_the_model_loads(tmp_path: Path) -> None:
    from warmkv.config_flags import serve_configs

    with pytest.raises(WarmkvError, match=r"^--trace .*/missing/trace.jsonl: No such file or directory"):
        serve_configs(["--trace", str(tmp_path / "missing" / "trace.jsonl")])


def test_router_flags_are_checked_as_serve_checks_them() -> None:
    """A port out of range, or in use, and a log level it does not know: one line naming the flag (a
    traceback, or uvicorn's own words without the flag, before)."""
    replica = ["router", "--replica", "http://127.0.0.1:1"]
    with pytest.raises(SystemExit) as exited:
        main([*replica, "--port", "99999"])
    assert exited.value.code == "warmkv: error: --port must be between 0 and 65535, got 99999"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as exited:
            main([*replica, "--port", str(taken.getsockname()[1])])
    assert "is already in use" in str(exited.value.code) and "--port" in str(exited.value.code)
    with pytest.raises(SystemExit):  # argparse names the flag and its choices
        main([*replica, "--log-level", "chatty"])
