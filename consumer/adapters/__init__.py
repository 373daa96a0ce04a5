"""Adapters: how a record reaches one tracker. See :mod:`consumer.adapters.base`."""

from __future__ import annotations

from consumer.adapters.base import Adapter, Delivery
from consumer.config import (
    AdapterSettings,
    FileAdapterSettings,
    TrackerAdapterSettings,
    WebhookAdapterSettings,
)
from consumer.errors import ConfigError


def build_adapter(settings: AdapterSettings) -> Adapter:
    """The adapter for one configured entry; unknown or unbuilt types fail at start-up."""
    if isinstance(settings, WebhookAdapterSettings):
        from consumer.adapters.webhook import WebhookAdapter

        return WebhookAdapter(settings, transport=settings.client)
    if isinstance(settings, TrackerAdapterSettings):
        from consumer.adapters.tracker import TrackerAdapter

        return TrackerAdapter(settings)
    if isinstance(settings, FileAdapterSettings):
        from consumer.adapters.file import FileAdapter

        return FileAdapter(settings)
    raise ConfigError(
        f"adapters.{settings.name}: adapter type {settings.type!r} is not available in this "
        "version (see the README's adapter list)"
    )


__all__ = ["Adapter", "Delivery", "build_adapter"]
