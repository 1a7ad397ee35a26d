"""Tests of the Azure Scheduled Events source against the local IMDS (case 05)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpufleet.agent.preemption import NoticeWatcher, parse_time
from gpufleet.agent.preemption.azure import AzureSource
from gpufleet.dev.metadata_server import MetadataServer

CASES = Path(__file__).resolve().parents[1] / "cases"
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "azure"
EVENTS = "/metadata/scheduledevents"


@pytest.fixture
async def azure() -> AsyncIterator[MetadataServer]:
    server = MetadataServer("azure", vm_name="vmss-node_24")
    server.start()
    yield server
    server.stop()


async def test_azure_case05_freeze_is_info_once_then_preempt_evacuates(
    azure: MetadataServer,
) -> None:
    case = json.loads((CASES / "05-azure-freeze-started-repeated.json").read_text())
    source = AzureSource(azure.url)
    watcher = NoticeWatcher(source)
    seen = []
    for step in case["documents"]:
        azure.set_raw(EVENTS, json.dumps(step["doc"]))
        seen.append(await watcher.poll_once())
    await source.aclose()

    assert source.vm_name == case["this_vm_compute_name"]
    freeze, repeat, empty, preempt = seen
    assert [(n.kind, n.action, n.evacuate, n.deadline_s) for n in freeze] == [
        ("info", "Freeze", False, None)
    ]
    assert repeat == []
    assert empty == []
    assert [(n.action, n.evacuate) for n in preempt] == [("Preempt", True)]
    assert preempt[0].deadline_s == parse_time("2026-12-03T12:10:30Z")
    assert watcher.healthy
    assert source.health.failures_total == 0
    assert source.document_incarnation == 4
    assert azure.acknowledged == []


async def test_azure_events_for_other_vms_are_ignored() -> None:
    server = MetadataServer("azure", vm_name="sample_4")
    server.start()
    server.set_raw(
        EVENTS, (SAMPLES / "scheduled_events_reboot_two_vms_sample.json").read_text()
    )
    source = AzureSource(server.url)
    notices = await source.poll()
    await source.aclose()
    server.stop()

    assert [n.key for n in notices] == ["28512AF7-C957-4500-9BC4-842D6FB531E4"]
    assert notices[0].kind == "maintenance"
    assert notices[0].deadline_s == parse_time("Wed, 24 Jan 2018 21:20:44 GMT")


@pytest.mark.parametrize(
    ("sample", "vm_name"),
    [
        ("scheduled_events_preempt_docs_example.json", "myspotvm"),
        (
            "scheduled_events_preempt_aks_spot_vmss.json",
            "aks-nodepool1-00000000-vmss_3",
        ),
        ("scheduled_events_preempt_simulated_eviction.json", "vm-spot"),
    ],
)
async def test_azure_preempt_samples_evacuate(sample: str, vm_name: str) -> None:
    doc = json.loads((SAMPLES / sample).read_text())
    server = MetadataServer("azure", vm_name=vm_name)
    server.start()
    server.set_raw(EVENTS, json.dumps(doc))
    source = AzureSource(server.url)
    notices = await source.poll()
    await source.aclose()
    server.stop()

    event = doc["Events"][0]
    assert [(n.kind, n.key, n.evacuate) for n in notices] == [
        ("preempted", event["EventId"], True)
    ]
    assert notices[0].deadline_s == parse_time(event["NotBefore"])


async def test_azure_acknowledge_posts_start_request(azure: MetadataServer) -> None:
    azure.schedule_notice("preempted")
    source = AzureSource(azure.url)
    (notice,) = await source.poll()

    assert await source.acknowledge(notice.key) is True
    after = await source.poll()
    await source.aclose()

    assert azure.acknowledged == [notice.key]
    assert after[0].raw["EventStatus"] == "Started"
    assert source.document_incarnation == 2


async def test_azure_first_call_gets_the_longer_timeout() -> None:
    server = MetadataServer("azure", azure_first_call_delay_s=0.1)
    server.start()
    patient = AzureSource(server.url, timeout_s=0.03, first_timeout_s=2.0)
    assert await patient.poll() == []
    await patient.aclose()
    server.stop()

    assert patient.health.failures_total == 0


async def test_azure_garbled_document_is_counted_not_raised(
    azure: MetadataServer,
) -> None:
    azure.set_raw(EVENTS, '{"DocumentIncarnation": 3, "Events": {"oops": 1}}')
    source = AzureSource(azure.url)
    assert await source.poll() == []
    await source.aclose()
    assert source.health.garbled_total == 1
