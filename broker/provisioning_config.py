"""The ``provisioning`` section of the broker's configuration.

Nested into the broker configuration as ``provisioning:``; what it does is
in ``provisioner.py`` and docs/provisioning.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.config import range_problem, require

# Booting takes about a minute on EC2 and GCE before the startup script even
# runs; a shorter enroll timeout terminates every instance it launches.
MIN_ENROLL_TIMEOUT_S = 60.0
# The job manager places jobs once a second: a launched host must stay up
# for a few ticks so that the job it was launched for can land on it.
MIN_IDLE_RELEASE_S = 5.0
MAX_IDLE_RELEASE_S = 7 * 86400.0
# Each retry may call RunInstances for up to 8 offers, and a release that
# failed is retried as often: a few seconds apart at least keeps the broker
# clear of the clouds' API rate limits. Launch pauses double from this value
# up to an hour, the longest wait that still makes sense.
MIN_RETRY_AFTER_S = 5.0
MAX_RETRY_AFTER_S = 3600.0
# Root volume sizes the clouds accept, in GiB: EBS gp3 1 to 16,384 (EBS
# volume types); GCE pd-balanced 10 to 65,536 (Persistent Disk limits).
AWS_DISK_GB = (1, 16384)
GCP_DISK_GB = (10, 65536)


@dataclass
class AwsLaunchConfig:
    """What an EC2 launch needs beyond the offer."""

    # AMI per region (AMIs are regional): an image with python3 >= 3.11 and
    # the NVIDIA driver, e.g. a Deep Learning Base AMI.
    images: dict[str, str] = field(default_factory=dict)
    subnet_ids: dict[str, str] = field(default_factory=dict)  # zone -> subnet
    security_group_ids: list[str] = field(default_factory=list)
    iam_instance_profile: str = ""
    key_name: str = ""
    disk_gb: int = 100


@dataclass
class GcpLaunchConfig:
    """What a GCE launch needs beyond the offer."""

    project: str = ""
    image: str = "projects/ml-images/global/images/family/common-cu124-debian-11"
    network: str = ""
    subnetwork: str = ""
    service_account: str = ""
    disk_gb: int = 100


@dataclass
class ProvisioningConfig:
    """The ``provisioning`` section of the broker configuration."""

    enabled: bool = False
    # The address launched agents dial; the broker's own listen address is
    # usually loopback or private, so it must be given.
    broker_address: str = ""
    # What the startup script installs with pip: a requirement or a wheel URL.
    agent_package: str = "gpufleet[agent,nvidia]"
    max_instances: int = 4
    enroll_timeout_s: float = 900.0
    idle_release_s: float = 600.0
    retry_after_s: float = 60.0
    avoid_preempted_zone: bool = True
    # False: never launch on-demand capacity, whatever a policy chooses.
    on_demand: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    # Merged into each launched agent's agent.yaml (collector, kernels, ...).
    agent_config: Any = field(default_factory=dict)
    # Written onto launched hosts for mutual TLS with the broker.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    aws: AwsLaunchConfig = field(default_factory=AwsLaunchConfig)
    gcp: GcpLaunchConfig = field(default_factory=GcpLaunchConfig)

    def problems(self) -> list[str]:
        """What is wrong with this section, each naming its field."""
        p: list[str] = []
        if not self.enabled:
            return p
        require(
            p,
            _port_of(self.broker_address) is not None,
            "provisioning.broker_address: must be HOST:PORT that launched hosts "
            f"can reach, with a port in 1..65535, got {self.broker_address!r}",
        )
        require(
            p,
            bool(self.agent_package.strip()),
            "provisioning.agent_package: must name what pip installs",
        )
        checks = (
            range_problem("provisioning.max_instances", self.max_instances, 1, 1000),
            range_problem(
                "provisioning.enroll_timeout_s",
                self.enroll_timeout_s,
                MIN_ENROLL_TIMEOUT_S,
                86400,
            ),
            range_problem(
                "provisioning.idle_release_s",
                self.idle_release_s,
                MIN_IDLE_RELEASE_S,
                MAX_IDLE_RELEASE_S,
            ),
            range_problem(
                "provisioning.retry_after_s",
                self.retry_after_s,
                MIN_RETRY_AFTER_S,
                MAX_RETRY_AFTER_S,
            ),
            range_problem("provisioning.aws.disk_gb", self.aws.disk_gb, *AWS_DISK_GB),
            range_problem("provisioning.gcp.disk_gb", self.gcp.disk_gb, *GCP_DISK_GB),
        )
        p.extend(why for why in checks if why is not None)
        for region, image in self.aws.images.items():
            require(
                p,
                bool(image.strip()),
                f"provisioning.aws.images: no AMI for region {region}; give one "
                "or leave the region out",
            )
        require(
            p,
            isinstance(self.agent_config, Mapping),
            "provisioning.agent_config: must be a mapping of agent settings",
        )
        for name in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(self, name)
            require(
                p,
                value is None or Path(value).is_file(),
                f"provisioning.{name}: no such file: {value}",
            )
        require(
            p,
            (self.tls_cert is None) == (self.tls_key is None),
            "provisioning.tls_cert, tls_key: set both or neither",
        )
        return p


def _port_of(address: str) -> int | None:
    """The port of HOST:PORT (an IPv6 host in brackets), None if malformed."""
    if not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", address):
        return None
    port = int(address.rpartition(":")[2])
    return port if 1 <= port <= 65535 else None
