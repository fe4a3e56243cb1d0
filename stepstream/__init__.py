"""Stepstream's script side: the ``stepstream`` command (and, soon, a Python client).

Imports nothing from ``server``.
"""

from __future__ import annotations
