"""``stepstream keys create OWNER`` / ``stepstream keys revoke KEY``: API keys kept in Redis.

Only the key's SHA-256 is stored; the key itself is printed once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from stepstream.tasks.connection import connect
from stepstream.tasks.credentials import ApiKeys
from stepstream.tasks.keyspace import Keys
from stepstream.tasks.settings import get_settings


async def _run(args: argparse.Namespace) -> int:
    settings = get_settings()
    redis = connect(settings, attempts=3)
    try:
        keys = ApiKeys(redis, Keys(settings.prefix), {})
        if args.action == "create":
            key = await keys.create(args.owner)
            print(f"API key for {args.owner} (shown once; keep it secret):", file=sys.stderr)
            print(key)
            return 0
        if await keys.revoke(args.key):
            print("revoked", file=sys.stderr)
            return 0
        print("no such key", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def main(argv: list[str] | None = None) -> int:
    from stepstream.cli import main as cli_main

    return cli_main(["keys", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
