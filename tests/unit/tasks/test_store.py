"""tasks/store.py: whether a resume cursor's events were trimmed away (``trimmed_after``)."""

from __future__ import annotations

import pytest

from stepstream.tasks.store import StreamInfo


def info(first: str | None, last: str, max_deleted: str, length: int, added: int) -> StreamInfo:
    return StreamInfo(
        last_id=last,
        first_id=first,
        max_deleted_id=max_deleted,
        length=length,
        entries_added=added,
    )


def test_nothing_was_ever_deleted_so_no_cursor_was_trimmed() -> None:
    whole = info("1-0", "5-0", "0-0", length=5, added=5)
    for cursor in [(0, 0), (1, 0), (3, 0), (5, 0)]:
        assert not whole.trimmed_after(cursor)


def test_a_cursor_before_an_explicitly_deleted_entry_was_trimmed() -> None:
    # XDEL moves max-deleted-entry-id: whatever came before it may be gone.
    deleted = info("1-0", "9-0", "4-0", length=8, added=9)
    assert deleted.trimmed_after((3, 5))
    assert not deleted.trimmed_after((4, 0))
    assert not deleted.trimmed_after((7, 0))


@pytest.mark.parametrize("cursor", [(0, 0), (2, 0), (5, 9)])
def test_a_cursor_older_than_the_first_kept_entry_of_a_trimmed_stream_was_trimmed(
    cursor: tuple[int, int],
) -> None:
    # XTRIM and XADD MAXLEN leave max-deleted-entry-id at 0-0: only the counts tell.
    trimmed = info("6-0", "9-0", "0-0", length=4, added=9)
    assert trimmed.trimmed_after(cursor)


def test_a_cursor_at_or_after_the_first_kept_entry_missed_nothing() -> None:
    trimmed = info("6-0", "9-0", "0-0", length=4, added=9)
    assert not trimmed.trimmed_after((6, 0))
    assert not trimmed.trimmed_after((8, 0))


def test_a_stream_trimmed_to_nothing_has_lost_whatever_followed_any_cursor() -> None:
    emptied = info(None, "9-0", "0-0", length=0, added=9)
    assert emptied.trimmed_after((9, 0))
    assert emptied.trimmed_after((0, 0))
