"""warmkv: an LLM inference server whose prefix KV cache keeps agent sessions warm."""

__version__ = "0.1.0"
