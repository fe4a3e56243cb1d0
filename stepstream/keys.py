"""``stepstream keys create OWNER`` / ``stepstream keys revoke KEY``: API keys kept in Redis.

Only the key's SHA-256 is stored; the key itself is printed once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from tasks.apikeys import ApiKeys
from tasks.connection import connect
from tasks.keys import Keys
from tasks.settings import get_settings


async def _run(args: argparse.Namespace) -> int:
    settings = get_settings()
    redis = connect(settings.redis_url, attempts=3)
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


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="create or revoke API keys (stored hashed in Redis)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key for OWNER and print it")
    create.add_argument("owner")
    revoke = actions.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key")


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepstream")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["keys", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
