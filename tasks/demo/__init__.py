"""Two real demo tasks that run offline: document analysis and a staffing quote."""

from __future__ import annotations

from stepstream.tasks.demo import analyze_document, generate_quote

__all__ = ["analyze_document", "generate_quote"]
