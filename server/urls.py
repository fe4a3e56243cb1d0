"""The paths the API hands out (``links``, ``Location``), under the path it is served at.

A host app that mounts Stepstream at ``/progress`` (or uvicorn started with ``--root-path``)
puts ``/progress`` in the scope's ``root_path``; every path a response names starts with it.
"""

from __future__ import annotations

from starlette.requests import HTTPConnection

from stepstream.tasks.models import job_links

__all__ = ["job_links", "root_path"]


def root_path(conn: HTTPConnection) -> str:
    """``/progress`` when mounted there, ``""`` when served at the root.

    Not ``request.base_url``: Starlette builds it from the outermost app's root path, which
    leaves out the mount.
    """
    return str(conn.scope.get("root_path", "")).rstrip("/")
