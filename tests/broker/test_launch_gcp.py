"""Tests of GCE launches: the real google-cloud-compute client against the
fake GCE REST server on loopback."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from gpufleet.broker.clouds import cloud_for
from gpufleet.broker.clouds.gcp import (
    GceActions,
    gce_label,
    gce_launch_name,
    gce_request_id,
)
from gpufleet.broker.clouds.launch import LaunchError, LaunchRequest, LaunchTemplate
from tests.fakes.gce import FakeGce, running_fake_gce

PROJECT, ZONE = "lab-project", "us-central1-a"
TPL = LaunchTemplate(
    image="projects/debian-cloud/global/images/family/debian-12",
    network="global/networks/default",
    service_account="vm@lab-project.iam.gserviceaccount.com",
    tags={"Team": "Vision"},
)


@pytest.fixture
def gce() -> Iterator[FakeGce]:
    with running_fake_gce() as fake:
        yield fake


def _cloud(fake: FakeGce) -> GceActions:
    cloud = cloud_for("gcp", gce_endpoint=fake.endpoint)
    assert isinstance(cloud, GceActions)
    return cloud


def _req(**changes: object) -> LaunchRequest:
    req = LaunchRequest(
        provider="gcp",
        region="us-central1",
        zone=ZONE,
        instance_type="g2-standard-8",
        lifecycle="spot",
        launch_id="l-0001",
        fleet="Lab",
        job_id="Train.42",
        user_data="#!/bin/bash\necho gpufleet\n",
        project=PROJECT,
    )
    return dataclasses.replace(req, **changes)  # type: ignore[arg-type]


async def test_gce_launch_spot_sends_scheduling_labels_and_script(
    gce: FakeGce,
) -> None:
    """A spot launch is a SPOT VM deleted on preemption, labelled, with the script."""
    ref = await _cloud(gce).launch_instance(_req(), TPL)

    body = gce.body_of(PROJECT, ZONE, "l-0001")
    assert body is not None
    assert body["scheduling"] == {
        "provisioningModel": "SPOT",
        "instanceTerminationAction": "DELETE",
        "onHostMaintenance": "TERMINATE",
        "automaticRestart": False,
    }
    assert body["labels"] == {
        "gpufleet-fleet": "lab",
        "gpufleet-launch-id": "l-0001",
        "gpufleet-job": "train_42",
        "gpufleet-managed": "true",
        "team": "vision",
    }
    assert body["metadata"]["items"] == [
        {"key": "startup-script", "value": "#!/bin/bash\necho gpufleet\n"}
    ]
    assert body["machineType"] == f"zones/{ZONE}/machineTypes/g2-standard-8"
    assert body["disks"][0]["autoDelete"] is True
    assert body["disks"][0]["initializeParams"]["diskSizeGb"] == "100"
    assert body["serviceAccounts"][0]["email"] == TPL.service_account
    assert (ref.name, ref.lifecycle, ref.state) == ("l-0001", "spot", "running")
    assert ref.launch_id == "l-0001"
    assert ref.instance_id == body["id"]


async def test_gce_launch_on_demand_is_standard_and_restarts(gce: FakeGce) -> None:
    """An on-demand VM is STANDARD and restarts after host maintenance."""
    ref = await _cloud(gce).launch_instance(_req(lifecycle="on-demand"), TPL)

    body = gce.body_of(PROJECT, ZONE, ref.name)
    assert body is not None
    assert body["scheduling"]["provisioningModel"] == "STANDARD"
    assert body["scheduling"]["automaticRestart"] is True
    assert ref.lifecycle == "on-demand"


async def test_gce_launch_twice_with_one_id_creates_one_vm(gce: FakeGce) -> None:
    """A retried launch sends the same requestId and gets the same VM."""
    cloud = _cloud(gce)

    first = await cloud.launch_instance(_req(), TPL)
    second = await cloud.launch_instance(_req(), TPL)

    assert second.instance_id == first.instance_id
    assert len(gce.instances) == 1
    assert gce_request_id("l-0001", ZONE) in gce.request_ids
    assert gce_request_id("l-0001", ZONE) != gce_request_id("l-0002", ZONE)


async def test_gce_launch_name_taken_by_another_vm_is_a_config_error(
    gce: FakeGce,
) -> None:
    """A VM of that name not made by this launch is never taken over."""
    gce.add_instance(PROJECT, ZONE, "l-0001")

    with pytest.raises(LaunchError, match="already exists") as info:
        await _cloud(gce).launch_instance(_req(), TPL)

    assert info.value.kind == "config"
    assert info.value.next_offer is False


async def test_gce_list_launched_filters_by_fleet_label(gce: FakeGce) -> None:
    """list_launched returns the fleet's VMs only, via a label filter."""
    cloud = _cloud(gce)
    await cloud.launch_instance(_req(launch_id="l-1"), TPL)
    await cloud.launch_instance(_req(launch_id="l-2", fleet="other"), TPL)
    gce.add_instance(PROJECT, ZONE, "hand-made")

    found = await cloud.list_launched(PROJECT, ZONE, "Lab")

    assert [(r.name, r.launch_id) for r in found] == [("l-1", "l-1")]
    assert any("instances" in r and r.startswith("GET") for r in gce.requests)


@pytest.mark.parametrize(
    ("code", "message", "at", "kind", "next_offer"),
    [
        ("ZONE_RESOURCE_POOL_EXHAUSTED", "no g2 left", "operation", "capacity", True),
        (
            "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
            "no g2 left",
            "operation",
            "capacity",
            True,
        ),
        (
            "QUOTA_EXCEEDED",
            "Quota 'NVIDIA_L4_GPUS' exceeded",
            "operation",
            "quota",
            True,
        ),
        (
            "quotaExceeded",
            "Quota 'GPUS_ALL_REGIONS' exceeded. Limit: 0.0 globally.",
            "request",
            "quota",
            False,
        ),
        ("UNSUPPORTED_OPERATION", "no SPOT here", "operation", "config", True),
        ("forbidden", "Required 'compute.instances.create'", "request", "auth", False),
        (
            "notFound",
            "The resource 'zones/us-central1-a/machineTypes/a3-x' was not found",
            "request",
            "capacity",
            True,
        ),
        ("invalid", "Invalid value for field 'image'", "request", "config", False),
    ],
)
async def test_gce_launch_error_is_classified(
    gce: FakeGce, code: str, message: str, at: str, kind: str, next_offer: bool
) -> None:
    """Request and operation errors map to launch error kinds, with hints."""
    gce.fail_insert(ZONE, code, message, at=at)

    with pytest.raises(LaunchError) as info:
        await _cloud(gce).launch_instance(_req(), TPL)

    assert (info.value.kind, info.value.next_offer) == (kind, next_offer)
    assert message in str(info.value)
    assert info.value.hint
    assert gce.body_of(PROJECT, ZONE, "l-0001") is None


async def test_gce_stockout_in_one_zone_then_next_zone_launches(gce: FakeGce) -> None:
    """After a stockout in one zone, the next zone's launch succeeds."""
    gce.fail_insert(ZONE, "ZONE_RESOURCE_POOL_EXHAUSTED", "stockout")
    cloud = _cloud(gce)

    with pytest.raises(LaunchError):
        await cloud.launch_instance(_req(), TPL)
    ref = await cloud.launch_instance(
        _req(zone="us-central1-b", launch_id="l-0002"), TPL
    )

    assert ref.zone == "us-central1-b"


async def test_gce_launch_without_project_is_refused(gce: FakeGce) -> None:
    """A request without a project fails before any call."""
    with pytest.raises(LaunchError, match="project and zone"):
        await _cloud(gce).launch_instance(_req(project=""), TPL)

    assert gce.requests == []


@pytest.mark.parametrize(
    ("launch_id", "name"),
    [
        ("l-0001", "l-0001"),
        ("Job_42:Retry", "gpufleet-job-42-retry"),
        ("7" * 70, "gpufleet-" + "7" * 54),
    ],
)
def test_gce_launch_name_is_a_valid_vm_name(launch_id: str, name: str) -> None:
    """Launch ids become valid GCE names of at most 63 characters."""
    assert gce_launch_name(launch_id) == name


def test_gce_label_sanitizes_to_gce_rules() -> None:
    """Labels are lowercase [a-z0-9_-], at most 63 long; keys start with a letter."""
    assert gce_label("Train.42/β") == "train_42__"
    assert len(gce_label("x" * 100)) == 63
    assert gce_label("9lives", key=True) == "k9lives"
