"""Tests of the broker's Prometheus metrics, scraped over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.broker.metrics import (
    UNIT_SUFFIXES,
    UNITLESS_NAMES,
    BrokerMetrics,
    check_metric_name,
)
from gpufleet.proto import pb

INFO = pb.GpuInfo(
    uuid="GPU-aaaa", index=3, name="NVIDIA H100", mem_total_bytes=80 * 2**30
)


def _sample(**fields: float) -> pb.GpuSample:
    return pb.GpuSample(
        gpu_uuid=INFO.uuid, timestamp_s=100.0, health=pb.GPU_HEALTH_OK, **fields
    )


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


GPU_KEY = (
    ("gpu", "GPU-aaaa"),
    ("host", "h1"),
    ("index", "3"),
    ("model", "NVIDIA H100"),
)


@pytest.fixture
def metrics() -> BrokerMetrics:
    return BrokerMetrics()


@pytest.fixture
def scrape(metrics: BrokerMetrics) -> Iterator[str]:
    server = metrics.serve(host="127.0.0.1", port=0)
    try:
        yield server.url
    finally:
        server.stop()


def test_metrics_scrape_over_http_parses_and_names_follow_conventions(
    metrics: BrokerMetrics, scrape: str
) -> None:
    metrics.observe_sample(
        "h1",
        INFO,
        _sample(
            util_ratio=0.5,
            sm_active_ratio=0.25,
            mem_used_bytes=2**30,
            power_w=300.0,
            temperature_c=60.0,
        ),
    )
    metrics.set_idle_seconds("h1", INFO, 12.0)
    metrics.set_host("h1", True, 1.7e9)
    metrics.add_dropped("h1", 4)
    metrics.count_action("kill-processes", "default", dry_run=True)
    metrics.add_savings(1.5, 3.25)
    metrics.set_host_counts({"connected": 1})
    metrics.count_samples(10)
    metrics.count_rejected("bad-timestamp")

    response = httpx.get(scrape, timeout=5)
    assert response.status_code == 200
    families = list(text_string_to_metric_families(response.text))
    counters = {f.name for f in families if f.type in ("counter", "histogram")}
    # prometheus_client adds a <name>_created gauge beside each counter and
    # histogram in the text format; it belongs to them, not to our naming.
    ours = [
        f
        for f in families
        if f.name.startswith("gpufleet_")
        and not (f.name.endswith("_created") and f.name[:-8] in counters)
    ]
    assert len(ours) == 32
    for family in ours:
        full = family.name + ("_total" if family.type == "counter" else "")
        assert full in UNITLESS_NAMES or full.endswith(UNIT_SUFFIXES), full
    values = _values(response.text)
    assert values[("gpufleet_gpu_utilization_ratio", GPU_KEY)] == 0.5
    assert values[("gpufleet_gpu_memory_total_bytes", GPU_KEY)] == 80 * 2**30
    assert values[("gpufleet_gpu_healthy", GPU_KEY)] == 1
    assert values[("gpufleet_gpu_idle_seconds", GPU_KEY)] == 12.0
    assert values[("gpufleet_agent_dropped_samples_total", (("host", "h1"),))] == 4
    action = (("action", "kill-processes"), ("dry_run", "true"), ("group", "default"))
    assert values[("gpufleet_reaper_actions_total", action)] == 1
    assert values[("gpufleet_reaper_money_saved_dollars_total", ())] == 3.25
    assert values[("gpufleet_hosts", (("status", "connected"),))] == 1


def test_metrics_unknown_fields_have_no_series_instead_of_zero(
    metrics: BrokerMetrics,
) -> None:
    metrics.observe_sample("h1", INFO, _sample(util_ratio=0.9, power_w=200.0))
    lost = pb.GpuSample(gpu_uuid=INFO.uuid, health=pb.GPU_HEALTH_LOST)
    metrics.observe_sample("h1", INFO, lost)
    values = _values(metrics.render().decode())
    gpu_series = {name for name, labels in values if labels == GPU_KEY}
    assert gpu_series == {"gpufleet_gpu_memory_total_bytes", "gpufleet_gpu_healthy"}
    assert values[("gpufleet_gpu_healthy", GPU_KEY)] == 0


def test_metrics_set_idle_seconds_none_removes_series(metrics: BrokerMetrics) -> None:
    metrics.set_idle_seconds("h1", INFO, 5.0)
    metrics.set_idle_seconds("h1", INFO, None)
    metrics.set_idle_seconds("h1", INFO, None)
    assert b"gpufleet_gpu_idle_seconds{" not in metrics.render()


def test_metrics_forget_host_removes_host_and_gpu_series(
    metrics: BrokerMetrics,
) -> None:
    metrics.observe_sample("h1", INFO, _sample(util_ratio=0.1))
    metrics.set_host("h1", True, 10.0)
    metrics.add_dropped("h1", 1)
    metrics.set_host("h2", False, 11.0)
    metrics.forget_host("h1", [INFO])
    text = metrics.render().decode()
    assert 'host="h1"' not in text
    assert 'host="h2"' in text


def test_metrics_set_dropped_total_adds_deltas_and_survives_agent_restart(
    metrics: BrokerMetrics,
) -> None:
    for total in (5, 8, 8, 2):
        metrics.set_dropped_total("h1", total)
    values = _values(metrics.render().decode())
    assert values[("gpufleet_agent_dropped_samples_total", (("host", "h1"),))] == 10


def test_metrics_host_counts_report_zero_for_statuses_gone_empty(
    metrics: BrokerMetrics,
) -> None:
    metrics.set_host_counts({"connected": 2, "lost": 1})
    metrics.set_host_counts({"connected": 3})
    values = _values(metrics.render().decode())
    assert values[("gpufleet_hosts", (("status", "lost"),))] == 0
    assert values[("gpufleet_hosts", (("status", "connected"),))] == 3


def test_metrics_registry_is_private_per_instance() -> None:
    first, second = BrokerMetrics(), BrokerMetrics()
    first.count_samples(3)
    assert b"gpufleet_broker_telemetry_samples_total 3.0" in first.render()
    assert b"gpufleet_broker_telemetry_samples_total 0.0" in second.render()


@pytest.mark.parametrize(
    ("name", "counter"),
    [
        ("gpufleet_gpu_power", False),
        ("gpufleet_samples", True),
        ("gpu_utilization_ratio", False),
        ("gpufleet_GPU_ratio", False),
    ],
)
def test_metrics_check_name_rejects_names_off_convention(
    name: str, counter: bool
) -> None:
    with pytest.raises(ValueError, match=name):
        check_metric_name(name, counter=counter)


def test_metrics_server_stop_closes_port(metrics: BrokerMetrics) -> None:
    server = metrics.serve(port=0)
    assert server.host == "127.0.0.1"
    server.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url, timeout=1)
