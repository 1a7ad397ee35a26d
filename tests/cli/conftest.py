"""CLI tests run against the same in-process fleet as the end-to-end tests."""

from tests.e2e.conftest import agent_factory, broker_factory

__all__ = ["agent_factory", "broker_factory"]
