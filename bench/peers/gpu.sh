#!/usr/bin/env bash
# llama-server (CUDA, sm_90) beside warmkv on one GPU machine with no network: both serve one GGUF of random
# weights in Qwen2.5-7B's shape (SmolLM2's tokenizer), the same synthetic agent sessions through the same
# client, concurrently (`bench load --peer llama.cpp`) and turn by turn with restarts (`bench replay`).
#
# Here, once (needs the registry):  python -m bench.peers --pack .peers-kit     # 12 MB; git-ignored:
#                                   echo /.peers-kit/ >> .git/info/exclude
# There, with .peers-kit carried and warmkv's dependencies importable by python3 (the wheels):
#   bash bench/peers/gpu.sh build    # llama-server from the carried source (-j nproc)
#   bash bench/peers/gpu.sh model    # + the random GGUF (~14 GB) and warmkv's conversion of it
#   bash bench/peers/gpu.sh load     # + bench load --peer llama.cpp
#   bash bench/peers/gpu.sh replay   # + bench replay --peer llama.cpp (restarts: slot save/restore)
#   bash bench/peers/gpu.sh all      # build, model, load and replay
# Each step first does the ones before it, skipping what is already there (the build resumes where it
# stopped; the GGUF and its conversion are kept), so a step cut off by a time limit is run again on the
# same machine. Results: JSON and PNG in $RESULTS (default $OUT, else bench/results). Sizes: SHAPE,
# CONTEXT_LOAD, COPIES, CONTEXT_REPLAY below, overridable.
set -euo pipefail
cd "$(dirname "$0")/../.."

KIT=${KIT:-.peers-kit}
SHAPE=${SHAPE:-qwen2.5-7b}
CONTEXT_LOAD=${CONTEXT_LOAD:-8000}   # tokens per synthetic session
COPIES=${COPIES:-4}                  # the 18 sessions of the five shapes, 4 times over: 72 at once
CONTEXT_REPLAY=${CONTEXT_REPLAY:-16000}  # within llama-server's per-slot context (the model's 32k)
RESULTS=${RESULTS:-${OUT:-bench/results}}
export PYTHONUNBUFFERED=1
PEERS_HOME=$(python3 -c "from warmkv.bench.peers import peers_home; print(peers_home())")
MODEL=$PEERS_HOME/random-$SHAPE.gguf
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')

build() {
    # CMake finds CUDA through nvcc; the image has it, not always on PATH
    export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
    python3 -m bench.peers llama.cpp --cuda --source "$KIT/llama.cpp-0.3.36-src.tar.gz" --jobs "$(nproc)"
}

model() {
    if [ ! -f "$MODEL" ]; then  # written aside and renamed: a write cut short is never taken for the model
        python3 -m bench.peers.random_gguf "$SHAPE" "$MODEL.partial.gguf" \
            --tokenizer-from "$KIT/tokenizer-smollm2.gguf"
        mv "$MODEL.partial.gguf" "$MODEL"
    fi
    # warmkv converts a GGUF once into a Hugging Face folder under its cache: here, not in a timed run
    python3 -c "from warmkv.models.loader import resolve_model_folder; print(resolve_model_folder('$MODEL'))"
}

load() {
    python3 -m warmkv bench load --synthetic all --context "$CONTEXT_LOAD" --copies "$COPIES" \
        --model "$MODEL" --device cuda --dtype bfloat16 --policies warmkv --peer llama.cpp --tool-time 1 \
        --reply-tokens 64 --out "$RESULTS" --name "load-$GPU-random-$SHAPE-llama.cpp"
}

replay() {
    python3 -m warmkv bench replay --synthetic all --context "$CONTEXT_REPLAY" --model "$MODEL" \
        --device cuda --dtype bfloat16 --policies warmkv --peer llama.cpp \
        --out "$RESULTS" --name "replay-$GPU-random-$SHAPE-$CONTEXT_REPLAY-llama.cpp"
}

case "${1:-all}" in
    build) build ;;
    model) build && model ;;
    load) build && model && load ;;
    replay) build && model && replay ;;
    all) build && model && load && replay ;;
    *) echo "usage: bash bench/peers/gpu.sh [build|model|load|replay|all]" >&2; exit 2 ;;
esac
