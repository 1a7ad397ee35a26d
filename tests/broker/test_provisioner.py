"""The provisioner against moto's EC2: launch, fall through, release, sweep."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from gpufleet.broker import instancestore as st
from gpufleet.broker.clouds.aws import AwsActions
from gpufleet.broker.events import EventBus
from gpufleet.broker.instancestore import InstanceStore
from gpufleet.broker.market import MarketCatalog
from gpufleet.broker.market_config import AwsMarketConfig, MarketConfig
from gpufleet.broker.provisioner import LAUNCH_LABEL, Provisioner
from gpufleet.broker.provisioning_config import AwsLaunchConfig, ProvisioningConfig
from gpufleet.broker.store import Store
from gpufleet.proto import pb
from tests.fakes.ec2_faults import Ec2FaultProxy, ec2_fault_proxy
from tests.fakes.moto_ec2 import AMI_ID, moto_ec2_url  # noqa: F401

REGION = "us-east-1"
FLEET = "lab"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def proxy(moto_ec2_url: str) -> Iterator[Ec2FaultProxy]:  # noqa: F811
    with ec2_fault_proxy(moto_ec2_url) as p:
        yield p


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def _catalog(url: str) -> MarketCatalog:
    cfg = MarketConfig(
        enabled=True,
        aws=AwsMarketConfig(regions=[REGION], instance_types=["g5.xlarge"]),
    )
    catalog = MarketCatalog(cfg, aws_endpoint_url=url)
    catalog.load_tables()
    assert await catalog.refresh() == []
    return catalog


def _provisioner(
    url: str, catalog: MarketCatalog, store: Store, clock: Clock, **overrides: Any
) -> tuple[Provisioner, list[asyncio.Task[None]]]:
    cfg = ProvisioningConfig(
        enabled=True,
        broker_address="broker.lab.internal:50051",
        agent_package="gpufleet[agent,nvidia]",
        max_instances=overrides.pop("max_instances", 4),
        enroll_timeout_s=600,
        idle_release_s=300,
        aws=AwsLaunchConfig(images={REGION: AMI_ID}),
        **overrides,
    )
    tasks: list[asyncio.Task[None]] = []
    actions = AwsActions(endpoint_url=url)
    prov = Provisioner(
        cfg,
        catalog,
        InstanceStore(store),
        clouds=lambda provider: actions,
        events=EventBus(store),
        spawn=lambda coro, name: tasks.append(asyncio.create_task(coro, name=name)),
        fleet=FLEET,
        clock=clock,
    )
    return prov, tasks


def _spec(**fields: Any) -> pb.JobSpec:
    return pb.JobSpec(name="train", argv=["python", "train.py"], gpus=1, **fields)


def _ec2(url: str) -> Any:
    return boto3.client("ec2", region_name=REGION, endpoint_url=url)


def _instance(url: str, instance_id: str) -> dict[str, Any]:
    reply = _ec2(url).describe_instances(InstanceIds=[instance_id])
    return dict(reply["Reservations"][0]["Instances"][0])


async def _launched(prov: Provisioner, tasks: list[asyncio.Task[None]]) -> None:
    await asyncio.gather(*tasks)
    tasks.clear()


def _host(view: pb.LaunchedInstance, status: str = "connected") -> Any:
    from gpufleet.broker.fleet import HostState, host_facts
    from gpufleet.broker.state import HostReaper

    identity = pb.HostIdentity(
        host_id=view.instance_id,
        provider="aws",
        region=view.region,
        zone=view.zone,
        instance_id=view.instance_id,
        instance_type=view.instance_type,
        spot=view.lifecycle == "spot",
    )
    return HostState(
        identity=identity,
        labels={LAUNCH_LABEL: view.launch_id},
        agent_version="test",
        reaper=HostReaper(host_facts(identity, {})),
        status=status,
    )


async def test_provisioner_launches_the_best_spot_offer_with_the_startup_script(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """A job without a host gets a tagged spot instance whose user data
    enrolls an agent with the broker's address and the launch id."""
    catalog = await _catalog(proxy.url)
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock())
    outcome = await prov.request("train-1", _spec(), lifecycles=("spot",))
    assert outcome == "launching"
    assert await prov.request("train-1", _spec(), lifecycles=("spot",)) == "pending"
    await _launched(prov, tasks)
    [view] = prov.live()
    assert view.state == st.BOOTING
    assert view.lifecycle == "spot"
    assert view.zone.startswith(REGION)
    instance = _instance(proxy.url, view.instance_id)
    assert instance["InstanceLifecycle"] == "spot"
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["gpufleet:launch-id"] == view.launch_id
    assert tags["gpufleet:fleet"] == FLEET
    attr = _ec2(proxy.url).describe_instance_attribute(
        InstanceId=view.instance_id, Attribute="userData"
    )
    script = base64.b64decode(attr["UserData"]["Value"]).decode()
    assert "broker.lab.internal:50051" in script
    assert view.launch_id in script
    # The record survives a broker restart.
    again, _ = _provisioner(proxy.url, catalog, store, Clock())
    await again.load()
    assert again.instances[view.launch_id].instance_id == view.instance_id


async def test_provisioner_falls_through_a_zone_without_capacity_and_avoids_one(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """No capacity in one zone and the zone just preempted avoided: the
    launch lands in a third zone, and the failed try is on record."""
    catalog = await _catalog(proxy.url)
    zones = sorted({o.zone for o in catalog.offers(provider="aws", lifecycle="spot")})
    assert len(zones) >= 3, zones
    ranked = [
        o.zone
        for _, o in catalog.rank(
            catalog.offers(provider="aws", lifecycle="spot"), lifecycles=("spot",)
        )
    ]
    first, second = ranked[0], next(z for z in ranked if z != ranked[0])
    proxy.fail("RunInstances", "InsufficientInstanceCapacity", zone=second)
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock())
    await prov.request("train-2", _spec(), lifecycles=("spot",), avoid_zone=first)
    await _launched(prov, tasks)
    [view] = prov.live()
    assert view.zone not in (first, second)
    failed = [v for v in prov.instances.values() if v.state == st.FAILED]
    assert [v.zone for v in failed] == [second]
    assert failed[0].detail.startswith("capacity")


async def test_provisioner_marks_spot_failed_then_launches_on_demand(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """When every spot offer fails the job's spot is marked unavailable, and
    an on-demand request launches an on-demand instance."""
    catalog = await _catalog(proxy.url)
    proxy.fail("RunInstances", "InsufficientInstanceCapacity", instance_type="")
    clock = Clock()
    prov, tasks = _provisioner(proxy.url, catalog, store, clock)
    await prov.request("train-3", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    assert prov.live() == []
    assert prov.spot_failed_recently("train-3")
    assert await prov.request("train-3", _spec(), lifecycles=("on-demand",)) == (
        "backoff"
    )
    proxy.faults.clear()
    clock.now += 61
    assert await prov.request("train-3", _spec(), lifecycles=("on-demand",)) == (
        "launching"
    )
    await _launched(prov, tasks)
    [view] = prov.live()
    assert view.lifecycle == "on-demand"
    assert "InstanceLifecycle" not in _instance(proxy.url, view.instance_id)


async def test_provisioner_stops_at_an_auth_error_instead_of_trying_every_zone(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """A permission error is not a capacity problem: one try, then back off."""
    catalog = await _catalog(proxy.url)
    proxy.fail("RunInstances", "UnauthorizedOperation")
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock())
    await prov.request("train-4", _spec(), lifecycles=("spot", "on-demand"))
    await _launched(prov, tasks)
    assert len(proxy.actions("RunInstances")) == 1
    [failed] = prov.instances.values()
    assert failed.state == st.FAILED
    assert "auth" in failed.detail


async def test_provisioner_explains_why_no_offer_fits(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """An impossible request says what was asked for, and launches nothing."""
    catalog = await _catalog(proxy.url)
    prov, _ = _provisioner(proxy.url, catalog, store, Clock())
    outcome = await prov.request(
        "train-5", _spec(accelerator="h100", max_usd_per_hour=0.5), lifecycles=("spot",)
    )
    assert outcome.startswith("no-offer")
    assert "accelerator h100" in outcome
    assert "at most 0.5 USD/h" in outcome
    assert proxy.actions("RunInstances") == []
    tiny = await prov.request(
        "train-6", _spec(max_usd_per_hour=1e-9), lifecycles=("spot",)
    )
    # Not "0.00", which would read as no limit.
    assert "at most 1e-09 USD/h" in tiny


async def test_provisioner_respects_the_instance_limit(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """At max_instances a further request launches nothing."""
    catalog = await _catalog(proxy.url)
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock(), max_instances=1)
    await prov.request("a", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    assert await prov.request("b", _spec(), lifecycles=("spot",)) == (
        "at-limit: 1 instance(s) live or launching, provisioning.max_instances is 1"
    )


async def test_provisioner_enrolls_then_releases_an_idle_host_and_a_silent_one(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """An agent carrying the launch label enrolls its instance; once no job
    runs there for idle_release_s it is terminated. An instance whose agent
    never enrolls is terminated after enroll_timeout_s."""
    catalog = await _catalog(proxy.url)
    clock = Clock()
    prov, tasks = _provisioner(proxy.url, catalog, store, clock)
    await prov.request("used", _spec(), lifecycles=("spot",))
    await prov.request("silent", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    used = next(v for v in prov.live() if v.job_id == "used")
    silent = next(v for v in prov.live() if v.job_id == "silent")
    host = _host(used)
    busy = {used.instance_id}
    await prov.tick({host.host_id: host}, lambda h: h in busy)
    assert used.state == st.ENROLLED
    assert prov.reserved_for(used.instance_id) == "used"
    clock.now += 400
    await prov.tick({host.host_id: host}, lambda h: h in busy)
    assert used.state == st.ENROLLED  # busy: kept
    busy.clear()
    await prov.tick({host.host_id: host}, lambda h: h in busy)
    clock.now += 301
    await prov.tick({host.host_id: host}, lambda h: h in busy)
    assert used.state == st.RELEASED
    assert _instance(proxy.url, used.instance_id)["State"]["Name"] == "terminated"
    clock.now += 600
    await prov.tick({host.host_id: host}, lambda h: False)
    assert silent.state == st.RELEASED
    assert "did not enroll" in silent.detail
    assert _instance(proxy.url, silent.instance_id)["State"]["Name"] == "terminated"


async def test_provisioner_retries_a_failed_release_until_it_works(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """A terminate call that fails leaves the record releasing; it is tried
    again after retry_after_s, so nothing is left running."""
    catalog = await _catalog(proxy.url)
    clock = Clock()
    prov, tasks = _provisioner(proxy.url, catalog, store, clock)
    await prov.request("job", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    [view] = prov.live()
    proxy.fail("TerminateInstances", "RequestLimitExceeded")
    clock.now += 601
    await prov.tick({}, lambda h: False)
    assert view.state == st.RELEASING
    proxy.faults.clear()
    await prov.tick({}, lambda h: False)
    assert view.state == st.RELEASING  # not before retry_after_s
    clock.now += 61
    await prov.tick({}, lambda h: False)
    assert view.state == st.RELEASED


async def test_sweep_terminates_tagged_instances_without_a_record(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """An instance tagged with the fleet that the broker has no record of
    (its launch outlived a crashed broker's database) is terminated; an
    untagged one is left alone."""
    ec2 = _ec2(proxy.url)
    tags = [
        {"Key": "gpufleet:fleet", "Value": FLEET},
        {"Key": "gpufleet:managed", "Value": "true"},
        {"Key": "gpufleet:launch-id", "Value": "gf-lost-0001"},
    ]
    orphan = ec2.run_instances(
        ImageId=AMI_ID,
        MinCount=1,
        MaxCount=1,
        InstanceType="g5.xlarge",
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"][0]["InstanceId"]
    mine = ec2.run_instances(
        ImageId=AMI_ID, MinCount=1, MaxCount=1, InstanceType="g5.xlarge"
    )["Instances"][0]["InstanceId"]
    catalog = await _catalog(proxy.url)
    prov, _ = _provisioner(proxy.url, catalog, store, Clock())
    swept = await prov.sweep([("aws", REGION, "")])
    assert swept == ["gf-lost-0001"]
    assert _instance(proxy.url, orphan)["State"]["Name"] == "terminated"
    assert _instance(proxy.url, mine)["State"]["Name"] == "running"


async def test_tick_sweeps_an_instance_whose_launch_was_recorded_as_failed(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """A launch call that timed out after EC2 started the instance leaves a
    failed record and a running instance; the periodic sweep (first at the
    first tick) terminates it."""
    ec2 = _ec2(proxy.url)
    tags = [
        {"Key": "gpufleet:fleet", "Value": FLEET},
        {"Key": "gpufleet:managed", "Value": "true"},
        {"Key": "gpufleet:launch-id", "Value": "gf-late-0002"},
    ]
    late = ec2.run_instances(
        ImageId=AMI_ID,
        MinCount=1,
        MaxCount=1,
        InstanceType="g5.xlarge",
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"][0]["InstanceId"]
    catalog = await _catalog(proxy.url)
    prov, tasks = _provisioner(proxy.url, catalog, store, Clock())
    prov.places = [("aws", REGION, "")]
    prov.instances["gf-late-0002"] = pb.LaunchedInstance(
        launch_id="gf-late-0002", provider="aws", region=REGION, state=st.FAILED
    )
    await prov.tick({}, lambda h: False)
    await asyncio.gather(*tasks)
    assert _instance(proxy.url, late)["State"]["Name"] == "terminated"
    assert prov.instances["gf-late-0002"].state == st.RELEASED
    assert "recorded as failed" in prov.instances["gf-late-0002"].detail


async def test_provisioner_launches_gce_spot_and_falls_through_a_stockout(
    store: Store,
) -> None:
    """On GCP the cheapest L4 offer's zone reports ZONE_RESOURCE_POOL_EXHAUSTED
    after the insert; the next zone gets a SPOT VM whose startup-script
    metadata carries the launch, and releasing it deletes it."""
    from gpufleet.broker.clouds.gcp import GceActions
    from gpufleet.broker.market_config import GcpMarketConfig
    from gpufleet.broker.provisioning_config import GcpLaunchConfig
    from tests.fakes.gce import running_fake_gce

    zones = ["us-east4-a", "us-east4-b", "us-central1-a"]
    cfg = MarketConfig(
        enabled=True,
        gcp=GcpMarketConfig(
            project="lab", zones=zones, machine_types=["g2-standard-4"]
        ),
    )
    catalog = MarketCatalog(cfg)
    catalog.load_tables()
    with running_fake_gce() as fake:
        fake.fail_insert("us-east4-a", "ZONE_RESOURCE_POOL_EXHAUSTED", "no L4 left")
        tasks: list[asyncio.Task[None]] = []
        actions = GceActions(endpoint=fake.endpoint)
        clock = Clock()
        prov = Provisioner(
            ProvisioningConfig(
                enabled=True,
                broker_address="broker.lab.internal:50051",
                gcp=GcpLaunchConfig(project="lab"),
            ),
            catalog,
            InstanceStore(store),
            clouds=lambda provider: actions,
            events=EventBus(store),
            spawn=lambda coro, name: tasks.append(asyncio.create_task(coro)),
            fleet=FLEET,
            clock=clock,
        )
        outcome = await prov.request(
            "train-g", _spec(accelerator="l4"), lifecycles=("spot",)
        )
        assert outcome == "launching"
        await _launched(prov, tasks)
        [view] = prov.live()
        assert view.provider == "gcp"
        assert view.zone == "us-east4-b"
        failed = [v for v in prov.instances.values() if v.state == st.FAILED]
        assert [v.zone for v in failed] == ["us-east4-a"]
        body = fake.body_of("lab", "us-east4-b", view.name)
        assert body is not None
        assert body["scheduling"]["provisioningModel"] == "SPOT"
        metadata = {i["key"]: i["value"] for i in body["metadata"]["items"]}
        assert view.launch_id in metadata["startup-script"]
        clock.now += 1000
        await prov.tick({}, lambda h: False)
        assert view.state == st.RELEASED
        assert fake.status_of("lab", "us-east4-b", view.name) is None


async def test_launches_pause_when_instances_keep_failing_to_enroll(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """Three instances in a row whose agent never came pause launching (a
    bad image or an unreachable broker address must not buy hosts forever);
    the job's request says what to check, and an event says so."""
    catalog = await _catalog(proxy.url)
    clock = Clock()
    prov, tasks = _provisioner(proxy.url, catalog, store, clock)
    for _ in range(3):
        assert await prov.request("j", _spec(), lifecycles=("spot",)) == "launching"
        await _launched(prov, tasks)
        clock.now += 601
        await prov.tick({}, lambda h: False)
    outcome = await prov.request("j", _spec(), lifecycles=("spot",))
    assert outcome.startswith("paused: the last 3 launched instances never enrolled")
    assert "provisioning.broker_address" in outcome
    # A job no offer fits says so, not that launching is paused.
    unmatched = await prov.request(
        "k", _spec(accelerator="tpu-v9"), lifecycles=("spot",)
    )
    assert unmatched.startswith("no-offer:")
    assert len(proxy.actions("RunInstances")) == 3
    events = await store.list_events(limit=100)
    assert "instance.launches-paused" in [e.kind for e in events]
    clock.now += 61
    assert await prov.request("j", _spec(), lifecycles=("spot",)) == "launching"
    await _launched(prov, tasks)


async def test_a_launched_host_noticed_before_a_job_ran_is_released_zone_skipped(
    proxy: Ec2FaultProxy, store: Store
) -> None:
    """A launched instance whose cloud announces reclaiming it while no job
    runs there is terminated at once, not after idle_release_s, and the next
    launch goes to another zone for a while."""
    catalog = await _catalog(proxy.url)
    clock = Clock()
    prov, tasks = _provisioner(proxy.url, catalog, store, clock)
    await prov.request("j", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    [first] = prov.live()
    host = _host(first)
    await prov.tick({host.host_id: host}, lambda h: False)
    assert first.state == st.ENROLLED
    host.leaving = True
    await prov.tick({host.host_id: host}, lambda h: False)
    assert first.state == st.RELEASED
    assert "announced it will take it back" in first.detail
    await prov.request("j", _spec(), lifecycles=("spot",))
    await _launched(prov, tasks)
    [second] = prov.live()
    assert second.zone != first.zone
