"""CLI subcommands. Each module here exposes ``register(subparsers)``; see agent/cli.py."""
