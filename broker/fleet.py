"""The broker's in-memory view of the fleet: hosts, their GPUs, sessions.

Owned by the broker process. The agent servicer writes a host's entry while
its stream is open; the heartbeat monitor marks hosts lost; the reaper and
the admin API read. Everything runs on one event loop, so no locks.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from gpufleet.broker.policy import HostFacts
from gpufleet.broker.state import HostReaper
from gpufleet.kernels.fingerprint import HardwareFingerprint
from gpufleet.proto import pb

# Recent activity kept per GPU in memory, as (timestamp_s, util_ratio,
# sm_active_ratio) tuples: a full GpuSample costs about 1.6 KiB, which at
# 10,000 GPUs and two minutes of samples would be gigabytes. History beyond
# this is in the store, downsampled.
RECENT_SAMPLES = 120
RecentPoint = tuple[float, float | None, float | None]

# Statuses in which the host's telemetry is live and policies may act.
LIVE = "connected"


@dataclass
class GpuState:
    """One GPU of a host as last reported."""

    info: pb.GpuInfo
    last: pb.GpuSample | None = None
    recent: collections.deque[RecentPoint] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_SAMPLES)
    )
    idle_s: float = 0.0
    last_idle_ts: float | None = None


@dataclass
class HostState:
    """A host known to the broker, connected or not."""

    identity: pb.HostIdentity
    labels: dict[str, str]
    agent_version: str
    reaper: HostReaper
    gpus: dict[str, GpuState] = field(default_factory=dict)
    status: str = LIVE
    last_seen_s: float = 0.0  # broker wall clock
    last_rx_mono: float = 0.0
    session_id: int = 0
    outbox: asyncio.Queue[pb.BrokerMessage] | None = None
    newest_sample_s: float = 0.0  # sample clock
    dropped_samples_total: int = 0
    open_action_id: str | None = None
    open_action_kind: str | None = None
    awaiting_back: bool = False
    # Set by a preemption notice: no new jobs, running ones migrate.
    leaving: bool = False
    notice_keys: set[str] = field(default_factory=set)
    # The kernel fingerprints of the latest hello, by key: the catalog pushes
    # tuned configs for these only.
    kernel_fingerprints: dict[str, HardwareFingerprint] = field(default_factory=dict)

    @property
    def host_id(self) -> str:
        return self.identity.host_id

    @property
    def replay(self) -> bool:
        """Whether the host replays a trace (its sample clock is its own)."""
        return any(g.info.vendor == "replay" for g in self.gpus.values())

    def facts(self) -> HostFacts:
        return host_facts(self.identity, self.labels)

    def stale(self, now_mono: float, stale_after_s: float) -> bool:
        return now_mono - self.last_rx_mono > stale_after_s

    def send(self, message: pb.BrokerMessage) -> bool:
        """Queues a message for the host's stream; False when not connected."""
        if self.outbox is None:
            return False
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            return False
        return True


def host_facts(identity: pb.HostIdentity, labels: Mapping[str, str]) -> HostFacts:
    """What the policy matches a host on."""
    return HostFacts(
        host_id=identity.host_id,
        provider=identity.provider,
        region=identity.region,
        zone=identity.zone,
        instance_type=identity.instance_type,
        spot=identity.spot,
        labels=dict(labels),
    )


class Fleet:
    """All hosts the broker knows, by host id.

    Limitation L-018 (docs/limitations.md#l-018): this view lives in one
    broker's memory.
    """

    def __init__(self, base_heartbeat_s: float, lost_after_intervals: int) -> None:
        self.hosts: dict[str, HostState] = {}
        self._base_heartbeat_s = base_heartbeat_s
        self.lost_after_intervals = lost_after_intervals
        self._next_session = 0

    def heartbeat_interval_s(self) -> float:
        """The interval agents are told to keep; longer for larger fleets.

        One heartbeat per host every 5 s is 2,000 messages a second at
        10,000 hosts; past 1,000 hosts the interval grows with the fleet so
        that the broker's load from heartbeats stays flat.
        """
        connected = sum(1 for h in self.hosts.values() if h.outbox is not None)
        return self._base_heartbeat_s * max(1.0, connected / 1000)

    def lost_after_s(self) -> float:
        return self.heartbeat_interval_s() * self.lost_after_intervals

    def new_session_id(self) -> int:
        self._next_session += 1
        return self._next_session

    def clock_s(self) -> float:
        """The fleet's sample clock: the newest sample time of any host."""
        return max((h.newest_sample_s for h in self.hosts.values()), default=0.0)

    def touch(self, host: HostState) -> None:
        host.last_rx_mono = time.monotonic()
        host.last_seen_s = time.time()

    def overdue(self, now_mono: float) -> list[HostState]:
        """Hosts that missed ``lost_after_intervals`` heartbeats.

        A host whose stream ended ("disconnected") is lost too once that
        long has passed without a reconnect: its jobs must move on.
        """
        limit = self.lost_after_s()
        return [
            h
            for h in self.hosts.values()
            if h.status in (LIVE, "disconnected") and now_mono - h.last_rx_mono > limit
        ]
