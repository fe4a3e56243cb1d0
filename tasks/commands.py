"""A Redis command another one runs with: a job's event append takes a list of them (``then=``)
and runs them in the same script, so the event and its effects land together or not at all."""

from __future__ import annotations

from collections.abc import Sequence

Command = Sequence[str | bytes | int]  # the command's name, then its arguments
