"""Tests of the broker's EC2 actions against moto's EC2 server on loopback."""

from __future__ import annotations

import pytest

from gpufleet.broker.clouds import cloud_for
from gpufleet.broker.clouds.aws import AwsActions
from gpufleet.errors import CloudActionError, ConfigError
from gpufleet.proto import pb
from tests.fakes.moto_ec2 import launch, moto_ec2_url

__all__ = ["moto_ec2_url"]

REGION = "eu-west-1"


def _host(instance_id: str, *, region: str = REGION) -> pb.HostIdentity:
    return pb.HostIdentity(
        host_id=instance_id,
        provider="aws",
        region=region,
        instance_id=instance_id,
        instance_type="g5.xlarge",
    )


def _cloud(url: str) -> AwsActions:
    cloud = cloud_for("aws", aws_endpoint_url=url)
    assert isinstance(cloud, AwsActions)
    return cloud


async def test_aws_stop_running_instance_reports_stopping(moto_ec2_url: str) -> None:
    cloud = _cloud(moto_ec2_url)
    host = _host(launch(moto_ec2_url, REGION))

    assert await cloud.instance_state(host) == "running"
    assert await cloud.stop_instance(host) == "stopping"
    assert await cloud.instance_state(host) == "stopped"


async def test_aws_stop_stopped_instance_is_a_no_op(moto_ec2_url: str) -> None:
    cloud = _cloud(moto_ec2_url)
    host = _host(launch(moto_ec2_url, REGION))
    await cloud.stop_instance(host)

    assert await cloud.stop_instance(host) == "stopped"


async def test_aws_start_stopped_instance_runs_again(moto_ec2_url: str) -> None:
    cloud = _cloud(moto_ec2_url)
    host = _host(launch(moto_ec2_url, REGION))
    await cloud.stop_instance(host)

    assert await cloud.start_instance(host) == "pending"
    assert await cloud.instance_state(host) == "running"
    assert await cloud.start_instance(host) == "running"


async def test_aws_terminate_twice_is_idempotent(moto_ec2_url: str) -> None:
    cloud = _cloud(moto_ec2_url)
    host = _host(launch(moto_ec2_url, REGION))

    assert await cloud.terminate_instance(host) == "shutting-down"
    assert await cloud.instance_state(host) == "terminated"
    assert await cloud.terminate_instance(host) == "terminated"
    assert await cloud.stop_instance(host) == "terminated"


async def test_aws_start_terminated_instance_raises(moto_ec2_url: str) -> None:
    cloud = _cloud(moto_ec2_url)
    host = _host(launch(moto_ec2_url, REGION))
    await cloud.terminate_instance(host)

    with pytest.raises(CloudActionError, match="can never run again"):
        await cloud.start_instance(host)


async def test_aws_stop_one_time_spot_raises_unsupported(moto_ec2_url: str) -> None:
    cloud = _cloud(moto_ec2_url)
    host = _host(launch(moto_ec2_url, REGION, spot="one-time"))

    with pytest.raises(CloudActionError, match="UnsupportedOperation") as info:
        await cloud.stop_instance(host)

    assert "terminate-instance" in (info.value.hint or "")
    assert await cloud.instance_state(host) == "running"
    assert await cloud.terminate_instance(host) == "shutting-down"


async def test_aws_stop_persistent_spot_stops(moto_ec2_url: str) -> None:
    cloud = _cloud(moto_ec2_url)
    host = _host(launch(moto_ec2_url, REGION, spot="persistent"))

    assert await cloud.stop_instance(host) == "stopping"


async def test_aws_unknown_instance_raises_naming_it(moto_ec2_url: str) -> None:
    cloud = _cloud(moto_ec2_url)
    host = _host("i-0123456789abcdef0")

    with pytest.raises(CloudActionError) as info:
        await cloud.stop_instance(host)

    assert info.value.instance_id == "i-0123456789abcdef0"
    assert info.value.provider == "aws"
    assert "InvalidInstanceID.NotFound" in str(info.value)
    assert "eu-west-1" in (info.value.hint or "")


async def test_aws_instance_in_other_region_is_not_found(moto_ec2_url: str) -> None:
    cloud = _cloud(moto_ec2_url)
    instance_id = launch(moto_ec2_url, "us-east-1")

    with pytest.raises(CloudActionError, match="NotFound"):
        await cloud.instance_state(_host(instance_id, region="us-west-2"))


async def test_aws_identity_without_region_raises() -> None:
    cloud = AwsActions(endpoint_url="http://127.0.0.1:9")

    with pytest.raises(CloudActionError, match="lacks an instance id or region"):
        await cloud.stop_instance(_host("i-0123456789abcdef0", region=""))


def test_aws_hint_for_denied_stop_names_the_permission() -> None:
    from gpufleet.broker.clouds.aws import _hint_for

    hint = _hint_for("UnauthorizedOperation", "StopInstances", REGION)

    assert hint is not None
    assert "ec2:StopInstances" in hint


def test_cloud_for_unknown_provider_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="'azure' has no cloud actions"):
        cloud_for("azure")
