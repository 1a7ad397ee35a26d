"""Tests of the broker's GCE actions: the real google-cloud-compute client
against the fake GCE REST server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpufleet.broker.clouds import cloud_for
from gpufleet.broker.clouds.gcp import GceActions, gce_instance_name
from gpufleet.errors import CloudActionError
from gpufleet.proto import pb
from tests.fakes.gce import FakeGce, running_fake_gce

PROJECT, ZONE = "lab-project", "us-central1-a"


@pytest.fixture
def gce() -> Iterator[FakeGce]:
    with running_fake_gce() as fake:
        yield fake


def _cloud(fake: FakeGce) -> GceActions:
    cloud = cloud_for("gcp", gce_endpoint=fake.endpoint)
    assert isinstance(cloud, GceActions)
    return cloud


def _host(name: str, instance_id: str = "") -> pb.HostIdentity:
    """An identity as the agent sends it: numeric id, name in the hostname."""
    return pb.HostIdentity(
        host_id=instance_id or name,
        hostname=f"{name}.{ZONE}.c.{PROJECT}.internal",
        provider="gcp",
        region="us-central1",
        zone=ZONE,
        instance_id=instance_id,
        project=PROJECT,
    )


async def test_gce_stop_running_vm_reports_stopped(gce: FakeGce) -> None:
    instance_id = gce.add_instance(PROJECT, ZONE, "gpu-a1")
    cloud = _cloud(gce)
    host = _host("gpu-a1", instance_id)

    assert await cloud.instance_state(host) == "running"
    assert await cloud.stop_instance(host) == "stopped"
    assert gce.status_of(PROJECT, ZONE, "gpu-a1") == "TERMINATED"
    assert any("/operations/" in r for r in gce.requests)


async def test_gce_stop_stopped_vm_sends_no_stop(gce: FakeGce) -> None:
    gce.add_instance(PROJECT, ZONE, "gpu-a1", status="TERMINATED")

    assert await _cloud(gce).stop_instance(_host("gpu-a1")) == "stopped"
    assert not any(r.endswith("/stop") for r in gce.requests)


async def test_gce_start_stopped_vm_runs_again(gce: FakeGce) -> None:
    gce.add_instance(PROJECT, ZONE, "gpu-a1", status="TERMINATED")
    cloud = _cloud(gce)

    assert await cloud.start_instance(_host("gpu-a1")) == "running"
    assert await cloud.start_instance(_host("gpu-a1")) == "running"
    assert sum(r.endswith("/start") for r in gce.requests) == 1


async def test_gce_terminate_deletes_vm_and_is_idempotent(gce: FakeGce) -> None:
    gce.add_instance(PROJECT, ZONE, "gpu-a1")
    cloud = _cloud(gce)

    assert await cloud.terminate_instance(_host("gpu-a1")) == "terminated"
    assert gce.status_of(PROJECT, ZONE, "gpu-a1") is None
    assert await cloud.terminate_instance(_host("gpu-a1")) == "terminated"
    assert sum(r.startswith("DELETE") for r in gce.requests) == 1


async def test_gce_unknown_vm_state_raises_not_found(gce: FakeGce) -> None:
    with pytest.raises(CloudActionError) as info:
        await _cloud(gce).instance_state(_host("gpu-zz"))

    assert info.value.instance_id == "gpu-zz"
    assert "404" in str(info.value)
    assert "was not found" in str(info.value)


async def test_gce_denied_stop_hints_at_permission(gce: FakeGce) -> None:
    gce.add_instance(PROJECT, ZONE, "gpu-a1")
    gce.deny("stop")

    with pytest.raises(CloudActionError, match="403") as info:
        await _cloud(gce).stop_instance(_host("gpu-a1"))

    assert "compute.instances.stop" in (info.value.hint or "")
    assert gce.status_of(PROJECT, ZONE, "gpu-a1") == "RUNNING"


async def test_gce_failed_operation_raises_with_its_message(gce: FakeGce) -> None:
    gce.add_instance(PROJECT, ZONE, "gpu-a1")
    gce.fail_operations("instance is in use by a reservation")

    with pytest.raises(CloudActionError, match="BAD REQUEST"):
        await _cloud(gce).stop_instance(_host("gpu-a1"))


async def test_gce_identity_without_project_raises(gce: FakeGce) -> None:
    host = _host("gpu-a1")
    host.project = ""

    with pytest.raises(CloudActionError, match="lacks a project or zone"):
        await _cloud(gce).stop_instance(host)


@pytest.mark.parametrize(
    ("instance_id", "hostname", "expected"),
    [
        ("1234567890123", "gpu-a1.us-central1-a.c.p.internal", "gpu-a1"),
        ("1234567890123", "gpu-a1", "gpu-a1"),
        ("gpu-b2", "other", "gpu-b2"),
    ],
)
def test_gce_instance_name_prefers_name_then_hostname(
    instance_id: str, hostname: str, expected: str
) -> None:
    host = pb.HostIdentity(instance_id=instance_id, hostname=hostname)

    assert gce_instance_name(host) == expected


def test_gce_instance_name_without_any_name_raises() -> None:
    host = pb.HostIdentity(instance_id="1234567890123", hostname="10.0.0.5")

    with pytest.raises(CloudActionError, match="cannot tell the GCE instance name"):
        gce_instance_name(host)
