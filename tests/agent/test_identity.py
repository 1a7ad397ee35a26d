"""Tests of host identity discovery against fake metadata servers on loopback."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from gpufleet.agent.identity import discover_identity
from gpufleet.errors import ConfigError
from tests.fakes.metadata import (
    AWS_DEFAULT,
    AZURE_DEFAULT,
    closed_port_url,
    metadata_server,
)

TIMEOUT_S = 0.3


def _bases(**urls: str) -> dict[str, Any]:
    dead = closed_port_url()
    bases = {"aws_base": dead, "gcp_base": dead, "azure_base": dead}
    bases.update(urls)
    return bases


async def test_identity_aws_imdsv2_reads_instance_and_spot() -> None:
    with metadata_server("aws") as aws:
        identity = await discover_identity(
            timeout_s=TIMEOUT_S, **_bases(aws_base=aws.base_url)
        )

    assert identity.provider == "aws"
    assert identity.host_id == "i-0abc1234def567890"
    assert identity.instance_id == "i-0abc1234def567890"
    assert identity.instance_type == "p5.48xlarge"
    assert identity.region == "us-east-1"
    assert identity.zone == "us-east-1a"
    assert identity.spot is True
    assert identity.hostname == socket.gethostname()
    assert aws.requests[0][:2] == ("PUT", "/latest/api/token")
    assert all(status == 200 for _, _, status in aws.requests)


async def test_identity_aws_on_demand_is_not_spot() -> None:
    values = dict(AWS_DEFAULT, **{"instance-life-cycle": "on-demand"})
    with metadata_server("aws", values) as aws:
        identity = await discover_identity(
            timeout_s=TIMEOUT_S, **_bases(aws_base=aws.base_url)
        )

    assert identity.spot is False


async def test_fake_aws_refuses_get_without_token() -> None:
    import httpx

    with metadata_server("aws") as aws:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{aws.base_url}/latest/meta-data/instance-id")

    assert response.status_code == 401


async def test_identity_gcp_reads_zone_region_project_and_spot() -> None:
    with metadata_server("gcp") as gcp:
        identity = await discover_identity(
            timeout_s=TIMEOUT_S, **_bases(gcp_base=gcp.base_url)
        )

    assert identity.provider == "gcp"
    assert identity.instance_id == "4520031799277581759"
    assert identity.zone == "us-central1-a"
    assert identity.region == "us-central1"
    assert identity.instance_type == "a3-highgpu-8g"
    assert identity.project == "lab-training"
    assert identity.spot is True


async def test_identity_azure_reads_compute_document() -> None:
    with metadata_server("azure") as azure:
        identity = await discover_identity(
            timeout_s=TIMEOUT_S, **_bases(azure_base=azure.base_url)
        )

    compute = AZURE_DEFAULT["compute"]
    assert identity.provider == "azure"
    assert identity.instance_id == compute["vmId"]
    assert identity.region == "westeurope"
    assert identity.zone == "2"
    assert identity.instance_type == "Standard_ND96isr_H100_v5"
    assert identity.spot is True


async def test_identity_off_cloud_uses_name_then_hostname() -> None:
    named = await discover_identity(name="lab-box-3", timeout_s=TIMEOUT_S, **_bases())
    unnamed = await discover_identity(timeout_s=TIMEOUT_S, **_bases())

    assert named.provider == ""
    assert named.host_id == "lab-box-3"
    assert unnamed.host_id == socket.gethostname()


async def test_identity_slow_metadata_costs_about_timeout_and_falls_back() -> None:
    with (
        metadata_server("aws", mode="slow") as aws,
        metadata_server("gcp", mode="slow") as gcp,
        metadata_server("azure", mode="slow") as azure,
    ):
        started = time.monotonic()
        identity = await discover_identity(
            name="slow-host",
            timeout_s=0.1,
            aws_base=aws.base_url,
            gcp_base=gcp.base_url,
            azure_base=azure.base_url,
        )
        elapsed_s = time.monotonic() - started

    assert identity.provider == ""
    assert identity.host_id == "slow-host"
    assert elapsed_s < 0.5


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
async def test_identity_garbled_metadata_falls_back_off_cloud(cloud: str) -> None:
    with metadata_server(cloud, mode="garbled") as server:
        identity = await discover_identity(
            name="odd-host",
            timeout_s=TIMEOUT_S,
            **_bases(**{f"{cloud}_base": server.base_url}),
        )

    assert identity.provider == ""
    assert identity.host_id == "odd-host"


async def test_identity_overrides_skip_probing_for_simulated_hosts() -> None:
    identity = await discover_identity(
        name="sim-7",
        overrides={"provider": "aws", "region": "eu-west-1", "spot": True},
        aws_base="http://192.0.2.1",  # never contacted
    )

    assert identity.provider == "aws"
    assert identity.region == "eu-west-1"
    assert identity.spot is True
    assert identity.host_id == "sim-7"


async def test_identity_bad_overrides_raise_config_error_naming_each() -> None:
    with pytest.raises(ConfigError) as info:
        await discover_identity(overrides={"colour": "red", "spot": "maybe"})

    assert info.value.problems[0].startswith("unknown field 'colour'")
    assert "spot" in info.value.problems[1]


async def test_identity_busy_service_that_answered_once_is_still_the_cloud() -> None:
    """A service that answers its first request at once and the rest slowly
    (a loaded host) is read in full: the host is not taken for off-cloud."""
    with metadata_server("aws", mode="slow-after-first", delay_s=0.4) as aws:
        identity = await discover_identity(
            timeout_s=0.2,
            total_timeout_s=3.0,
            **_bases(aws_base=aws.base_url),
        )

    assert identity.provider == "aws"
    assert identity.instance_id == AWS_DEFAULT["instance-id"]


async def test_identity_busy_service_past_the_total_budget_falls_back() -> None:
    with metadata_server("aws", mode="slow-after-first", delay_s=2.0) as aws:
        started = time.monotonic()
        identity = await discover_identity(
            name="busy-host",
            timeout_s=0.2,
            total_timeout_s=0.5,
            **_bases(aws_base=aws.base_url),
        )
        elapsed_s = time.monotonic() - started

    assert identity.provider == ""
    assert identity.host_id == "busy-host"
    assert elapsed_s < 1.5
