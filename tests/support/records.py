"""Job records for tests that write to the store directly, without a submit."""

from __future__ import annotations

from stepstream.tasks.models import JobRecord, JobState, utcnow


def running_record(job_id: str, task: str = "burst") -> JobRecord:
    """A job of ``task`` that has started (so events may be appended to it)."""
    return JobRecord(
        id=job_id,
        task=task,
        owner=None,
        state=JobState.running,
        input={},
        max_attempts=1,
        created_at=utcnow(),
        steps=[],
    )
