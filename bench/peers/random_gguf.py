"""A GGUF of random weights in a real model's shape, with SmolLM2's tokenizer: the one file that
llama-server and warmkv (`--model FILE.gguf`) both serve in a peer comparison on a machine where no real
GGUF of that size can travel (the GPU machines). The values do not matter for speed; both read the same file.

    python -m bench.peers.random_gguf qwen2.5-7b OUT.gguf [--tokenizer-from FILE.gguf]

The shape is one of warmkv.models.random_init.SHAPES (dense Llama or Qwen2 ones), except the vocabulary:
llama.cpp sizes the embedding by the tokenizer's token list, so the embedding has SmolLM2's 49,152 rows.
Float16 matrices, written tensor by tensor (a 7B file never sits whole in memory); random values come from
the GPU where there is one. `--tokenizer-from` defaults to the default model's GGUF; `python -m bench.peers
--pack` writes a tokenizer-only GGUF for machines where that file is absent.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from warmkv.errors import WarmkvError
from warmkv.models.loader import default_gguf_path
from warmkv.models.random_init import SHAPES

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2"}  # Hugging Face model_type -> GGUF architecture


def copy_tokenizer(writer: Any, source: Path) -> int:
    """Every `tokenizer.*` field of `source` (tokens, merges, types, special ids, chat template) into
    `writer`; the number of tokens."""
    import gguf

    reader = gguf.GGUFReader(source)
    fields = {name: f for name, f in reader.fields.items() if name.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise WarmkvError(f"{source} holds no tokenizer (tokenizer.ggml.tokens)")
    for name, field in fields.items():
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    return len(fields["tokenizer.ggml.tokens"].contents())


def write_tokenizer_gguf(out: Path, source: Path) -> Path:
    """A GGUF of `source`'s tokenizer alone (a few MB, no tensors): what --tokenizer-from needs, small
    enough to carry where the default model's file is not."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    copy_tokenizer(writer, source)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return out


def tensor_shapes(config: dict[str, Any], vocab: int) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (rows, columns), as llama.cpp's converter lays out a dense model."""
    hidden, ff = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    Shape = tuple[int, ...]
    shapes: dict[str, Shape] = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings"):
        shapes["output.weight"] = (vocab, hidden)
    bias = config["model_type"] == "qwen2"  # Qwen2 has q/k/v biases
    for i in range(config["num_hidden_layers"]):
        layer: dict[str, Shape] = {
            "attn_norm.weight": (hidden,), "attn_q.weight": (q, hidden), "attn_k.weight": (kv, hidden),
            "attn_v.weight": (kv, hidden), "attn_output.weight": (hidden, q), "ffn_norm.weight": (hidden,),
            "ffn_gate.weight": (ff, hidden), "ffn_up.weight": (ff, hidden), "ffn_down.weight": (hidden, ff),
        }  # fmt: skip
        if bias:
            layer |= {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
        shapes |= {f"blk.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


def write_random_gguf(config: dict[str, Any], out: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    import gguf

    arch = GGUF_ARCH.get(config["model_type"])
    if arch is None or "num_experts" in config or "num_local_experts" in config:
        raise WarmkvError(f"random GGUFs are written for dense {', '.join(GGUF_ARCH)} shapes, "
                          f"not {config['model_type']}")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(f"random {config['model_type']} {config['num_hidden_layers']} layers")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    vocab = copy_tokenizer(writer, tokenizer_from)
    shapes = tensor_shapes(config, vocab)
    for name, shape in shapes.items():
        dtype = _dtype(shape)
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(seed)
    for name, shape in shapes.items():
        writer.write_tensor_data(_values(name, shape, generator, device))
    writer.close()
    return out


def _dtype(shape: tuple[int, ...]) -> np.dtype:
    # as llama.cpp's converter writes them: matrices in float16, norms and biases in float32 (its CPU
    # kernels add and multiply only float32 vectors)
    return np.dtype(np.float16 if len(shape) > 1 else np.float32)


def _values(name: str, shape: tuple[int, ...], generator: torch.Generator,
            device: torch.device) -> np.ndarray:  # fmt: skip
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=_dtype(shape))  # a random norm scale would blow activations up
    # 0.02: the initialiser's scale, so activations stay finite through every layer
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * 0.02
    return values.cpu().numpy().astype(_dtype(shape))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.random_gguf",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    dense = [name for name, c in SHAPES.items() if c["model_type"] in GGUF_ARCH and "num_experts" not in c]
    parser.add_argument("shape", choices=dense)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer-from", type=Path, help="GGUF whose tokenizer to copy (default: the "
                        "default model's; `python -m bench.peers --pack` writes a tokenizer-only one)")
    args = parser.parse_args()
    path = write_random_gguf(SHAPES[args.shape], args.out, args.tokenizer_from or default_gguf_path())
    print(f"wrote {path} ({path.stat().st_size / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
