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

from gpufleet.config import require


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
            bool(re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", self.broker_address)),
            "provisioning.broker_address: must be HOST:PORT that launched hosts "
            f"can reach, got {self.broker_address!r}",
        )
        require(
            p,
            bool(self.agent_package.strip()),
            "provisioning.agent_package: must name what pip installs",
        )
        require(
            p,
            1 <= self.max_instances <= 1000,
            f"provisioning.max_instances: must be in 1..1000, got {self.max_instances}",
        )
        for name in ("enroll_timeout_s", "idle_release_s", "retry_after_s"):
            value = getattr(self, name)
            require(p, value > 0, f"provisioning.{name}: must be > 0, got {value}")
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
        return p
