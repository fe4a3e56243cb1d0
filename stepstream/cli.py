"""The ``stepstream`` command."""

from __future__ import annotations

import argparse
from pathlib import Path

from stepstream.up import run_up


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepstream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "up", help="start an embedded Valkey (unless REDIS_URL is set), the web server and a worker"
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--data-dir", type=Path, default=Path(".data"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        return run_up(args.host, args.port, args.workers, args.data_dir)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
