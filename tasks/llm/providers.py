"""The provider a worker uses, made from its settings and kept for its lifetime."""

from __future__ import annotations

from typing import Any

from stepstream.tasks.llm.completion import Provider
from stepstream.tasks.llm.offline import OfflineProvider
from stepstream.tasks.llm.provider import OpenAIProvider
from stepstream.tasks.settings import Settings


class Providers:
    """A worker's LLM providers, made on first use and kept for its lifetime (each HTTP client
    pools its connections); the worker closes them as it shuts down."""

    def __init__(self) -> None:
        self._made: dict[tuple[Any, ...], Provider] = {}

    def get(self, settings: Settings) -> Provider:
        """The provider ``settings`` configure."""
        key = (
            settings.llm_provider,
            settings.llm_base_url,
            settings.llm_api_key,
            settings.llm_timeout_seconds,
            settings.llm_max_retries,
            settings.llm_max_inline_wait_seconds,
            settings.llm_offline_word_seconds,
        )
        provider = self._made.get(key)
        if provider is None:
            provider = self._made[key] = make_provider(settings)
        return provider

    async def aclose(self) -> None:
        """Close the providers' HTTP clients (the worker's shutdown)."""
        made = list(self._made.values())
        self._made.clear()
        for provider in made:
            await provider.aclose()


def make_provider(settings: Settings) -> Provider:
    """A new provider as ``settings`` configure it (``STEPSTREAM_LLM_PROVIDER``)."""
    if settings.llm_provider == "openai":
        return OpenAIProvider(
            settings.llm_base_url,
            settings.llm_api_key,
            timeout=settings.llm_timeout_seconds,
            max_retries=settings.llm_max_retries,
            max_inline_wait=settings.llm_max_inline_wait_seconds,
        )
    return OfflineProvider(settings.llm_offline_word_seconds)
