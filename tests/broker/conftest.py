"""Fixtures of the broker tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.e2e.conftest import BrokerHandle, broker_factory

__all__ = ["broker_factory", "brokers"]


@pytest.fixture
def brokers(
    broker_factory: Callable[..., Awaitable[BrokerHandle]],
) -> Callable[..., Awaitable[BrokerHandle]]:
    """Brokers on one state folder (the e2e factory, which stops them)."""
    return broker_factory
