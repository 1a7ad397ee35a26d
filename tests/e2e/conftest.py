"""A whole fleet in one process: a real broker and real agents on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpufleet.agent import daemon
from gpufleet.agent.collectors.base import Collector
from gpufleet.agent.config import AgentConfig, IdentityConfig
from gpufleet.broker.config import BrokerConfig
from gpufleet.broker.server import run_broker
from gpufleet.proto import pb, rpc

TOKEN = "test-admin-token"
ROOT = Path(__file__).resolve().parents[2]
CASES = ROOT / "tests" / "cases"
TRACES = ROOT / "data" / "alibaba-genai-2026"


@dataclass
class BrokerHandle:
    cfg: BrokerConfig
    addr: str
    metrics_port: int
    stop: asyncio.Event
    task: asyncio.Task[None]

    def admin(self) -> AdminAio:
        return AdminAio(self.addr)

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


class AdminAio:
    """An asyncio admin client for tests that share the broker's loop."""

    def __init__(self, addr: str, token: str = TOKEN) -> None:
        self.addr = addr
        self.token = token

    async def call(self, method: str, request: Any) -> Any:
        async with grpc.aio.insecure_channel(self.addr) as channel:
            stub = rpc.AdminServiceStub(channel)
            return await getattr(stub, method)(
                request,
                timeout=5,
                metadata=(("authorization", f"Bearer {self.token}"),),
            )


async def start_broker(
    tmp_path: Path, *, policy: str | None = None, port: int = 0, **overrides: Any
) -> BrokerHandle:
    state = tmp_path / "broker"
    state.mkdir(exist_ok=True)
    policy_file = None
    if policy is not None:
        policy_file = tmp_path / "policy.yaml"
        policy_file.write_text(policy)
    settings: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "metrics_listen": "127.0.0.1:0",
        "state_dir": state,
        "admin_token": TOKEN,
        "heartbeat_interval_s": 0.5,
        "policy_file": policy_file,
    }
    cfg = BrokerConfig(**(settings | overrides))
    stop, ready, bound = asyncio.Event(), asyncio.Event(), {}
    task = asyncio.create_task(run_broker(cfg, stop=stop, ready=ready, bound=bound))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait(
        {task, waiter}, timeout=15, return_when="FIRST_COMPLETED"
    )
    if task in done:
        waiter.cancel()
        task.result()
    assert ready.is_set(), "broker did not start"
    return BrokerHandle(cfg, f"127.0.0.1:{bound['grpc']}", bound["metrics"], stop, task)


@dataclass
class AgentHandle:
    stop: asyncio.Event
    task: asyncio.Task[None]
    agents: list[daemon.Agent] = field(default_factory=list)

    @property
    def agent(self) -> daemon.Agent:
        return self.agents[0]

    async def shutdown(self) -> None:
        self.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 15)


def agent_config(
    tmp_path: Path, broker: str, name: str, **overrides: Any
) -> AgentConfig:
    identity = overrides.pop("identity", IdentityConfig(discover=False))
    cfg = AgentConfig(
        broker=broker,
        name=name,
        interval_s=0.05,
        batch_interval_s=0.05,
        state_dir=tmp_path / name,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        identity=identity,
        **overrides,
    )
    return cfg


async def start_agent(cfg: AgentConfig, collector: Collector) -> AgentHandle:
    stop = asyncio.Event()
    holder: list[daemon.Agent] = []
    task = asyncio.create_task(daemon.run(cfg, collector, stop=stop, agent_out=holder))
    await eventually(lambda: bool(holder) and holder[0].first_sample.is_set())
    return AgentHandle(stop, task, holder)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 15.0
) -> None:
    """Waits until ``check`` holds; fails with a clear message otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


async def events_of(broker: BrokerHandle, kind_prefix: str = "") -> list[pb.Event]:
    resp = await broker.admin().call("ListEvents", pb.ListEventsRequest(limit=10_000))
    return [e for e in resp.events if e.kind.startswith(kind_prefix)]


@pytest.fixture
async def broker_factory(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[BrokerHandle]]]:
    started: list[BrokerHandle] = []

    async def make(**kwargs: Any) -> BrokerHandle:
        handle = await start_broker(tmp_path, **kwargs)
        started.append(handle)
        return handle

    yield make
    for handle in started:
        if not handle.task.done():
            await handle.shutdown()


@pytest.fixture
async def agent_factory() -> AsyncIterator[Callable[..., Awaitable[AgentHandle]]]:
    started: list[AgentHandle] = []

    async def make(cfg: AgentConfig, collector: Collector) -> AgentHandle:
        handle = await start_agent(cfg, collector)
        started.append(handle)
        return handle

    yield make
    for handle in started:
        if not handle.task.done():
            await handle.shutdown()
