"""`python -m warmkv ...`: the same as the `warmkv` command."""

from warmkv.cli import main

main()
