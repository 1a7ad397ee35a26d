"""The kernel catalog against hostile agents: floods, forged verdicts and
fingerprints, control characters, and the limits that bound them."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest

from gpufleet.broker import kernels as catalog_module
from gpufleet.broker.kernelstore import KernelStore
from gpufleet.proto import pb
from tests.broker.kernel_helpers import (
    A10G,
    H100,
    MATMUL,
    Factory,
    RawAgent,
    gpu_of,
    make_entry,
    verdict_on,
)
from tests.broker.kernel_helpers import (
    admin_call as _admin,
)
from tests.broker.kernel_helpers import (
    metrics_text as _metrics,
)
from tests.e2e.conftest import BrokerHandle, events_of, eventually


def _metric(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _round_trip_s(agent: RawAgent) -> float:
    start = time.monotonic()
    await agent.sync()
    return time.monotonic() - start


def _flood(report_id: int, size: int) -> pb.AgentMessage:
    """A report of ``size`` valid entries, each for a slot of its own."""
    entries = [
        make_entry(tuning_key=f"M={report_id},N={n},K=64").to_proto()
        for n in range(size)
    ]
    return pb.AgentMessage(
        kernel_report=pb.KernelReport(report_id=report_id, entries=entries)
    )


# ---------------------------------------------------------------- floods


async def test_catalog_answers_heartbeats_while_a_host_floods_reports(
    db_url: str, brokers: Factory
) -> None:
    """Reports of the largest size, back to back: every heartbeat, the
    flooder's own included, is answered within a second, and reports beyond
    the backlog are dropped and counted, not queued."""
    broker = await brokers(database_url=db_url)
    size = catalog_module.MAX_REPORT_ITEMS
    sent = 10
    floods = [_flood(1000 + i, size) for i in range(sent)]
    async with (
        RawAgent(broker.addr, "hostile", [A10G]) as hostile,
        RawAgent(broker.addr, "honest", [A10G]) as honest,
    ):
        for message in floods:
            await hostile.send(message)
        rtts = [await _round_trip_s(hostile)]
        for _ in range(5):
            rtts.append(await _round_trip_s(honest))
        assert max(rtts) < 1.0, rtts

        # The honest host's own report is answered while the flood lasts.
        start = time.monotonic()
        ack = await honest.report([make_entry(tuning_key="M=1,N=1,K=1")])
        assert list(ack.refused) == []
        assert time.monotonic() - start < 5.0

        async def all_answered_or_dropped() -> bool:
            acks = [m for m in hostile.inbox if m.HasField("kernel_report_ack")]
            text = await _metrics(broker)
            dropped = _metric(
                text,
                'gpufleet_broker_rejected_messages_total{reason="kernel-report-backlog"}',
            )
            return len(acks) + dropped == sent

        await eventually(all_answered_or_dropped, timeout_s=60)
        text = await _metrics(broker)
        assert (
            _metric(
                text,
                'gpufleet_broker_rejected_messages_total{reason="kernel-report-backlog"}',
            )
            >= 1
        )
        assert await _round_trip_s(hostile) < 1.0


async def test_catalog_reads_at_most_200_entries_and_verdicts_per_report(
    brokers: Factory,
) -> None:
    broker = await brokers()
    size = catalog_module.MAX_REPORT_ITEMS
    assert size == 200
    wrong = make_entry(fingerprint=H100).to_proto()
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
    ):
        await a1.report([make_entry()])
        [pushed] = await a2.installed()
        accepted = verdict_on(pushed, accepted=True)
        ack = await a2.report([wrong] * size, [accepted])
        assert len(ack.refused) == size
        assert await events_of(broker, "kernel.verified") == []
        ack = await a2.report([wrong] * (size - 1), [accepted])
        assert len(ack.refused) == size - 1
        assert len(await events_of(broker, "kernel.verified")) == 1
        # Entries beyond the limit are not read one by one: one line says so.
        ack = await a2.report([pb.KernelEntry()] * 20_000)
        assert len(ack.refused) == size + 1
        assert ack.refused[size].startswith("?: bad-schema: a report holds at most")
        assert "this entry and 19799 after it were not read" in ack.refused[size]
    text = await _metrics(broker)
    assert 'reason="bad-kernel-verdict"} 1.0' in text


async def test_catalog_refuses_tuned_reports_beyond_a_hosts_quota(
    db_url: str, brokers: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_module, "MAX_TUNED_PER_HOST", 3)
    monkeypatch.setattr(catalog_module, "MAX_CONFIGS_PER_SLOT", 2)
    broker = await brokers(database_url=db_url)
    slots = [make_entry(tuning_key=f"M={n},N=8,K=8") for n in range(4)]
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
    ):
        ack = await a1.report(slots)
        assert len(ack.refused) == 1
        assert ack.refused[0].startswith(f"{slots[3].slot_key}: quota-exceeded: ")
        assert "at most 3" in ack.refused[0]
        # What the host has already is no new slot: sent again, or a second
        # config of one of its slots.
        second = make_entry(MATMUL[2], tuning_key="M=0,N=8,K=8")
        assert list((await a1.report([slots[0], second])).refused) == []
        third = make_entry(MATMUL[3], tuning_key="M=0,N=8,K=8")
        [refusal] = (await a1.report([third])).refused
        assert "quota-exceeded" in refusal
        assert "2 configs of slot" in refusal
        # Other hosts have their own quota.
        assert list((await a2.report([slots[3]])).refused) == []

        await _admin(
            broker, "EvictKernel", pb.KernelRequest(slot_key=slots[1].slot_key)
        )
        assert list((await a1.report([slots[3]])).refused) == []
    text = await _metrics(broker)
    assert 'gpufleet_kernel_refusals_total{cause="quota-exceeded"} 2.0' in text


async def test_catalog_emits_published_once_per_host_and_config(
    db_url: str, brokers: Factory
) -> None:
    """Tuning the same config again is no news; another config is."""
    broker = await brokers(database_url=db_url)
    entry = make_entry()
    async with RawAgent(broker.addr, "a1", [A10G]) as a1:
        await a1.report([entry])
        for bump in (1.0, 2.0, 3.0):
            later = dataclasses.replace(entry, tuned_at_s=entry.tuned_at_s + bump)
            assert list((await a1.report([later])).refused) == []
        await a1.report([make_entry(MATMUL[2])])
    published = await events_of(broker, "kernel.published")
    configs = [json.loads(e.data_json)["config_hash"] for e in published]
    assert configs == [entry.config_hash, make_entry(MATMUL[2]).config_hash]
    text = await _metrics(broker)
    assert 'gpufleet_kernel_reports_total{role="tuned"} 2.0' in text


# ---------------------------------------------------------------- forgery


async def test_catalog_keeps_only_fingerprints_of_announced_gpus(
    brokers: Factory,
) -> None:
    broker = await brokers()
    escape = dataclasses.replace(H100, product="H100\x1b[2J")
    async with (
        RawAgent(broker.addr, "no-gpu", [H100], gpus=[]) as no_gpu,
        RawAgent(
            broker.addr, "mixed", [A10G, H100], gpus=[gpu_of(A10G.to_proto())]
        ) as mixed,
        RawAgent(broker.addr, "escape", [escape]) as escaped,
        RawAgent(broker.addr, "h1", [H100]) as h1,
    ):
        [refusal] = (await no_gpu.report([make_entry(fingerprint=H100)])).refused
        assert ": wrong-fingerprint: " in refusal
        assert "announced none" in refusal
        ack = await mixed.report(
            [make_entry(fingerprint=H100), make_entry(tuning_key="M=2,N=2,K=2")]
        )
        assert [r.split(": ")[1] for r in ack.refused] == ["wrong-fingerprint"]
        [refusal] = (await escaped.report([make_entry(fingerprint=escape)])).refused
        assert ": wrong-fingerprint: " in refusal
        assert "\x1b" not in refusal

        await h1.report([make_entry(fingerprint=H100)])
        assert await no_gpu.pending("install_kernels") == []
        assert await mixed.pending("install_kernels") == []
    text = await _metrics(broker)
    assert 'reason="kernel-fingerprint-without-gpu"} 2.0' in text
    assert 'reason="bad-kernel-fingerprint"} 1.0' in text


async def _flagged(broker: BrokerHandle) -> list[str]:
    listing = await _admin(broker, "ListKernels", pb.ListKernelsRequest())
    return list(listing.flagged_hosts)


async def test_catalog_ignores_verdicts_on_entries_the_host_was_never_sent(
    db_url: str, brokers: Factory
) -> None:
    broker = await brokers(database_url=db_url)
    old = make_entry(MATMUL[1])
    new = make_entry(MATMUL[2])
    async with RawAgent(broker.addr, "a1", [A10G]) as a1:
        await a1.report([old])
        await a1.report([new])  # a1 tuned again: it runs the new config now
        async with RawAgent(broker.addr, "a2", [A10G]) as a2:
            await a2.report([new])  # a2 tuned the new config too
            async with RawAgent(broker.addr, "a3", [A10G]) as a3:
                [pushed] = await a3.installed()
                assert dict(pushed.config) == new.config
                assert pushed.tuned_by == "a1"
                forged = [
                    # a config that a1 tuned once but nobody sent a3
                    verdict_on(
                        old.to_proto(), accepted=False, reason="x: y", tuned_by="a1"
                    ),
                    # the config a3 was sent, but naming another of its tuners
                    verdict_on(pushed, accepted=False, reason="x: y", tuned_by="a2"),
                ]
                ack = await a3.report(verdicts=forged)
                assert list(ack.refused) == []
                assert await _flagged(broker) == []
                reports = await _admin(
                    broker, "GetKernel", pb.KernelRequest(slot_key=old.slot_key)
                )
                assert "a3" not in {r.host_id for r in reports.reports}

                real = verdict_on(pushed, accepted=False, reason="wrong-result: z")
                await a3.report(verdicts=[real])
                [flag] = await _flagged(broker)
                assert flag.startswith("a1: a3 refused config ")
    text = await _metrics(broker)
    assert 'reason="unsolicited-kernel-verdict"} 2.0' in text


async def test_catalog_takes_verdicts_on_entries_sent_before_a_restart(
    db_url: str, brokers: Factory
) -> None:
    """The record of what a host was sent outlives the broker: its stored
    install commands, answered or not."""
    broker = await brokers(database_url=db_url)
    first = make_entry(tuning_key="M=1,N=8,K=8")
    second = make_entry(tuning_key="M=2,N=8,K=8")
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
    ):
        await a1.report([first])
        [sent_first] = await a2.installed()  # left unanswered: stays pending
        await a1.report([second])
        install = await a2.take("install_kernels")
        [sent_second] = install.command.install_kernels.entries
        await _done(a2, install)
        await a2.report(verdicts=[verdict_on(sent_second, accepted=True)])
    await broker.shutdown()

    again = await brokers(database_url=db_url)
    async with RawAgent(again.addr, "a2", [A10G]) as a2:
        resent = await a2.take("install_kernels")  # the pending one, resent
        assert [e.slot_key for e in resent.command.install_kernels.entries] == [
            first.slot_key
        ]
        assert await a2.pending("install_kernels") == []
        ack = await a2.report(
            verdicts=[
                verdict_on(sent_first, accepted=True),
                verdict_on(sent_second, accepted=False, reason="wrong-result: z"),
            ]
        )
        assert list(ack.refused) == []
    view = await _admin(again, "GetKernel", pb.KernelRequest(slot_key=first.slot_key))
    assert ("a2", "verified") in {(r.host_id, r.role) for r in view.reports}
    [flag] = await _flagged(again)
    assert flag.startswith("a1: a2 refused config ")


async def _done(agent: RawAgent, command: pb.BrokerMessage) -> None:
    command_id = command.command.command_id
    await agent.send(pb.AgentMessage(command_ack=pb.CommandAck(command_id=command_id)))
    await agent.send(
        pb.AgentMessage(
            command_result=pb.CommandResult(
                command_id=command_id, status=pb.COMMAND_STATUS_DONE
            )
        )
    )
    await agent.sync()


async def test_catalog_flags_on_a_cause_that_only_starts_like_verify_failed(
    brokers: Factory,
) -> None:
    broker = await brokers()
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
    ):
        await a1.report([make_entry()])
        [pushed] = await a2.installed()
        reason = "verify-failed-xyz: made up"
        await a2.report(verdicts=[verdict_on(pushed, accepted=False, reason=reason)])
        [flag] = await _flagged(broker)
        assert flag.startswith("a1: ")
    [flagged] = await events_of(broker, "kernel.peer_flagged")
    assert flagged.cause == "verify-failed-xyz"


# ---------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("reason", "clean"), [("\x00", "?"), ("\x1b[2J\r\n", "?[2J??")]
)
async def test_catalog_stores_and_shows_verdict_reasons_without_control_chars(
    db_url: str, brokers: Factory, reason: str, clean: str
) -> None:
    broker = await brokers(database_url=db_url)
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
        RawAgent(broker.addr, "a3", [A10G]) as a3,
    ):
        await a1.report([make_entry()])
        [pushed] = await a2.installed()
        await a3.installed()
        failed = verdict_on(pushed, accepted=False, reason=f"verify-failed: {reason}")
        ack = await a3.report(verdicts=[failed])
        assert list(ack.refused) == []
        refused = verdict_on(
            pushed, accepted=False, reason=f"wrong-result: a{reason}b" + "c" * 5000
        )
        ack = await a2.report(verdicts=[refused])
        assert list(ack.refused) == []
        await a2.sync()  # the stream is still up

        [flag] = await _flagged(broker)
        assert f"wrong-result: a{clean}b" in flag
        view = await _admin(
            broker, "GetKernel", pb.KernelRequest(slot_key=pushed.slot_key)
        )
        reasons = {r.host_id: r.reason for r in view.reports}
        assert reasons["a2"].startswith(f"wrong-result: a{clean}bccc")
        assert len(reasons["a2"]) == catalog_module.MAX_REASON_CHARS
        assert reasons["a3"] == f"verify-failed: {clean}"
    for event in await events_of(broker, "kernel."):
        for value in json.loads(event.data_json).values():
            assert not isinstance(value, str) or value.isprintable(), value


async def test_catalog_skips_a_verdict_it_fails_on_and_acks_the_report(
    brokers: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = await brokers()
    real_add = KernelStore.add_verdict
    calls = 0

    async def failing_once(self: KernelStore, *args: Any, **kwargs: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the disk caught fire")
        return await real_add(self, *args, **kwargs)

    monkeypatch.setattr(KernelStore, "add_verdict", failing_once)
    first = make_entry(tuning_key="M=1,N=8,K=8")
    second = make_entry(tuning_key="M=2,N=8,K=8")
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
    ):
        await a1.report([first, second])
        entries = await a2.installed()
        verdicts = [verdict_on(e, accepted=True) for e in entries]
        ack = await a2.report(verdicts=verdicts)
        assert list(ack.refused) == []
        await a2.sync()
    assert calls == 2
    verified = await events_of(broker, "kernel.verified")
    assert [json.loads(e.data_json)["slot_key"] for e in verified] == [
        entries[1].slot_key
    ]
    text = await _metrics(broker)
    assert 'reason="kernel-verdict-failed"} 1.0' in text


async def test_stream_survives_a_report_the_catalog_fails_on(
    brokers: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not acked (the agent sends it again), and telemetry goes on."""
    broker = await brokers()
    real_on_report = catalog_module.KernelCatalog.on_report
    calls = 0

    async def failing_once(self: Any, host: Any, report: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the store is down")
        return await real_on_report(self, host, report)

    monkeypatch.setattr(catalog_module.KernelCatalog, "on_report", failing_once)
    async with RawAgent(broker.addr, "a1", [A10G]) as a1:
        report = pb.KernelReport(report_id=77, entries=[make_entry().to_proto()])
        await a1.send(pb.AgentMessage(kernel_report=report))
        await a1.sync()
        await eventually(lambda: calls == 1)
        assert await a1.pending("kernel_report_ack") == []
        ack = await a1.report([make_entry()])
        assert list(ack.refused) == []
    text = await _metrics(broker)
    assert 'reason="kernel-report-failed"} 1.0' in text


# ---------------------------------------------------------------- pins


async def test_catalog_pushes_a_pin_to_a_host_that_refused_that_config(
    db_url: str, brokers: Factory
) -> None:
    broker = await brokers(database_url=db_url)
    entry = make_entry()
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
    ):
        await a1.report([entry])
        install = await a2.take("install_kernels")
        [pushed] = install.command.install_kernels.entries
        await _done(a2, install)
        reason = "slower-than-default: 2.0 ms against 1.0 ms"
        await a2.report(verdicts=[verdict_on(pushed, accepted=False, reason=reason)])
        assert len(await _flagged(broker)) == 1
        assert await a2.pending("install_kernels") == []

        view = await _admin(
            broker,
            "PinKernel",
            pb.PinKernelRequest(slot_key=entry.slot_key, from_host_id="a1"),
        )
        assert view.state == "pinned"
        install = await a2.take("install_kernels")
        [pinned] = install.command.install_kernels.entries
        assert pinned.pinned
        assert dict(pinned.config) == entry.config
        await _done(a2, install)
        assert await a1.pending("install_kernels") == []
    async with RawAgent(broker.addr, "a2", [A10G]) as a2:
        install = await a2.take("install_kernels")  # until it runs the pin
        [again] = install.command.install_kernels.entries
        assert again.pinned
        await _done(a2, install)
        await a2.report(verdicts=[verdict_on(again, accepted=True)])
    async with RawAgent(broker.addr, "a2", [A10G]) as a2:
        assert await a2.pending("install_kernels") == []
