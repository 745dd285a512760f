"""Engine settings: one dataclass, built from CLI flags; defaults live here.

torch is imported only by the methods that need it: building this config (`warmkv --help`, the router)
must stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from warmkv.cache.config import CacheConfig
from warmkv.cache.hit_policy import HitPolicyConfig
from warmkv.errors import WarmkvError

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # folder or .gguf; None is the default model
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16
    block_size: int = 16  # tokens per KV block
    kv_pool_tokens: int | None = None  # pool size in tokens ...
    kv_pool_gib: float | None = None  # ... or in GiB; neither: 2 GiB on CPU, 85% of free memory on CUDA
    max_batch_tokens: int | None = None  # tokens computed per step; default per device, see batch_tokens
    max_num_seqs: int = 32  # sequences decoding together
    max_model_len: int | None = None  # context window; default: the model's
    prefix_cache: bool = True
    cache: CacheConfig = field(default_factory=CacheConfig)  # tiers below the pool
    # replay decode steps of 1..max_num_seqs sequences, and up to 512 new tokens of one sequence, as CUDA
    # graphs (CUDA only)
    cuda_graphs: bool = True
    # greedy decode steps run back to back before the host reads their tokens: the host's work between two
    # steps (sampling's copy, bookkeeping, the next step's inputs) then overlaps the GPU's. None: 4 on
    # CUDA, 1 elsewhere (a CPU has no GPU to overlap)
    decode_steps: int | None = None
    # another cache's reuse rules, emulated for `bench replay` (or `--hit-policy`); None when serving
    hit_emulation: HitPolicyConfig | None = None

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:  # torch's own message lists every backend it knows
            raise WarmkvError(f"--device {self.device}: give auto, cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise WarmkvError(f"--device {self.device}: warmkv runs on cpu or cuda (auto picks one)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise WarmkvError(f"--device {self.device}: CUDA is not available on this machine")
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise WarmkvError(f"--dtype {self.dtype}: choose one of auto, {', '.join(DTYPES)}")
        return getattr(torch, self.dtype)

    def pool_bytes(self, device: torch.device) -> int | None:
        """Pool size in bytes when given in GiB or by default; None when given in tokens."""
        if self.kv_pool_tokens is not None:
            return None
        if self.kv_pool_gib is not None:
            return int(self.kv_pool_gib * 2**30)
        if device.type == "cuda":
            import torch

            return int(torch.cuda.mem_get_info(device)[0] * 0.85)
        return 2 * 2**30

    def lookahead(self, device: torch.device) -> int:
        """Decode steps run back to back (decode_steps, or its default for the device)."""
        if self.decode_steps is not None:
            return self.decode_steps
        return 4 if device.type == "cuda" else 1

    def batch_tokens(self, device: torch.device) -> int:
        """Tokens per step. CPU: 512, a step stays well under a second on a small model. CUDA: 8192, as
        vLLM's default on an H100: large enough that prefill runs near the GPU's full rate (a 7B model's
        matmuls saturate from a few thousand tokens), small enough that a step (and so every running
        stream's next token) waits for at most about half a second of prefill."""
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        return 8192 if device.type == "cuda" else 512
