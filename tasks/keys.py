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

    def job_events(self, job_id: str) -> str:
        """Stream: the job's event log."""
        return f"{self.prefix}job:{{{job_id}}}:events"

    def job_cancel(self, job_id: str) -> str:
        """String: set by the web process to ask the worker running the job to stop."""
        return f"{self.prefix}job:{{{job_id}}}:cancel"

    @property
    def firehose(self) -> str:
        """Stream: every event of every job."""
        return f"{self.prefix}events"

    @property
    def jobs(self) -> str:
        """Sorted set: job ids by creation time in microseconds."""
        return f"{self.prefix}jobs"

    @property
    def channel(self) -> str:
        """Pub/sub channel carrying every appended event, for live wake-ups."""
        return f"{self.prefix}live"

    @property
    def queue(self) -> str:
        """The arq queue (a sorted set owned by arq)."""
        return f"{self.prefix}queue"

    def idempotency(self, scope: str) -> str:
        """String: the job an Idempotency-Key (hashed with its owner) created, and its body."""
        return f"{self.prefix}idem:{scope}"

    @property
    def api_keys(self) -> str:
        """Hash: SHA-256 of an API key → its owner."""
        return f"{self.prefix}apikeys"

    def owner_unfinished(self, owner: str | None) -> str:
        """Sorted set: an owner's jobs that have not finished (for the per-owner limit)."""
        return f"{self.prefix}unfinished:{owner or '-'}"

    def submissions(self, owner: str | None, second: int) -> str:
        """Counter: an owner's submissions in one second (rate limit)."""
        return f"{self.prefix}rate:{owner or '-'}:{second}"

    def task_slots(self, task: str) -> str:
        """Sorted set: jobs holding one of a task's global concurrency slots, by lease expiry."""
        return f"{self.prefix}slots:{task}"
