"""Benchmarks a user runs against warmkv (or any OpenAI-compatible server): `warmkv bench ...`."""
