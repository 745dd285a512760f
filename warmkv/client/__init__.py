"""Client toolkit: cache tracking, warm-ups and miss reports for any OpenAI-compatible API."""

from warmkv.client.ledger import Prices, TurnRecord
from warmkv.client.prefix import canonical_tools
from warmkv.client.tracker import WarmupMode, WarmupPolicy
from warmkv.client.usage import CacheUsage, read_usage
from warmkv.client.wrapper import AsyncWarmClient, WarmClient

__all__ = ["AsyncWarmClient", "CacheUsage", "Prices", "TurnRecord", "WarmClient", "WarmupMode",
           "WarmupPolicy", "canonical_tools", "read_usage"]  # fmt: skip
