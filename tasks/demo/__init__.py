"""Real demo tasks that run offline: document analysis (one document, or a corpus of them as
child jobs) and a staffing quote."""

from __future__ import annotations

from stepstream.tasks.demo import analyze_corpus, analyze_document, generate_quote

__all__ = ["analyze_corpus", "analyze_document", "generate_quote"]
