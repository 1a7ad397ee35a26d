"""The provisioning section's checks, and what a job hears when no offer can
be launched, without a cloud."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from gpufleet.broker.config import load_broker_config
from gpufleet.broker.events import EventBus
from gpufleet.broker.instancestore import InstanceStore
from gpufleet.broker.market import MarketCatalog
from gpufleet.broker.market_config import GcpMarketConfig, MarketConfig
from gpufleet.broker.provisioner import Provisioner
from gpufleet.broker.provisioning_config import (
    AwsLaunchConfig,
    GcpLaunchConfig,
    ProvisioningConfig,
)
from gpufleet.broker.store import Store
from gpufleet.errors import ConfigError
from gpufleet.proto import pb


def _config(**fields: Any) -> ProvisioningConfig:
    values: dict[str, Any] = {
        "enabled": True,
        "broker_address": "broker.lab.internal:50051",
        "aws": AwsLaunchConfig(images={"us-east-1": "ami-1"}),
    }
    values.update(fields)
    return ProvisioningConfig(**values)


def test_default_provisioning_values_pass() -> None:
    assert _config().problems() == []


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"broker_address": "host:99999"},
            "provisioning.broker_address: must be HOST:PORT that launched hosts "
            "can reach, with a port in 1..65535, got 'host:99999'",
        ),
        (
            {"broker_address": "host:0"},
            "provisioning.broker_address: must be HOST:PORT",
        ),
        (
            {"retry_after_s": math.inf},
            "provisioning.retry_after_s: must be a finite number in [5, 3600], got inf",
        ),
        (
            {"retry_after_s": math.nan},
            "provisioning.retry_after_s: must be a finite number in [5, 3600], got nan",
        ),
        (
            {"idle_release_s": 1e-9},
            "provisioning.idle_release_s: must be a finite number in [5, 604800], "
            "got 1e-09",
        ),
        (
            {"enroll_timeout_s": 10.0},
            "provisioning.enroll_timeout_s: must be a finite number in "
            "[60, 86400], got 10.0",
        ),
        (
            {"max_instances": 0},
            "provisioning.max_instances: must be a whole number in [1, 1000], got 0",
        ),
        (
            {"aws": AwsLaunchConfig(images={"us-east-1": "ami-1"}, disk_gb=-5)},
            "provisioning.aws.disk_gb: must be a whole number in [1, 16384], got -5",
        ),
        (
            {"gcp": GcpLaunchConfig(disk_gb=5)},
            "provisioning.gcp.disk_gb: must be a whole number in [10, 65536], got 5",
        ),
        (
            {"aws": AwsLaunchConfig(images={"us-east-1": " "})},
            "provisioning.aws.images: no AMI for region us-east-1",
        ),
        (
            {"tls_cert": Path(__file__)},
            "provisioning.tls_cert, tls_key: set both or neither",
        ),
    ],
)
def test_provisioning_refuses_values_out_of_range(
    fields: dict[str, Any], expected: str
) -> None:
    """Each bad value is named with its range; NaN and inf are never in one."""
    [problem] = _config(**fields).problems()
    assert problem.startswith(expected)


def test_broker_config_with_bad_provisioning_numbers_is_refused(
    tmp_path: Path,
) -> None:
    """The testers' YAML stops the broker at start, every field named."""
    path = tmp_path / "broker.yaml"
    path.write_text(
        "market: {enabled: true}\n"
        "provisioning:\n"
        "  enabled: true\n"
        "  broker_address: 'host:99999'\n"
        "  retry_after_s: .inf\n"
        "  idle_release_s: 1e-9\n"
        "  aws: {images: {us-east-1: ami-1}, disk_gb: -5}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_broker_config(path)
    fields = [p.split(":")[0] for p in caught.value.problems]
    assert fields == [
        "provisioning.broker_address",
        "provisioning.idle_release_s",
        "provisioning.retry_after_s",
        "provisioning.aws.disk_gb",
    ]


@pytest.fixture
async def provisioner(tmp_path: Path) -> Any:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    await store.open()
    tasks: list[asyncio.Task[None]] = []

    def make(cfg: ProvisioningConfig, market: MarketConfig) -> Provisioner:
        catalog = MarketCatalog(market)
        catalog.load_tables()
        return Provisioner(
            cfg,
            catalog,
            InstanceStore(store),
            clouds=lambda provider: None,
            events=EventBus(store),
            spawn=lambda coro, name: tasks.append(asyncio.create_task(coro)),
            fleet="lab",
        )

    try:
        yield make
    finally:
        assert tasks == []  # nothing was launched
        await store.close()


def _spec(**fields: Any) -> pb.JobSpec:
    return pb.JobSpec(name="train", argv=["python", "train.py"], gpus=1, **fields)


async def test_no_offer_names_the_cloud_without_a_provisioning_section(
    provisioner: Any,
) -> None:
    """GCP has a100 offers but no provisioning.gcp, AWS has one in a region
    without an AMI: the job hears both, not 'no offer has accelerator a100'."""
    prov = provisioner(_config(), MarketConfig(enabled=True))
    outcome = await prov.request(
        "a", _spec(accelerator="a100"), lifecycles=("on-demand",)
    )
    assert outcome == (
        "no-offer: the catalog has 196 offer(s) with 1 GPU(s), on-demand, "
        "accelerator a100, but none this broker can launch: 1 on AWS, in "
        "us-west-2, which has no AMI in provisioning.aws.images; 195 on GCP (in "
        "africa-south1, asia-east1, asia-east2, asia-northeast1 and 35 more), "
        "which has no provisioning.gcp section: set provisioning.gcp.project "
        "(or market.gcp.project) and provisioning.gcp.image"
    )


async def test_no_offer_says_when_a_configured_cloud_has_none(
    provisioner: Any,
) -> None:
    """Only GCP lists rtx6000: AWS, configured, is said to have none."""
    prov = provisioner(_config(), MarketConfig(enabled=True))
    outcome = await prov.request(
        "a", _spec(accelerator="rtx6000"), lifecycles=("spot",)
    )
    assert "on GCP (in " in outcome
    assert outcome.endswith("provisioning.gcp.image; AWS has none")


async def test_no_offer_names_aws_regions_without_an_image(provisioner: Any) -> None:
    """The on-demand a10g offers are in us-east-1 and us-west-2; an AMI for
    eu-west-1 only launches none of them."""
    cfg = _config(aws=AwsLaunchConfig(images={"eu-west-1": "ami-1"}))
    prov = provisioner(cfg, MarketConfig(enabled=True))
    outcome = await prov.request(
        "a", _spec(accelerator="a10g"), lifecycles=("on-demand",)
    )
    assert "on AWS, in us-east-1, us-west-2, which has no AMI in " in outcome
    assert outcome.endswith("provisioning.aws.images")


async def test_no_offer_says_gcp_regions_need_zones(provisioner: Any) -> None:
    """GCP prices are regional: without market.gcp.zones nothing launches."""
    cfg = _config(aws=AwsLaunchConfig(), gcp=GcpLaunchConfig(project="lab"))
    market = MarketConfig(enabled=True, gcp=GcpMarketConfig(regions=["us-central1"]))
    prov = provisioner(cfg, market)
    outcome = await prov.request("a", _spec(accelerator="l4"), lifecycles=("spot",))
    assert "on GCP, priced per region (us-central1): list zones" in outcome
    assert "market.gcp.zones" in outcome


async def test_no_offer_without_any_matching_offer_says_what_was_asked(
    provisioner: Any,
) -> None:
    prov = provisioner(_config(), MarketConfig(enabled=True))
    outcome = await prov.request("a", _spec(accelerator="tpu"), lifecycles=("spot",))
    assert outcome == (
        "no-offer: no offer in the catalog has 1 GPU(s), spot, accelerator tpu"
    )
