"""tasks/queue.py: the ids of a job's arq queue entries, and the job each one runs."""

from __future__ import annotations

from stepstream.tasks.models import new_job_id
from stepstream.tasks.queue import job_of_entry, resume_entry, retry_entry, timeout_entry


def test_every_entry_id_leads_back_to_its_job() -> None:
    job_id = new_job_id()
    entries = [
        job_id,
        resume_entry(job_id, "approval"),
        timeout_entry(job_id, "approval"),
        retry_entry(job_id, 1),
    ]
    assert [job_of_entry(entry) for entry in entries] == [job_id] * 4


def test_no_entry_id_is_another_s() -> None:
    """arq ends a job by deleting its id's entry: an answer, a timeout or a retry written while
    the job's arq job is still ending must not share its id, nor each other's."""
    job_id = new_job_id()
    entries = {
        job_id,
        resume_entry(job_id, "approval"),
        resume_entry(job_id, "review"),
        timeout_entry(job_id, "approval"),
        retry_entry(job_id, 1),
        retry_entry(job_id, 2),
    }
    assert len(entries) == 6
