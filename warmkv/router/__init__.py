"""`warmkv router`: an OpenAI-compatible front that keeps each session on the replica that caches it."""
