"""The provisioner under faults: nonsense from EC2, races, a hostile agent."""

# ruff: noqa: F401, F811 (the fixtures proxy and store come from test_provisioner)

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from gpufleet.broker import instancestore as st
from gpufleet.broker.clouds import aws as aws_cloud
from gpufleet.broker.clouds.aws import AwsActions
from tests.broker.test_provisioner import (
    Clock,
    _catalog,
    _host,
    _instance,
    _launched,
    _provisioner,
    _spec,
    proxy,
    store,
)
from tests.fakes.ec2_faults import Ec2FaultProxy
from tests.fakes.moto_ec2 import moto_ec2_url

NS = 'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"'


def _garble(proxy: Ec2FaultProxy, action: str, body: str) -> None:
    """Makes ``action`` answer HTTP 200 with ``body``: well-formed, but not
    what the API promises."""
    forward = proxy.forward

    def garbled(method: str, path: str, headers: Any, data: bytes) -> Any:
        if f"Action={action}".encode() in data:
            return 200, [("Content-Type", "text/xml")], body.encode()
        return forward(method, path, headers, data)

    proxy.forward = garbled  # type: ignore[method-assign]


async def test_two_requests_in_one_tick_respect_the_instance_limit(
    proxy: Ec2FaultProxy,
    store: Any,
) -> None:
    """At max_instances=1 the second request of the same tick waits."""
    catalog = await _catalog(proxy.url)
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock(), max_instances=1)
    assert await prov.request("a", _spec(), lifecycles=("spot",)) == "launching"
    assert await prov.request("b", _spec(), lifecycles=("spot",)) == (
        "at-limit: 1 instance(s) live or launching, provisioning.max_instances is 1"
    )
    await _launched(prov, tasks)
    assert len(prov.live()) == 1


async def test_a_launch_in_flight_counts_once_against_the_instance_limit(
    proxy: Ec2FaultProxy,
    store: Any,
) -> None:
    """While EC2 answers a first launch (its instance already recorded), a
    second job still launches at max_instances=2; a third waits."""
    release = threading.Event()
    forward = proxy.forward

    def slow(method: str, path: str, headers: Any, data: bytes) -> Any:
        if b"Action=RunInstances" in data:
            release.wait(10)
        return forward(method, path, headers, data)

    proxy.forward = slow  # type: ignore[method-assign]
    catalog = await _catalog(proxy.url)
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock(), max_instances=2)
    try:
        assert await prov.request("a", _spec(), lifecycles=("spot",)) == "launching"
        for _ in range(500):
            if [v.state for v in prov.live()] == [st.LAUNCHING]:
                break
            await asyncio.sleep(0.01)
        assert [v.state for v in prov.live()] == [st.LAUNCHING]
        assert await prov.request("b", _spec(), lifecycles=("spot",)) == "launching"
        assert await prov.request("c", _spec(), lifecycles=("spot",)) == (
            "at-limit: 2 instance(s) live or launching, provisioning.max_instances is 2"
        )
    finally:
        release.set()
    await _launched(prov, tasks)
    assert sorted(v.job_id for v in prov.live()) == ["a", "b"]


async def test_a_tls_file_gone_at_launch_fails_the_try_instead_of_sticking(
    proxy: Ec2FaultProxy, store: Any, tmp_path: Path
) -> None:
    """A key file removed after the broker started fails that launch with a
    reason; nothing stays 'launching' and the limit is free again."""
    catalog = await _catalog(proxy.url)
    pem = "-----BEGIN X-----\nabc\n-----END X-----\n"
    files = {}
    for name in ("ca", "cert", "key"):
        path = tmp_path / f"{name}.pem"
        path.write_text(pem)
        files[f"tls_{name}"] = path
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock(), **files)
    files["tls_key"].unlink()
    await prov.request("j", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    assert prov.live() == []
    [failed] = prov.instances.values()
    assert failed.state == st.FAILED
    assert "startup script" in failed.detail
    assert proxy.actions("RunInstances") == []


async def test_an_agent_with_a_stolen_launch_label_gets_nothing(
    proxy: Ec2FaultProxy, store: Any
) -> None:
    """A host whose label names another instance's launch neither enrolls
    it nor gets the real instance terminated while the job runs there."""
    catalog = await _catalog(proxy.url)
    clock = Clock()
    prov, tasks = _provisioner(proxy.url, catalog, store, clock)
    await prov.request("victim", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    [view] = prov.live()
    real, spoof = _host(view), _host(view)
    spoof.identity.host_id = spoof.identity.instance_id = "i-attacker"
    await prov.tick({spoof.host_id: spoof}, lambda h: False)
    assert view.state == st.BOOTING
    assert prov.reserved_for("i-attacker") == ""
    hosts = {spoof.host_id: spoof, real.host_id: real}
    await prov.tick(hosts, lambda h: h == real.host_id)
    assert view.state == st.ENROLLED
    assert view.host_id == real.host_id
    clock.now += 400
    await prov.tick(hosts, lambda h: h == real.host_id)
    assert _instance(proxy.url, view.instance_id)["State"]["Name"] == "running"


async def test_a_sweep_listing_during_a_launch_leaves_it_alone(
    proxy: Ec2FaultProxy, store: Any
) -> None:
    """An instance whose launch finishes while a sweep is listing is not
    taken for an orphan."""
    catalog = await _catalog(proxy.url)
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock())
    cloud = prov._clouds("aws")
    listing = cloud.list_launched
    gate = asyncio.Event()

    async def slow_list(*args: Any) -> Any:
        refs = await listing(*args)
        await gate.wait()
        return refs + await listing(*args)

    cloud.list_launched = slow_list
    sweep = asyncio.create_task(prov.sweep([("aws", "us-east-1", "")]))
    await asyncio.sleep(0.1)
    await prov.request("j", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    [view] = prov.live()
    gate.set()
    assert await sweep == []
    assert _instance(proxy.url, view.instance_id)["State"]["Name"] == "running"
    assert prov.instances[view.launch_id] is view


async def test_a_garbled_terminate_reply_never_escapes_the_tick(
    proxy: Ec2FaultProxy, store: Any
) -> None:
    """A terminate answered without its result is retried later; the tick
    that drives every job goes on."""
    catalog = await _catalog(proxy.url)
    clock = Clock()
    prov, tasks = _provisioner(proxy.url, catalog, store, clock)
    await prov.request("j", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    [view] = prov.live()
    body = f"<TerminateInstancesResponse {NS}><requestId>x</requestId>"
    _garble(proxy, "TerminateInstances", body + "</TerminateInstancesResponse>")
    clock.now += 601
    for _ in range(3):
        await prov.tick({}, lambda h: False)
        clock.now += 1
    assert view.state == st.RELEASING
    assert "terminate failed" in view.detail
    assert view.detail.count("terminate failed") == 1


async def test_a_run_instances_reply_without_instances_fails_the_try(
    proxy: Ec2FaultProxy, store: Any
) -> None:
    """A launch answered with no instance is a failed try, not a record
    stuck in 'launching' that holds the limit."""
    catalog = await _catalog(proxy.url)
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock(), max_instances=1)
    body = f"<RunInstancesResponse {NS}><requestId>x</requestId><instancesSet/>"
    _garble(proxy, "RunInstances", body + "</RunInstancesResponse>")
    await prov.request("j", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    assert prov.live() == []
    assert {v.state for v in prov.instances.values()} == {st.FAILED}
    assert await prov.request("k", _spec(), lifecycles=("spot",)) == "launching"
    await _launched(prov, tasks)


async def test_an_instance_ec2_no_longer_knows_is_released(
    proxy: Ec2FaultProxy, store: Any
) -> None:
    """EC2 forgets terminated instances after about an hour: terminating
    one it answers NotFound for ends released, and frees its slot."""
    catalog = await _catalog(proxy.url)
    clock = Clock()
    prov, tasks = _provisioner(proxy.url, catalog, store, clock, max_instances=1)
    await prov.request("j", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    proxy.fail("DescribeInstances", "InvalidInstanceID.NotFound", "does not exist")
    clock.now += 700
    await prov.tick({}, lambda h: False)
    [view] = prov.instances.values()
    assert view.state == st.RELEASED


async def test_an_instance_for_a_cancelled_job_is_released_before_it_enrolls(
    proxy: Ec2FaultProxy, store: Any
) -> None:
    """A job that ended while its instance booted does not leave the
    instance running until the enroll timeout."""
    catalog = await _catalog(proxy.url)
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock())
    await prov.request("gone", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    [view] = prov.live()
    await prov.tick({}, lambda h: False, lambda job_id: job_id == "gone")
    assert view.state == st.RELEASED
    assert _instance(proxy.url, view.instance_id)["State"]["Name"] == "terminated"


async def test_a_restart_during_the_launch_call_finds_the_instance_by_its_tag(
    proxy: Ec2FaultProxy, store: Any
) -> None:
    """A record left 'launching' by a broker that died mid-call gets its
    instance id from the launch-id tag, so its agent can enroll and, if it
    never does, the instance is terminated rather than forgotten."""
    catalog = await _catalog(proxy.url)
    clock = Clock()
    prov, tasks = _provisioner(proxy.url, catalog, store, clock)
    await prov.request("j", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    [view] = prov.live()
    instance_id = view.instance_id
    view.state = st.LAUNCHING
    view.instance_id = ""
    await prov.store.save(view.launch_id, view)
    again, _ = _provisioner(proxy.url, catalog, store, clock)
    await again.load()
    clock.now += 1000
    await again.tick({}, lambda h: False)
    after = again.instances[view.launch_id]
    assert after.instance_id == instance_id
    assert after.state == st.RELEASED
    assert _instance(proxy.url, instance_id)["State"]["Name"] == "terminated"


def _hang(proxy: Ec2FaultProxy, action: str, release: threading.Event) -> None:
    """Makes ``action`` hang until ``release`` is set: an EC2 endpoint that
    accepts the call and never answers. The client has given up by then, so
    what the proxy writes back goes nowhere, and its errors are dropped."""
    forward = proxy.forward

    def hang(method: str, path: str, headers: Any, data: bytes) -> Any:
        if f"Action={action}".encode() in data:
            release.wait(10)
            return 503, [], b""
        return forward(method, path, headers, data)

    proxy.forward = hang  # type: ignore[method-assign]
    proxy._server.handle_error = lambda *args: None  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("bound", "reason"),
    [
        ("action_timeout_s", "launch did not finish within 0.1 s"),
        ("read_timeout_s", "EC2 call failed in region us-east-1: Read timeout"),
    ],
)
async def test_a_launch_that_times_out_says_so(
    proxy: Ec2FaultProxy,
    store: Any,
    monkeypatch: pytest.MonkeyPatch,
    bound: str,
    reason: str,
) -> None:
    """Whether our own bound or botocore's read timeout ends the call, the
    record says which launch timed out, not 'aws action on fleet lab
    failed'."""
    catalog = await _catalog(proxy.url)
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock())
    if bound == "read_timeout_s":
        monkeypatch.setattr(aws_cloud, "READ_TIMEOUT_S", 0.1)
        monkeypatch.setattr(aws_cloud, "MAX_ATTEMPTS", 1)
        actions = AwsActions(endpoint_url=proxy.url)
    else:
        actions = AwsActions(endpoint_url=proxy.url, action_timeout_s=0.1)
    prov._clouds = lambda provider: actions
    release = threading.Event()
    _hang(proxy, "DescribeInstances", release)
    try:
        await prov.request("j", _spec(), lifecycles=("spot",))
        await _launched(prov, tasks)
    finally:
        release.set()
    [failed] = prov.instances.values()
    assert failed.state == st.FAILED
    where = f"aws {failed.zone} g5.xlarge"
    assert failed.detail.startswith(
        f"timeout: launch of spot {where} timed out: {reason}"
    ), failed.detail
    assert "action on" not in failed.detail
