"""Cloud notices, from the metadata service through the agent to the broker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.config import IdentityConfig
from gpufleet.dev.metadata_server import MetadataServer
from gpufleet.proto import pb
from tests.e2e.conftest import agent_config, events_of, eventually
from tests.fakes.nvml import FakeNvml, a10g

POLICY = "fleet: test\ndefault: {action: notify}\n"


async def test_spot_notice_reaches_broker_once_and_marks_host_leaving(
    tmp_path: Path, broker_factory, agent_factory
) -> None:
    server = MetadataServer("aws", instance_id="i-0abc", region="us-east-1")
    url = await asyncio.to_thread(server.start)
    try:
        broker = await broker_factory(policy=POLICY)
        identity = IdentityConfig(
            discover=False,
            provider="aws",
            region="us-east-1",
            zone="us-east-1a",
            instance_id="i-0abc",
            instance_type="g5.xlarge",
            spot=True,
            metadata_base=url,
        )
        cfg = agent_config(tmp_path, broker.addr, "spot", identity=identity)
        await agent_factory(cfg, NvmlCollector(FakeNvml([a10g()])))
        await eventually(lambda: _connected(broker))
        server.schedule_notice("spot-interruption", in_s=0)
        await eventually(lambda: _has(broker, "host.notice"), timeout_s=10)
        await asyncio.sleep(2.5)  # more polls of the same notice
        notices = await events_of(broker, "host.notice")
        assert len(notices) == 1
        data = json.loads(notices[0].data_json)
        assert data["evacuate"] is True
        assert data["deadline_s"] > 0
        assert notices[0].host_id == "i-0abc"
    finally:
        await asyncio.to_thread(server.stop)


async def _connected(broker) -> bool:
    hosts = (await broker.admin().call("ListHosts", pb.ListHostsRequest())).hosts
    return [h.status for h in hosts] == ["connected"]


async def _has(broker, kind: str) -> bool:
    return bool(await events_of(broker, kind))
