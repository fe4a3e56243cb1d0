"""A recurring job every 2 seconds, for the recurring-job test only (its own stack loads it)."""

from __future__ import annotations

from stepstream.tasks.recurring import recurring

recurring("tick", task="ai_echo", cron="* * * * * */2", input={"counter": "tick"})
