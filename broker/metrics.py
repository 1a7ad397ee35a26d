"""The broker's Prometheus metrics: GPU telemetry, hosts, savings, kernels.

Owned by the broker process; every series lives in one private
``CollectorRegistry`` so that tests and embedders never share the global one.
A value the agent did not report (an absent protobuf field) removes its
series instead of exporting 0: a missing point is honest, a false 0 is not.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

UNIT_SUFFIXES = (
    "_ratio",
    "_bytes",
    "_watts",
    "_celsius",
    "_seconds",
    "_total",
    "_timestamp_seconds",
    "_dollars",
)
# Names whose value is a count or a boolean, which Prometheus leaves unitless.
UNITLESS_NAMES = frozenset(
    {
        "gpufleet_gpu_healthy",
        "gpufleet_host_up",
        "gpufleet_hosts",
        "gpufleet_kernel_slots",
        "gpufleet_launched_instances",
        "gpufleet_market_catalog_stale",
        "gpufleet_market_offers",
    }
)
NAME_PATTERN = re.compile(r"^gpufleet_[a-z0-9_]+$")
GPU_LABELS = ("host", "gpu", "index", "model")


def check_metric_name(name: str, *, counter: bool = False) -> None:
    """Raises ValueError unless the name follows the gpufleet conventions."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"metric {name!r} must match {NAME_PATTERN.pattern}")
    if counter and not name.endswith("_total"):
        raise ValueError(f"counter {name!r} must end in _total")
    if name not in UNITLESS_NAMES and not name.endswith(UNIT_SUFFIXES):
        raise ValueError(f"metric {name!r} must end in a unit, one of {UNIT_SUFFIXES}")


@dataclass
class MetricsServer:
    """A running /metrics endpoint; ``stop()`` closes it."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stops serving and waits for the server thread (bounded)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        log.info("metrics.stopped", port=self.port)


class BrokerMetrics:
    """Every metric the broker exports; safe to update from the event loop
    while the HTTP thread scrapes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

        def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
            check_metric_name(name)
            return Gauge(name, doc, list(labels), registry=self.registry)

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            check_metric_name(name, counter=True)
            return Counter(name, doc, list(labels), registry=self.registry)

        self.gpu_util = gauge(
            "gpufleet_gpu_utilization_ratio",
            "Share of time a kernel ran on the GPU (0-1).",
            GPU_LABELS,
        )
        self.gpu_sm_active = gauge(
            "gpufleet_gpu_sm_active_ratio",
            "Share of SMs busy (0-1), where the GPU reports it.",
            GPU_LABELS,
        )
        self.gpu_mem_used = gauge(
            "gpufleet_gpu_memory_used_bytes", "GPU memory in use.", GPU_LABELS
        )
        self.gpu_mem_total = gauge(
            "gpufleet_gpu_memory_total_bytes", "GPU memory in all.", GPU_LABELS
        )
        self.gpu_power = gauge(
            "gpufleet_gpu_power_watts", "GPU board power draw.", GPU_LABELS
        )
        self.gpu_temp = gauge(
            "gpufleet_gpu_temperature_celsius", "GPU core temperature.", GPU_LABELS
        )
        self.gpu_healthy = gauge(
            "gpufleet_gpu_healthy", "1 when the GPU answers, 0 when lost.", GPU_LABELS
        )
        self.gpu_idle = gauge(
            "gpufleet_gpu_idle_seconds",
            "How long the GPU has been idle by its policy, on the sample clock.",
            GPU_LABELS,
        )
        self.host_up = gauge(
            "gpufleet_host_up", "1 while the host's agent is connected.", ["host"]
        )
        self.host_last_seen = gauge(
            "gpufleet_host_last_seen_timestamp_seconds",
            "Broker wall clock of the host's latest message.",
            ["host"],
        )
        self.agent_dropped = counter(
            "gpufleet_agent_dropped_samples_total",
            "Samples agents dropped from their buffers, as they report.",
            ["host"],
        )
        self.actions = counter(
            "gpufleet_reaper_actions_total",
            "Reaper actions taken or, in dry run, planned.",
            ["action", "group", "dry_run"],
        )
        self.gpu_hours_saved = counter(
            "gpufleet_reaper_gpu_hours_saved_total",
            "GPU-hours the reaper's actions saved.",
        )
        self.money_saved = counter(
            "gpufleet_reaper_money_saved_dollars_total",
            "US dollars the reaper's actions saved at the hosts' prices.",
        )
        self.hosts = gauge("gpufleet_hosts", "Hosts by status.", ["status"])
        self.samples = counter(
            "gpufleet_broker_telemetry_samples_total", "GPU samples received."
        )
        self.rejected = counter(
            "gpufleet_broker_rejected_messages_total",
            "Agent messages refused, by reason.",
            ["reason"],
        )
        self.migrations = counter(
            "gpufleet_job_migrations_total",
            "Job migrations finished, by cause and outcome.",
            ["reason", "outcome"],
        )
        self.notice_to_checkpoint = Histogram(
            "gpufleet_job_notice_to_checkpoint_seconds",
            "From a preemption notice to the job's checkpoint saved.",
            registry=self.registry,
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
        )
        self.notice_to_resume = Histogram(
            "gpufleet_job_notice_to_resume_seconds",
            "From a preemption notice to the job running on its new host.",
            registry=self.registry,
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
        )
        self.steps_lost = counter(
            "gpufleet_job_steps_lost_total",
            "Training steps redone because a migration resumed from an older "
            "checkpoint.",
        )
        self.kernel_slots = gauge(
            "gpufleet_kernel_slots",
            "Kernel catalog slots, by state (pinned, agreed, disputed, refused).",
            ["state"],
        )
        self.kernel_reports = counter(
            "gpufleet_kernel_reports_total",
            "Kernel reports stored, by role (tuned, verified, refused).",
            ["role"],
        )
        self.kernel_refusals = counter(
            "gpufleet_kernel_refusals_total",
            "Kernel entries the broker refused, by cause.",
            ["cause"],
        )
        self.kernel_pushes = counter(
            "gpufleet_kernel_pushes_total",
            "Kernel entries sent to agents in install_kernels commands.",
        )
        self.market_age = gauge(
            "gpufleet_market_catalog_age_seconds",
            "Seconds since the market catalog's last refresh with no failed "
            "source (+Inf: never).",
        )
        self.market_stale = gauge(
            "gpufleet_market_catalog_stale",
            "1 when the market catalog's live prices are older than allowed.",
        )
        self.market_offers = gauge(
            "gpufleet_market_offers",
            "Offers in the market catalog, by provider and lifecycle.",
            ["provider", "lifecycle"],
        )
        self.market_refresh_failures = counter(
            "gpufleet_market_refresh_failures_total",
            "Market price sources that failed to refresh, by source.",
            ["source"],
        )
        self.market_last_refresh = gauge(
            "gpufleet_market_last_refresh_timestamp_seconds",
            "Unix time of the market catalog's last refresh with no failed source.",
        )
        self.instance_launches = counter(
            "gpufleet_instance_launches_total",
            "Instance launches the broker asked a cloud for, by provider, "
            "lifecycle and outcome (launched, capacity, quota, price, ...).",
            ["provider", "lifecycle", "outcome"],
        )
        self.instances = gauge(
            "gpufleet_launched_instances",
            "Instances the broker launched, by state (launching, booting, "
            "enrolled, releasing, released, failed).",
            ["state"],
        )
        self._gpu_gauges = (
            self.gpu_util,
            self.gpu_sm_active,
            self.gpu_mem_used,
            self.gpu_mem_total,
            self.gpu_power,
            self.gpu_temp,
            self.gpu_healthy,
            self.gpu_idle,
        )
        self._dropped_seen: dict[str, int] = {}
        self._host_statuses: set[str] = set()
        self._market_keys: set[tuple[str, str]] = set()

    def observe_sample(
        self, host_id: str, info: pb.GpuInfo, sample: pb.GpuSample
    ) -> None:
        """Sets the per-GPU gauges from one sample; absent fields drop series."""
        labels = _gpu_labels(host_id, info)
        _set_or_remove(self.gpu_util, labels, sample, "util_ratio")
        _set_or_remove(self.gpu_sm_active, labels, sample, "sm_active_ratio")
        _set_or_remove(self.gpu_mem_used, labels, sample, "mem_used_bytes")
        _set_or_remove(self.gpu_power, labels, sample, "power_w")
        _set_or_remove(self.gpu_temp, labels, sample, "temperature_c")
        if sample.HasField("mem_total_bytes"):
            self.gpu_mem_total.labels(*labels).set(sample.mem_total_bytes)
        elif info.mem_total_bytes:
            self.gpu_mem_total.labels(*labels).set(info.mem_total_bytes)
        else:
            _remove(self.gpu_mem_total, labels)
        if sample.health == pb.GPU_HEALTH_OK:
            self.gpu_healthy.labels(*labels).set(1)
        elif sample.health in (pb.GPU_HEALTH_LOST, pb.GPU_HEALTH_ERROR):
            self.gpu_healthy.labels(*labels).set(0)
        else:
            _remove(self.gpu_healthy, labels)

    def set_idle_seconds(
        self, host_id: str, info: pb.GpuInfo, seconds: float | None
    ) -> None:
        """Sets how long a GPU has been idle; None removes the series."""
        labels = _gpu_labels(host_id, info)
        if seconds is None:
            _remove(self.gpu_idle, labels)
        else:
            self.gpu_idle.labels(*labels).set(seconds)

    def set_host(self, host_id: str, up: bool, last_seen_s: float | None) -> None:
        self.host_up.labels(host_id).set(1 if up else 0)
        if last_seen_s is None:
            _remove(self.host_last_seen, (host_id,))
        else:
            self.host_last_seen.labels(host_id).set(last_seen_s)

    def forget_host(self, host_id: str, gpus: Iterable[pb.GpuInfo]) -> None:
        """Removes every series of a host and its GPUs (host gone for good)."""
        for info in gpus:
            labels = _gpu_labels(host_id, info)
            for metric in self._gpu_gauges:
                _remove(metric, labels)
        for metric in (self.host_up, self.host_last_seen, self.agent_dropped):
            _remove(metric, (host_id,))
        self._dropped_seen.pop(host_id, None)

    def count_action(self, action: str, group: str, dry_run: bool) -> None:
        self.actions.labels(action, group, "true" if dry_run else "false").inc()

    def add_savings(self, gpu_hours: float, usd: float) -> None:
        """Adds what an action saved; negative amounts are ignored."""
        if gpu_hours > 0:
            self.gpu_hours_saved.inc(gpu_hours)
        if usd > 0:
            self.money_saved.inc(usd)

    def count_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def set_kernel_slots(self, counts: Mapping[str, int]) -> None:
        """Sets the catalog's slots per state; absent states read 0."""
        for state in ("pinned", "agreed", "disputed", "refused", *counts):
            self.kernel_slots.labels(state).set(counts.get(state, 0))

    def count_kernel_report(self, role: str) -> None:
        self.kernel_reports.labels(role).inc()

    def count_kernel_refusal(self, cause: str) -> None:
        self.kernel_refusals.labels(cause).inc()

    def count_kernel_pushes(self, n: int) -> None:
        if n > 0:
            self.kernel_pushes.inc(n)

    def watch_market(
        self, age_s: Callable[[], float], stale: Callable[[], bool]
    ) -> None:
        """Reads the catalog's age and staleness at every scrape."""
        self.market_age.set_function(age_s)
        self.market_stale.set_function(lambda: 1.0 if stale() else 0.0)

    def set_market_offers(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Sets offers per (provider, lifecycle); ones seen before read 0."""
        self._market_keys.update(counts)
        for key in self._market_keys:
            self.market_offers.labels(*key).set(counts.get(key, 0))

    def set_market_refreshed(self, at_s: float) -> None:
        self.market_last_refresh.set(at_s)

    def count_market_refresh_failure(self, source: str) -> None:
        self.market_refresh_failures.labels(source).inc()

    def count_samples(self, n: int) -> None:
        if n > 0:
            self.samples.inc(n)

    def set_host_counts(self, counts: Mapping[str, int]) -> None:
        """Sets hosts per status; a status seen before and now absent reads 0."""
        self._host_statuses.update(counts)
        for status in self._host_statuses:
            self.hosts.labels(status).set(counts.get(status, 0))

    def add_dropped(self, host_id: str, n: int) -> None:
        """Adds samples an agent dropped since its previous report."""
        if n > 0:
            self.agent_dropped.labels(host_id).inc(n)
        else:
            self.agent_dropped.labels(host_id)

    def set_dropped_total(self, host_id: str, total: int) -> None:
        """Takes an agent's own running total and adds what is new.

        A total below the previous one means the agent restarted and counts
        from zero again, so all of it is new.
        """
        previous = self._dropped_seen.get(host_id, 0)
        self._dropped_seen[host_id] = total
        self.add_dropped(host_id, total - previous if total >= previous else total)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 9464) -> MetricsServer:
        """Serves /metrics over HTTP in a daemon thread; port 0 picks one.

        Binds to loopback unless told otherwise, so the endpoint is not
        exposed on every interface by accident.
        """
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        bound_port = int(server.server_address[1])
        log.info("metrics.serving", host=host, port=bound_port)
        return MetricsServer(host=host, port=bound_port, _server=server, _thread=thread)


def _gpu_labels(host_id: str, info: pb.GpuInfo) -> tuple[str, str, str, str]:
    return (host_id, info.uuid, str(info.index), info.name)


def _remove(metric: Gauge | Counter, labels: tuple[str, ...]) -> None:
    # Removing a series that was never set is fine: it is already absent.
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def _set_or_remove(
    gauge: Gauge, labels: tuple[str, ...], sample: pb.GpuSample, field: str
) -> None:
    if sample.HasField(field):
        gauge.labels(*labels).set(getattr(sample, field))
    else:
        _remove(gauge, labels)
