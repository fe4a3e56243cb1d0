"""A recurring job whose input misspells a field of its task: a worker must refuse to start."""

from __future__ import annotations

from stepstream.tasks.recurring import recurring

recurring("misspelt", task="ai_echo", cron="0 3 * * *", input={"countr": "nightly"})
