"""Where warmkv keeps converted models and (later) the disk KV tier."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_home() -> Path:
    """The user cache directory; WARMKV_CACHE_DIR moves it (tests, shared machines)."""
    return Path(os.environ.get("WARMKV_CACHE_DIR") or platformdirs.user_cache_dir("warmkv"))
