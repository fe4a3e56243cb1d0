"""What the sync and the async client share (stepstream/_base.py)."""

from __future__ import annotations

import asyncio
import time

from stepstream import AsyncClient, Client

NOWHERE = "http://127.0.0.1:9"  # never contacted: building a client sends nothing


def test_a_client_per_request_costs_no_tls_setup_after_the_first() -> None:
    """A backend may build a client for each request it serves. httpx's default loads the CA
    bundle into a new TLS context per client, about 40 ms of CPU: 20 clients, 0.8 CPU-s."""
    Client(NOWHERE).close()  # the first builds the context the rest share

    async def async_clients() -> None:
        for _ in range(10):
            await AsyncClient(NOWHERE).aclose()

    started = time.process_time()
    for _ in range(10):
        Client(NOWHERE).close()
    asyncio.run(async_clients())
    spent = time.process_time() - started
    # Shared, about 30 ms in all (the asyncio loop included). The bound, 10 ms a client, is a
    # quarter of building one context.
    assert spent < 0.2, f"20 clients took {spent:.2f} CPU-s: is the TLS context still shared?"
