"""The broker's configuration: listen addresses, state store, integrations.

Read by ``gpufleet broker serve`` from ``/etc/gpufleet/broker.yaml`` (or the
file named by ``GPUFLEET_BROKER_CONFIG``), ``GPUFLEET_BROKER_*`` variables
and flags.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.broker.market_config import MarketConfig
from gpufleet.broker.provisioning_config import ProvisioningConfig
from gpufleet.config import load_validated, require
from gpufleet.errors import ConfigError


def default_state_dir() -> Path:
    """Where the broker keeps its database and admin token by default."""
    env = os.environ.get("GPUFLEET_STATE_DIR")
    if env:
        return Path(env)
    system = Path("/var/lib/gpufleet")
    if os.access(system if system.exists() else system.parent, os.W_OK):
        return system
    return Path.home() / ".local" / "state" / "gpufleet"


@dataclass
class ServerTlsConfig:
    """Server certificate; with ``ca`` set, agents must present a client
    certificate signed by it (mutual TLS)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def enabled(self) -> bool:
        return any((self.ca, self.cert, self.key))


@dataclass
class BrokerConfig:
    """Everything ``gpufleet broker serve`` needs."""

    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"
    state_dir: Path = field(default_factory=default_state_dir)
    database_url: str | None = None
    fleet: str = "default"
    mqtt_url: str | None = None
    admin_token: str | None = None
    admin_token_file: Path | None = None
    policy_file: Path | None = None
    prices_file: Path | None = None
    aws_endpoint_url: str | None = None
    gce_endpoint: str | None = None
    # The heartbeat interval grows with the fleet so that a large fleet does
    # not flood the broker with heartbeats; see fleet.heartbeat_interval_s.
    heartbeat_interval_s: float = 5.0
    lost_after_intervals: int = 3
    history_bucket_s: float = 60.0
    history_retention_s: float = 14 * 86400.0
    allow_insecure_remote: bool = False
    tls: ServerTlsConfig = field(default_factory=ServerTlsConfig)
    log_level: str = "info"
    # The spot market: prices and risks (market), and launching hosts for
    # jobs that have none (provisioning). Both are off by default.
    market: MarketConfig = field(default_factory=MarketConfig)
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'gpufleet.db'}"

    @property
    def token_path(self) -> Path:
        return self.admin_token_file or self.state_dir / "admin.token"

    def validate(self, source: str, problems: list[str] | None = None) -> None:
        """Raises ConfigError listing ``problems`` and every inconsistent field."""
        p: list[str] = list(problems or [])
        for name in ("listen", "metrics_listen"):
            value = getattr(self, name)
            require(
                p,
                _split_addr(value) is not None,
                f"{name}: must be HOST:PORT, got {value!r}",
            )
        require(
            p,
            0 < self.heartbeat_interval_s <= 600,
            f"heartbeat_interval_s: must be in (0, 600], got "
            f"{self.heartbeat_interval_s}",
        )
        require(
            p,
            0 < self.history_bucket_s <= 86400,
            f"history_bucket_s: must be in (0, 86400], got {self.history_bucket_s}",
        )
        for name in ("ca", "cert", "key"):
            value = getattr(self.tls, name)
            require(
                p,
                value is None or Path(value).is_file(),
                f"tls.{name}: no such file: {value}",
            )
        require(
            p,
            self.lost_after_intervals >= 2,
            f"lost_after_intervals: must be >= 2, got {self.lost_after_intervals}",
        )
        tls = (self.tls.cert, self.tls.key)
        require(p, all(tls) or not any(tls), "tls: set cert and key together")
        require(
            p, not self.tls.ca or all(tls), "tls.ca: needs tls.cert and tls.key as well"
        )
        addr = _split_addr(self.listen)
        if addr and not self.tls.enabled and not _is_loopback(addr[0]):
            require(
                p,
                self.allow_insecure_remote,
                f"listen: {self.listen} is not a loopback address and no "
                "TLS is configured; anyone who reaches it could command "
                "the agents. Configure tls (gpufleet broker init-certs) "
                "or set allow_insecure_remote: true",
            )
        for name in ("policy_file", "prices_file", "admin_token_file"):
            value = getattr(self, name)
            if name != "admin_token_file":
                require(
                    p,
                    value is None or Path(value).is_file(),
                    f"{name}: no such file: {value}",
                )
        earlier = bool(p)
        p.extend(self.market.problems())
        p.extend(self.provisioning.problems())
        if self.provisioning.enabled and not earlier:
            # (A market section with an unknown field was not loaded at all:
            # its own problem says so, this one would mislead.)
            require(
                p,
                self.market.enabled,
                "provisioning.enabled: needs the market catalog: set "
                "market.enabled: true (it ranks the offers to launch)",
            )
            prov = self.provisioning
            require(
                p,
                bool(prov.aws.images)
                or bool(prov.gcp.project or self.market.gcp.project),
                "provisioning: no cloud can launch: set provisioning.aws.images "
                "(an AMI per region) or provisioning.gcp.project",
            )
        if p:
            raise ConfigError(source, p)


def _split_addr(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_addr(value: str) -> tuple[str, int]:
    """Splits HOST:PORT; the config was validated before this is called."""
    addr = _split_addr(value)
    assert addr is not None, value
    return addr


def load_broker_config(
    path: Path | None, overrides: dict[str, object] | None = None
) -> BrokerConfig:
    """Loads and validates the broker configuration."""
    return load_validated(
        BrokerConfig,
        path,
        env_prefix="GPUFLEET_BROKER_",
        overrides=overrides,
        what="broker configuration",
    )
