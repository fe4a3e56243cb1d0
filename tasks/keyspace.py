"""Every Redis key and channel name Stepstream uses, in one place.

Per-job keys share the hash tag ``{id}`` so that one job's keys live in one slot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "stepstream:"

    def job(self, job_id: str) -> str:
        """Hash: the job record, the projection of its log."""
        return f"{self.prefix}job:{{{job_id}}}"

    @property
    def job_parts(self) -> tuple[str, str]:
        """What comes before and after the id in ``job(id)``: for finding job ids among key
        names (a scan). No script builds a key from these: each is given its keys."""
        head, _, tail = self.job("\0").partition("\0")
        return head, tail

    def job_events(self, job_id: str) -> str:
        """Stream: the job's event log."""
        return f"{self.prefix}job:{{{job_id}}}:events"

    def job_text(self, job_id: str) -> str:
        """String: the text of the job's latest begun step, as ``<step index>\\n<text>``,
        appended by each ``output`` event in the append script (tasks/output.py); folded into
        the record's ``steps`` when the step ends."""
        return f"{self.prefix}job:{{{job_id}}}:text"

    def job_cancel(self, job_id: str) -> str:
        """String: set by the web process to ask the worker running the job to stop."""
        return f"{self.prefix}job:{{{job_id}}}:cancel"

    @property
    def firehose(self) -> str:
        """Stream: every event of every job."""
        return f"{self.prefix}events"

    @property
    def jobs(self) -> str:
        """Sorted set: job ids by creation time in microseconds (a scheduled job's by its
        ``run_at``); entries past the retention are trimmed by the creates."""
        return f"{self.prefix}jobs"

    def job_channel(self, job_id: str) -> str:
        """Sharded pub/sub channel: the job's appended events, published by the append script
        (``SPUBLISH``). A web process subscribes to it (``SSUBSCRIBE``) only while one of its
        clients watches the job (server/hub.py); the job's hash tag keeps it in the job's slot,
        so on a cluster only the primary of that slot carries it."""
        return f"{self.prefix}job:{{{job_id}}}:live"

    @property
    def firehose_channel(self) -> str:
        """Sharded pub/sub channel: every appended event again, for the firehose's live feed. A
        web process subscribes to it only while one of its clients watches the firehose."""
        return f"{self.prefix}live"

    @property
    def firehose_channels(self) -> tuple[str, ...]:
        """Every channel the firehose's live events are published on: the firehose's only one
        on a standalone server; on a cluster, one per partition (each in its partition's slot,
        published by the append script of that partition's jobs). A web process with a
        firehose viewer subscribes to all of them (server/hub.py)."""
        return (self.firehose_channel,)

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
        """String: the job an Idempotency-Key (hashed with its owner) created, and its body."""
        return f"{self.prefix}idem:{scope}"

    @property
    def api_keys(self) -> str:
        """Hash: SHA-256 of an API key → its owner."""
        return f"{self.prefix}apikeys"

    def owner_unfinished(self, owner: str | None) -> str:
        """Sorted set: an owner's jobs that have not finished (for the per-owner limit). The
        append script adds a job as it becomes scheduled or queued and removes it as it ends;
        an id whose record has gone is dropped when the limit refuses (``JobStore``)."""
        return f"{self.prefix}unfinished:{owner or '-'}"

    def subject_jobs(self, subject: str) -> str:
        """Sorted set: the ids of jobs submitted for one subject (of any owner: listings filter
        by owner), scored as in ``jobs``; trimmed to the retention on each create."""
        return f"{self.prefix}subject:{subject}"

    def submissions(self, owner: str | None, second: int) -> str:
        """Counter: an owner's submissions in one second (rate limit)."""
        return f"{self.prefix}rate:{owner or '-'}:{second}"

    def transitions(self, name: str) -> str:
        """Hash: task → how many of its jobs made the transition ``name`` (tasks/transitions.py),
        counted by the append script as the compare-and-set on the state succeeds; what every
        web's /metrics reports."""
        return f"{self.prefix}count:{name}"

    def transitions_window(self, name: str, bucket: int) -> str:
        """Hash: task → the transition ``name`` in the 15-minute window starting at ``bucket``
        (unix s), counted with ``transitions``; expires after a day, for /api/stats's "last
        24 h"."""
        return f"{self.prefix}count:{name}:{bucket}"

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
        return f"{self.prefix}job:{{{batch_id}}}:children"

    def batch_ended(self, batch_id: str) -> str:
        """List: a batch's children in the order their ends were counted, as ``<id> <outcome>
        <previous outcome or "">``; the parent's ``progress`` events show them in this order."""
        return f"{self.prefix}job:{{{batch_id}}}:ended"

    def batch_counts(self, batch_id: str) -> str:
        """Hash: a batch's ended children, each with its outcome, the counters ``#done``,
        ``#completed``, ``#failed``, ``#cancelled`` (the append script counts a child as its end
        is written), and ``#shown``: the entries of ``batch_ended`` the parent's log shows.
        A job's children (tasks/children.py) are counted the same way into their parent's, which
        adds ``#size``, ``#shown_counts``, one ``g:<group>`` per fan-out, and, while the parent
        waits, its queue entry for the last end to write (``#resume`` and what goes with it)."""
        return f"{self.prefix}job:{{{batch_id}}}:counts"

    def children_running(self, parent_id: str) -> str:
        """Set: a job's children that have started and whose end is not shown yet (added by a
        child's ``child`` start event, removed as its end is shown): what a read of the parent
        adds the running children's own progress from (tasks/rollup.py)."""
        return f"{self.prefix}job:{{{parent_id}}}:running"

    def fanout_slots(self, parent_id: str, group: str) -> str:
        """Sorted set: the children of one ``ctx.map(concurrency=n)`` running at once, by lease
        expiry, like ``task_slots``."""
        return f"{self.prefix}job:{{{parent_id}}}:slots:{group}"

    def task_slots(self, task: str) -> str:
        """Sorted set: jobs holding one of a task's global concurrency slots, by lease expiry."""
        return f"{self.prefix}slots:{task}"

    @property
    def webhook_outbox(self) -> str:
        """Stream: terminal events waiting for their webhook delivery (tasks/outbox.py), one
        entry per target, written by the append script; an entry is deleted once delivered or
        given up. Read by the workers' consumer group ``webhook_group``."""
        return f"{self.prefix}webhooks"

    @property
    def webhooks_dropped(self) -> str:
        """Counter: webhook events the append script could not add to a full outbox; a worker
        takes it (GETDEL) and logs the number."""
        return f"{self.prefix}webhooks:dropped"

    @property
    def webhooks_held(self) -> str:
        """Hash: outbox entry id → why it is held (JSON ``{reason, worker, at}``): a delivery a
        worker's settings refused, kept in the outbox (pending under ``webhook_held_consumer``)
        until a worker whose settings allow it delivers it (tasks/outbox.py). A field is
        deleted with its entry, so the hash is no bigger than the outbox."""
        return f"{self.prefix}webhooks:held"

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
    def webhook_group(self) -> str:
        """The consumer group (not a key) of the workers on ``webhook_outbox``."""
        return "deliverers"
