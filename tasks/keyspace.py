"""Every Redis key and channel name Stepstream uses, in one place.

On one server (or a Sentinel-managed one) the log plane is one partition and the names are
plain: per-job keys share the hash tag ``{id}``, the global ones (the firehose, the job index,
the counters, ...) have none. On a cluster (``STEPSTREAM_CLUSTER_URL``) the log plane is split
into ``STEPSTREAM_CLUSTER_PARTITIONS`` partitions (docs/scaling.md, "The key layout on a
cluster"): every name of a partition starts ``<prefix>{<tag>}:``, the job's own keys included
(only the first ``{...}`` of a name is hashed), so that every key one append touches shares a
hash slot. A job's partition comes from its id alone (:meth:`Keys.partition_of`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from stepstream.tasks.models import new_job_id
from stepstream.tasks.settings import Settings


@cache
def partition_tags(partitions: int) -> tuple[str, ...]:
    """The hash tag of each of ``partitions`` partitions: partition ``i``'s tag hashes into the
    ``i``-th of ``partitions`` equal ranges of the 16384 slots. A cluster's primaries hold
    contiguous ranges of slots (as ``valkey-cli --cluster create`` and the managed services
    assign them), so the partitions spread over them evenly when their number divides
    ``partitions``. Bare indexes (``{0}``, ``{1}``, ...) land where CRC16 puts them: unevenly.
    Computed (deterministically, the same in every process) rather than listed: the first
    decimal tag, from 0 up, that lands in each range."""
    tags: list[str] = []
    for i in range(partitions):
        low = REDIS_CLUSTER_HASH_SLOTS * i // partitions
        high = REDIS_CLUSTER_HASH_SLOTS * (i + 1) // partitions
        n = 0
        while str(n) in tags or not low <= key_slot(f"{{{n}}}".encode()) < high:
            n += 1
        tags.append(str(n))
    return tuple(tags)


@cache
def _view(prefix: str, partitions: int, partition: int) -> Keys:
    """One partition's view, made once: every append names its partition's keys."""
    return Keys(prefix, partitions, partition)


@dataclass(frozen=True)
class Keys:
    prefix: str = "stepstream:"
    # The log plane's partitions on a cluster (STEPSTREAM_CLUSTER_PARTITIONS); 0 on one server,
    # whose one partition has plain names.
    partitions: int = 0
    # This view's partition (``at``, ``of``); None: the whole log plane, whose partition-wide
    # names (firehose, index, counters, ...) exist only in a partition's view on a cluster.
    partition: int | None = None

    @classmethod
    def of_deployment(cls, settings: Settings) -> Keys:
        """The keys of a deployment: partitioned on a cluster, plain on one server."""
        partitions = settings.cluster_partitions if settings.cluster_url else 0
        return cls(settings.prefix, partitions)

    # -- partitions -----------------------------------------------------------------------

    @property
    def partitioned(self) -> bool:
        return self.partitions > 0

    def at(self, partition: int) -> Keys:
        """The view of one partition (itself on one server)."""
        if not self.partitioned:
            return self
        return _view(self.prefix, self.partitions, partition % self.partitions)

    def of(self, job_id: str) -> Keys:
        """The view of ``job_id``'s partition."""
        return self.at(self.partition_of(job_id))

    def every_partition(self) -> list[Keys]:
        """One view per partition: what a global view (listing, firehose, counters) merges."""
        return [self.at(p) for p in range(max(1, self.partitions))]

    def owner_home(self, owner: str | None) -> Keys:
        """The partition of an owner's limits on a cluster (its unfinished jobs, its
        submissions per second), wherever its jobs are: tasks/scripts/reserve.lua."""
        return self.at(self.partition_of(f"owner:{owner or '-'}"))

    def partition_of(self, text: str) -> int:
        """The partition of a job id (or of an owner, an Idempotency-Key's scope): CRC32 of
        the text modulo the partitions, so any process finds a job's keys from its id alone."""
        if not self.partitioned:
            return 0
        return zlib.crc32(text.encode()) % self.partitions

    def new_job_id(self, partition: int | None = None) -> str:
        """A random job id (tasks/models.py), in ``partition`` if given: drawn again until it
        lands there (``partitions`` draws on average)."""
        return self.draw_id(lambda _: new_job_id(), partition)

    def draw_id(self, make: Callable[[int], str], partition: int | None) -> str:
        """The first id ``make(0)``, ``make(1)``, ... that lands in ``partition`` (None or one
        server: ``make(0)``). A derived id (a fan-out's child) stays derived: the same draws
        give the same id in every process."""
        wanted = None if partition is None or not self.partitioned else partition % self.partitions
        draw = 0
        while True:
            job_id = make(draw)
            if wanted is None or self.partition_of(job_id) == wanted:
                return job_id
            draw += 1

    @property
    def _space(self) -> str:
        """What every partition-wide name starts with."""
        if not self.partitioned:
            return self.prefix
        if self.partition is None:
            raise ValueError(
                "a partition-wide key of a partitioned log plane: name its partition (Keys.at)"
            )
        return f"{self.prefix}{{{partition_tags(self.partitions)[self.partition]}}}:"

    def _job_space(self, job_id: str) -> str:
        """What the names of ``job_id``'s own keys start with: its partition's."""
        return self.of(job_id)._space if self.partitioned else self.prefix

    def job(self, job_id: str) -> str:
        """Hash: the job record, the projection of its log."""
        return f"{self._job_space(job_id)}job:{{{job_id}}}"

    @property
    def job_parts(self) -> tuple[str, str]:
        """What comes before and after the id in ``job(id)``: for finding job ids among key
        names (a scan). No script builds a key from these: each is given its keys."""
        head, _, tail = self.job("\0").partition("\0")
        return head, tail

    def job_events(self, job_id: str) -> str:
        """Stream: the job's event log."""
        return f"{self._job_space(job_id)}job:{{{job_id}}}:events"

    def job_text(self, job_id: str) -> str:
        """String: the text of the job's latest begun step, as ``<step index>\\n<text>``,
        appended by each ``output`` event in the append script (tasks/output.py); folded into
        the record's ``steps`` when the step ends."""
        return f"{self._job_space(job_id)}job:{{{job_id}}}:text"

    def job_cancel(self, job_id: str) -> str:
        """String: set by the web process to ask the worker running the job to stop."""
        return f"{self._job_space(job_id)}job:{{{job_id}}}:cancel"

    @property
    def firehose(self) -> str:
        """Stream: every event of every job."""
        return f"{self._space}events"

    @property
    def jobs(self) -> str:
        """Sorted set: job ids by creation time in microseconds (a scheduled job's by its
        ``run_at``); entries past the retention are trimmed by the creates."""
        return f"{self._space}jobs"

    def job_channel(self, job_id: str) -> str:
        """Sharded pub/sub channel: the job's appended events, published by the append script
        (``SPUBLISH``). A web process subscribes to it (``SSUBSCRIBE``) only while one of its
        clients watches the job (server/hub.py); the job's hash tag (its partition's on a
        cluster) keeps it in the job's slot, so only the primary of that slot carries it."""
        return f"{self._job_space(job_id)}job:{{{job_id}}}:live"

    @property
    def firehose_channel(self) -> str:
        """Sharded pub/sub channel: every appended event of the partition again, for the
        firehose's live feed. A web process subscribes to it only while one of its clients
        watches the firehose."""
        return f"{self._space}live"

    @property
    def firehose_channels(self) -> tuple[str, ...]:
        """Every channel the firehose's live events are published on: the firehose's only one
        on a standalone server; on a cluster, one per partition (each in its partition's slot,
        published by the append script of that partition's jobs). A web process with a
        firehose viewer subscribes to all of them (server/hub.py)."""
        return tuple(view.firehose_channel for view in self.every_partition())

    @property
    def hub_channel(self) -> str:
        """Pub/sub channel nothing is published on. Every web process's hub holds it while
        connected: its connection stays in pub/sub mode with no viewer, and the confirmation
        of this subscription, sent last, says all the others of a (re)connection hold too."""
        return f"{self.prefix}hub"

    @property
    def queue(self) -> str:
        """The arq queue (a sorted set owned by arq)."""
        return f"{self.prefix}queue"

    @property
    def queue_wakeups(self) -> str:
        """Pub/sub channel: a message for each queue entry written due now, so an idle worker
        polls the queue at once instead of on its next timed poll (tasks/worker.py)."""
        return f"{self.prefix}queue:wakeups"

    def idempotency(self, scope: str) -> str:
        """String: the job an Idempotency-Key (hashed with its owner) created, and its body; on
        a cluster, in the partition of the job it creates (the create confirms it)."""
        return f"{self._space}idem:{scope}"

    @property
    def api_keys(self) -> str:
        """Hash: SHA-256 of an API key → its owner."""
        return f"{self.prefix}apikeys"

    def owner_unfinished(self, owner: str | None) -> str:
        """Sorted set: an owner's jobs that have not finished (for the per-owner limit). The
        append script adds a job as it becomes scheduled or queued and removes it as it ends;
        an id whose record has gone is dropped when the limit refuses (``JobStore``)."""
        return f"{self._space}unfinished:{owner or '-'}"

    def subject_jobs(self, subject: str) -> str:
        """Sorted set: the ids of jobs submitted for one subject (of any owner: listings filter
        by owner), scored as in ``jobs``; trimmed to the retention on each create."""
        return f"{self._space}subject:{subject}"

    def submissions(self, owner: str | None, second: int) -> str:
        """Counter: an owner's submissions in one second (rate limit)."""
        return f"{self._space}rate:{owner or '-'}:{second}"

    def transitions(self, name: str) -> str:
        """Hash: task → how many of its jobs made the transition ``name`` (tasks/transitions.py),
        counted by the append script as the compare-and-set on the state succeeds; what every
        web's /metrics reports."""
        return f"{self._space}count:{name}"

    def transitions_window(self, name: str, bucket: int) -> str:
        """Hash: task → the transition ``name`` in the 15-minute window starting at ``bucket``
        (unix s), counted with ``transitions``; expires after a day, for /api/stats's "last
        24 h"."""
        return f"{self._space}count:{name}:{bucket}"

    def duration_histogram(self, task: str, outcome: str) -> str:
        """Hash: the run times of a task's jobs that ended ``outcome`` (completed, failed): one
        field per bucket's upper bound (its own observations), ``count`` and ``sum``."""
        return f"{self.prefix}duration:{outcome}:{task}"

    def durations(self, task: str) -> str:
        """List: recent completed jobs of a task, newest first, as "<finished ms> <seconds>"."""
        return f"{self.prefix}durations:{task}"

    @property
    def workers(self) -> str:
        """Sorted set: worker ids by their last heartbeat (unix ms)."""
        return f"{self.prefix}workers"

    def worker(self, worker_id: str) -> str:
        """String: a worker's heartbeat (JSON, with its running job ids); a short TTL."""
        return f"{self.prefix}worker:{worker_id}"

    def result_cache(self, task: str, digest: str) -> str:
        """String: a cached result of ``task`` for one input digest (``cache_ttl``), as JSON
        ``{job_id, result}``; expires after the task's ``cache_ttl``."""
        return f"{self.prefix}cache:{task}:{digest}"

    def batch_children(self, batch_id: str) -> str:
        """List: a batch's child job ids, in the order of its inputs; a job's children
        (tasks/children.py), in the order it started them."""
        return f"{self._job_space(batch_id)}job:{{{batch_id}}}:children"

    def batch_ended(self, batch_id: str) -> str:
        """List: a batch's children in the order their ends were counted, as ``<id> <outcome>
        <previous outcome or "">``; the parent's ``progress`` events show them in this order."""
        return f"{self._job_space(batch_id)}job:{{{batch_id}}}:ended"

    def batch_counts(self, batch_id: str) -> str:
        """Hash: a batch's ended children, each with its outcome, the counters ``#done``,
        ``#completed``, ``#failed``, ``#cancelled`` (the append script counts a child as its end
        is written), and ``#shown``: the entries of ``batch_ended`` the parent's log shows.
        A job's children (tasks/children.py) are counted the same way into their parent's, which
        adds ``#size``, ``#shown_counts``, one ``g:<group>`` per fan-out, and, while the parent
        waits, its queue entry for the last end to write (``#resume`` and what goes with it)."""
        return f"{self._job_space(batch_id)}job:{{{batch_id}}}:counts"

    def children_running(self, parent_id: str) -> str:
        """Set: a job's children that have started and whose end is not shown yet (added by a
        child's ``child`` start event, removed as its end is shown): what a read of the parent
        adds the running children's own progress from (tasks/rollup.py)."""
        return f"{self._job_space(parent_id)}job:{{{parent_id}}}:running"

    def fanout_slots(self, parent_id: str, group: str) -> str:
        """Sorted set: the children of one ``ctx.map(concurrency=n)`` running at once, by lease
        expiry, like ``task_slots``."""
        return f"{self._job_space(parent_id)}job:{{{parent_id}}}:slots:{group}"

    def task_slots(self, task: str) -> str:
        """Sorted set: jobs holding one of a task's global concurrency slots, by lease expiry."""
        return f"{self.prefix}slots:{task}"

    @property
    def webhook_outbox(self) -> str:
        """Stream: terminal events waiting for their webhook delivery (tasks/outbox.py), one
        entry per target, written by the append script; an entry is deleted once delivered or
        given up. Read by the workers' consumer group ``webhook_group``."""
        return f"{self._space}webhooks"

    @property
    def webhooks_dropped(self) -> str:
        """Counter: webhook events the append script could not add to a full outbox; a worker
        takes it (GETDEL) and logs the number."""
        return f"{self._space}webhooks:dropped"

    @property
    def webhooks_held(self) -> str:
        """Hash: outbox entry id → why it is held (JSON ``{reason, worker, at}``): a delivery a
        worker's settings refused, kept in the outbox (pending under ``webhook_held_consumer``)
        until a worker whose settings allow it delivers it (tasks/outbox.py). A field is
        deleted with its entry, so the hash is no bigger than the outbox."""
        return f"{self._space}webhooks:held"

    @property
    def webhook_held_consumer(self) -> str:
        """The consumer (not a key) that held entries are claimed to, out of every worker's
        retry schedule."""
        return "held"

    @property
    def webhook_settings(self) -> str:
        """Sorted set: ids of the processes (web and worker) that announced their webhook
        settings, by last announcement (unix ms) (tasks/webhook_settings.py)."""
        return f"{self.prefix}webhook-settings"

    def webhook_settings_of(self, process_id: str) -> str:
        """String: one process's webhook settings, as digests (JSON); a short TTL."""
        return f"{self.prefix}webhook-settings:{process_id}"

    @property
    def queue_outbox(self) -> str:
        """Hash, on a cluster only: entry → queue-plane commands (JSON, tasks/planes.py) that a
        script call on the log plane wrote for the web process or worker to run on REDIS_URL's
        queue after it (an arq entry cannot be written by a cluster's script). Deleted once
        run; the workers run the ones left behind by a process that died in between."""
        return f"{self._space}queue-outbox"

    @property
    def webhook_group(self) -> str:
        """The consumer group (not a key) of the workers on ``webhook_outbox``."""
        return "deliverers"
