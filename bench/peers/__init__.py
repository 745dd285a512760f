"""Real peer servers for the benchmarks, built once per machine: see __main__.py."""
