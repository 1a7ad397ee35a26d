"""The agent's configuration: where the broker is, what to sample and how.

Read by ``gpufleet agent run`` from ``/etc/gpufleet/agent.yaml`` (or the file
named by ``GPUFLEET_AGENT_CONFIG``), ``GPUFLEET_AGENT_*`` variables and flags.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.config import load_validated, require
from gpufleet.errors import ConfigError

COLLECTORS = ("auto", "nvidia", "amd", "replay")
# "package.module:function", the form the verifier's --bench option takes.
_BENCH_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _default_verify_command() -> list[str]:
    return [sys.executable, "-m", "gpufleet.kernels.verify"]


@dataclass
class TlsConfig:
    """Client certificate for mutual TLS; all three or none."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def enabled(self) -> bool:
        return any((self.ca, self.cert, self.key))


@dataclass
class ReplayConfig:
    """A recorded trace to replay instead of reading real GPUs."""

    duty_csv: Path | None = None
    mem_csv: Path | None = None
    pods: list[str] = field(default_factory=list)
    wide_csv: Path | None = None
    speedup: float = 1.0
    loop: bool = False
    # Wall time at which the trace time ``origin_s`` is replayed; agents of
    # one simulated fleet share both so that their clocks line up.
    start_wall_s: float | None = None
    origin_s: float | None = None
    gpu_name: str = "NVIDIA A10G (replay)"
    # Mixed into replayed GPU uuids; None: the agent's name, so that two
    # agents replaying the same trace have distinct GPUs.
    uuid_salt: str | None = None
    mem_total_bytes: int = 24 * 1024**3


@dataclass
class IdentityConfig:
    """Explicit host identity; set fields win over the metadata service."""

    provider: str | None = None
    region: str | None = None
    zone: str | None = None
    instance_id: str | None = None
    instance_type: str | None = None
    spot: bool | None = None
    project: str | None = None
    discover: bool = True
    # How long a metadata service has to give its first answer (an off-cloud
    # host waits this long at start-up), and how long all of the identity
    # may take once it has answered.
    metadata_timeout_s: float = 0.5
    metadata_total_timeout_s: float = 5.0
    # Where the cloud's metadata service answers; set it to rehearse with
    # 'gpufleet dev metadata-server'. None: each cloud's own address.
    metadata_base: str | None = None


@dataclass
class PreemptionConfig:
    """Watching the cloud's metadata service for interruption notices."""

    enabled: bool = True
    # AWS and Azure are polled; at 0.5 s the notice reaches the jobs within
    # about half a second (bench/preemption_latency.py). GCP long-polls.
    poll_interval_s: float = 0.5


@dataclass
class KernelsConfig:
    """Sharing of tuned Triton kernel configs with hosts of the same hardware."""

    enabled: bool = True
    # None: <state_dir>/kernels, i.e. /var/lib/gpufleet/kernels by default.
    cache_dir: Path | None = None
    scan_interval_s: float = 5.0
    # Runs in a subprocess, because verifying imports torch and Triton, which
    # the agent never does; it gets the entry file and prints one JSON line.
    verify_command: list[str] = field(default_factory=_default_verify_command)
    verify_timeout_s: float = 300.0
    verify_bench: str | None = None
    # A received config is refused when it runs slower than this host's
    # default config by more than this fraction.
    slack: float = 0.25

    def problems(self) -> list[str]:
        """What is wrong with this section, each naming its field."""
        p: list[str] = []
        for name in ("scan_interval_s", "verify_timeout_s"):
            value = getattr(self, name)
            require(
                p,
                value is not None and value > 0,
                f"kernels.{name}: must be a number > 0, got {value!r}",
            )
        require(
            p,
            bool(self.verify_command) and all(self.verify_command),
            "kernels.verify_command: must be a non-empty list of arguments, e.g. "
            f"{_default_verify_command()}, got {self.verify_command!r}",
        )
        require(
            p,
            self.verify_bench is None or bool(_BENCH_REF.match(self.verify_bench)),
            "kernels.verify_bench: must be 'module:function', got "
            f"{self.verify_bench!r}",
        )
        require(
            p,
            self.slack is not None and 0 <= self.slack <= 10,
            f"kernels.slack: must be a number in 0..10, got {self.slack!r}",
        )
        return p


@dataclass
class AgentConfig:
    """Everything ``gpufleet agent run`` needs."""

    broker: str = "127.0.0.1:50051"
    name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    collector: str = "auto"
    interval_s: float = 1.0
    batch_interval_s: float = 1.0
    call_timeout_s: float = 2.0
    buffer_max_samples: int = 100_000
    max_batch_samples: int = 5_000
    state_dir: Path = Path("/var/lib/gpufleet")
    # Keepalive pings detect a half-open stream (a NAT or proxy that drops
    # the connection without closing it). The broker permits pings this
    # often; see broker/server.py, which sets the matching server options.
    keepalive_time_s: float = 20.0
    keepalive_timeout_s: float = 10.0
    # A stream on which nothing came back for this long is dead, even if
    # keepalive has not noticed; None: four heartbeat intervals, at least
    # 15 s (see session.STALL_INTERVALS).
    stall_after_s: float | None = None
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    tls: TlsConfig = field(default_factory=TlsConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    log_level: str = "info"

    @property
    def kernel_cache_dir(self) -> Path:
        """Where the kernel cache lives: ``kernels.cache_dir`` or under state_dir."""
        if self.kernels.cache_dir is not None:
            return Path(self.kernels.cache_dir)
        return Path(self.state_dir) / "kernels"

    def validate(self, source: str, problems: list[str] | None = None) -> None:
        """Raises ConfigError listing ``problems`` and every inconsistent field."""
        p: list[str] = list(problems or [])
        require(
            p,
            self.collector in COLLECTORS,
            f"collector: must be one of {', '.join(COLLECTORS)}, "
            f"got {self.collector!r}",
        )
        require(
            p, ":" in self.broker, f"broker: must be HOST:PORT, got {self.broker!r}"
        )
        for name in (
            "interval_s",
            "batch_interval_s",
            "call_timeout_s",
            "keepalive_time_s",
            "keepalive_timeout_s",
        ):
            value = getattr(self, name)
            require(
                p,
                value is not None and value > 0,
                f"{name}: must be a number > 0, got {value!r}",
            )
        require(
            p,
            1 <= self.max_batch_samples <= 100_000,
            f"max_batch_samples: must be in 1..100000, got {self.max_batch_samples}",
        )
        require(
            p,
            self.buffer_max_samples >= 100,
            f"buffer_max_samples: must be >= 100, got {self.buffer_max_samples}",
        )
        require(
            p,
            self.reconnect_min_s > 0 and self.reconnect_max_s >= self.reconnect_min_s,
            "reconnect_min_s/reconnect_max_s: need 0 < min <= max, got "
            f"{self.reconnect_min_s}/{self.reconnect_max_s}",
        )
        for name in ("metadata_timeout_s", "metadata_total_timeout_s"):
            value = getattr(self.identity, name)
            require(
                p,
                isinstance(value, int | float) and 0 < value <= 60,
                f"identity.{name}: must be a number of seconds in (0, 60], "
                f"got {value!r}",
            )
        tls = (self.tls.ca, self.tls.cert, self.tls.key)
        require(
            p,
            all(tls) or not any(tls),
            "tls: set ca, cert and key together (or none of them)",
        )
        if self.collector == "replay":
            r = self.replay
            require(
                p,
                bool(r.duty_csv) != bool(r.wide_csv),
                "replay: set either replay.duty_csv (with replay.pods) "
                "or replay.wide_csv",
            )
            require(p, r.speedup > 0, f"replay.speedup: must be > 0, got {r.speedup}")
            for key in ("duty_csv", "mem_csv", "wide_csv"):
                value = getattr(r, key)
                require(
                    p,
                    value is None or Path(value).is_file(),
                    f"replay.{key}: no such file: {value}",
                )
        p.extend(self.kernels.problems())
        if p:
            raise ConfigError(source, p)


def load_agent_config(
    path: Path | None, overrides: dict[str, object] | None = None
) -> AgentConfig:
    """Loads and validates the agent configuration."""
    return load_validated(
        AgentConfig,
        path,
        env_prefix="GPUFLEET_AGENT_",
        overrides=overrides,
        what="agent configuration",
    )
