"""Tests of EC2 launches: moto's EC2 server behind a fault-injecting proxy."""

from __future__ import annotations

import base64
import dataclasses
import urllib.request
from collections.abc import Iterator

import boto3
import pytest

from gpufleet.broker.clouds import cloud_for
from gpufleet.broker.clouds.aws import AwsActions
from gpufleet.broker.clouds.launch import LaunchError, LaunchRequest, LaunchTemplate
from tests.fakes.ec2_faults import Ec2FaultProxy, ec2_fault_proxy
from tests.fakes.moto_ec2 import AMI_ID, moto_ec2_url

__all__ = ["moto_ec2_url"]

REGION, ZONE = "us-east-1", "us-east-1b"
SCRIPT = "#!/bin/bash\necho 'gpufleet' > /tmp/x\n"


@pytest.fixture
def ec2(moto_ec2_url: str) -> Iterator[Ec2FaultProxy]:
    # moto's backends live in the process, not in the server: start empty.
    urllib.request.urlopen(
        urllib.request.Request(f"{moto_ec2_url}/moto-api/reset", method="POST"),
        timeout=10,
    ).close()
    with ec2_fault_proxy(moto_ec2_url) as proxy:
        yield proxy


def _cloud(proxy: Ec2FaultProxy) -> AwsActions:
    cloud = cloud_for("aws", aws_endpoint_url=proxy.url)
    assert isinstance(cloud, AwsActions)
    return cloud


def _req(**changes: object) -> LaunchRequest:
    req = LaunchRequest(
        provider="aws",
        region=REGION,
        zone=ZONE,
        instance_type="g5.xlarge",
        lifecycle="spot",
        launch_id="l-0001",
        fleet="lab",
        job_id="train-42",
        user_data=SCRIPT,
    )
    return dataclasses.replace(req, **changes)  # type: ignore[arg-type]


def _describe(url: str, instance_id: str) -> dict[str, object]:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=url)
    reply = ec2.describe_instances(InstanceIds=[instance_id])
    return dict(reply["Reservations"][0]["Instances"][0])


TPL = LaunchTemplate(image=AMI_ID, tags={"team": "vision"})


async def test_aws_launch_spot_sets_market_tags_zone_and_user_data(
    ec2: Ec2FaultProxy, moto_ec2_url: str
) -> None:
    """A spot launch is a spot instance in the zone, tagged, with the script."""
    ref = await _cloud(ec2).launch_instance(_req(max_usd_per_hour=1.5), TPL)

    instance = _describe(moto_ec2_url, ref.instance_id)
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}  # type: ignore[attr-defined]
    assert instance["InstanceLifecycle"] == "spot"
    assert ref.lifecycle == "spot"
    assert ref.zone == ZONE
    assert ref.launch_id == "l-0001"
    assert tags["gpufleet:fleet"] == "lab"
    assert tags["gpufleet:launch-id"] == "l-0001"
    assert tags["gpufleet:job"] == "train-42"
    assert tags["gpufleet:managed"] == "true"
    assert tags["team"] == "vision"
    assert tags["Name"] == ref.name == "gpufleet-l-0001"
    ec2_client = boto3.client("ec2", region_name=REGION, endpoint_url=moto_ec2_url)
    attr = ec2_client.describe_instance_attribute(
        InstanceId=ref.instance_id, Attribute="userData"
    )
    assert base64.b64decode(attr["UserData"]["Value"]).decode() == SCRIPT
    sent = ec2.actions("RunInstances")[-1]
    assert sent["InstanceMarketOptions.SpotOptions.MaxPrice"] == "1.5000"
    assert sent["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == (
        "terminate"
    )
    assert sent["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == "true"


async def test_aws_launch_on_demand_has_no_spot_lifecycle(
    ec2: Ec2FaultProxy, moto_ec2_url: str
) -> None:
    """An on-demand launch sends no market options."""
    ref = await _cloud(ec2).launch_instance(_req(lifecycle="on-demand"), TPL)

    assert "InstanceLifecycle" not in _describe(moto_ec2_url, ref.instance_id)
    assert ref.lifecycle == "on-demand"
    assert ref.state in ("pending", "running")
    assert not any(
        k.startswith("InstanceMarket") for k in ec2.actions("RunInstances")[0]
    )


async def test_aws_launch_uses_the_zone_subnet(
    ec2: Ec2FaultProxy, moto_ec2_url: str
) -> None:
    """The subnet of the request's zone is used."""
    client = boto3.client("ec2", region_name=REGION, endpoint_url=moto_ec2_url)
    subnets = client.describe_subnets(
        Filters=[{"Name": "availability-zone", "Values": [ZONE]}]
    )["Subnets"]
    subnet_id = subnets[0]["SubnetId"]
    tpl = dataclasses.replace(TPL, subnet_ids={ZONE: subnet_id})

    ref = await _cloud(ec2).launch_instance(_req(), tpl)

    assert _describe(moto_ec2_url, ref.instance_id)["SubnetId"] == subnet_id


async def test_aws_launch_zone_without_subnet_is_a_config_error(
    ec2: Ec2FaultProxy,
) -> None:
    """A zone missing from subnet_ids fails before any call, next offer allowed."""
    tpl = dataclasses.replace(TPL, subnet_ids={"us-east-1a": "subnet-1"})

    with pytest.raises(LaunchError, match="no subnet for zone us-east-1b") as info:
        await _cloud(ec2).launch_instance(_req(), tpl)

    assert info.value.kind == "config"
    assert info.value.next_offer is True
    assert ec2.actions("RunInstances") == []


async def test_aws_launch_twice_with_one_id_launches_once(
    ec2: Ec2FaultProxy, moto_ec2_url: str
) -> None:
    """A retried launch returns the first instance and sends the ClientToken."""
    cloud = _cloud(ec2)

    first = await cloud.launch_instance(_req(), TPL)
    second = await cloud.launch_instance(_req(), TPL)

    assert second.instance_id == first.instance_id
    assert len(await cloud.list_launched(REGION, "lab")) == 1
    assert [c["ClientToken"] for c in ec2.actions("RunInstances")] == ["l-0001"]


async def test_aws_list_launched_finds_fleet_and_skips_terminated(
    ec2: Ec2FaultProxy, moto_ec2_url: str
) -> None:
    """list_launched returns the fleet's live instances only."""
    cloud = _cloud(ec2)
    kept = await cloud.launch_instance(_req(launch_id="l-1"), TPL)
    gone = await cloud.launch_instance(_req(launch_id="l-2"), TPL)
    await cloud.launch_instance(_req(launch_id="l-3", fleet="other"), TPL)
    boto3.client("ec2", region_name=REGION, endpoint_url=moto_ec2_url).run_instances(
        ImageId=AMI_ID, MinCount=1, MaxCount=1, InstanceType="g5.xlarge"
    )
    boto3.client(
        "ec2", region_name=REGION, endpoint_url=moto_ec2_url
    ).terminate_instances(InstanceIds=[gone.instance_id])

    found = await cloud.list_launched(REGION, "lab")

    assert [r.instance_id for r in found] == [kept.instance_id]
    assert found[0].launch_id == "l-1"


@pytest.mark.parametrize(
    ("code", "kind", "next_offer"),
    [
        ("InsufficientInstanceCapacity", "capacity", True),
        ("InsufficientCapacity", "capacity", True),
        ("Unsupported", "capacity", True),
        ("SpotMaxPriceTooLow", "price", True),
        ("MaxSpotInstanceCountExceeded", "quota", True),
        ("VcpuLimitExceeded", "quota", True),
        ("InstanceLimitExceeded", "quota", True),
        ("UnauthorizedOperation", "auth", False),
        ("InvalidSubnetID.NotFound", "config", False),
        ("IdempotentParameterMismatch", "config", False),
        ("InternalError", "other", False),
    ],
)
async def test_aws_launch_error_is_classified(
    ec2: Ec2FaultProxy, code: str, kind: str, next_offer: bool
) -> None:
    """Each EC2 error code maps to its launch error kind, with a hint."""
    ec2.fail("RunInstances", code, "injected", instance_type="g5.xlarge", zone=ZONE)

    with pytest.raises(LaunchError) as info:
        await _cloud(ec2).launch_instance(_req(), TPL)

    assert (info.value.kind, info.value.next_offer) == (kind, next_offer)
    assert info.value.code == code
    assert code in str(info.value)
    assert info.value.hint


async def test_aws_capacity_error_is_not_retried_and_next_zone_works(
    ec2: Ec2FaultProxy,
) -> None:
    """A capacity error comes after one attempt; the next zone launches."""
    ec2.fail("RunInstances", "InsufficientInstanceCapacity", zone=ZONE)
    cloud = _cloud(ec2)

    with pytest.raises(LaunchError, match="us-east-1b"):
        await cloud.launch_instance(_req(), TPL)
    ref = await cloud.launch_instance(_req(zone="us-east-1c", launch_id="l-2"), TPL)

    assert ref.zone == "us-east-1c"
    assert len(ec2.actions("RunInstances")) == 2


async def test_aws_launch_unknown_ami_is_a_config_error(ec2: Ec2FaultProxy) -> None:
    """An AMI the region lacks fails as config, naming the image."""
    tpl = dataclasses.replace(TPL, image="ami-00000000deadbeef0")

    with pytest.raises(LaunchError) as info:
        await _cloud(ec2).launch_instance(_req(), tpl)

    assert info.value.kind == "config"
    assert info.value.code.startswith("InvalidAMIID")
    assert "AMIs are regional" in (info.value.hint or "")


async def test_aws_launch_rejects_oversized_user_data(ec2: Ec2FaultProxy) -> None:
    """User data over EC2's 16 KiB is refused before any call."""
    with pytest.raises(LaunchError, match="at most 16384") as info:
        await _cloud(ec2).launch_instance(_req(user_data="x" * 20_000), TPL)

    assert info.value.kind == "config"
    assert info.value.next_offer is False


async def test_aws_launch_rejects_unknown_lifecycle(ec2: Ec2FaultProxy) -> None:
    """A lifecycle other than spot or on-demand is refused, naming it."""
    with pytest.raises(LaunchError, match="'reserved'"):
        await _cloud(ec2).launch_instance(_req(lifecycle="reserved"), TPL)
