"""Fixtures of the broker tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker.kernel_helpers import Factory
from tests.e2e.conftest import BrokerHandle, start_broker


@pytest.fixture
async def brokers(tmp_path: Path) -> AsyncIterator[Factory]:
    """Starts brokers on one state folder; stops the ones still running."""
    started: list[BrokerHandle] = []

    async def make(**kwargs: Any) -> BrokerHandle:
        handle = await start_broker(tmp_path, **kwargs)
        started.append(handle)
        return handle

    yield make
    for handle in started:
        if not handle.task.done():
            await handle.shutdown()
