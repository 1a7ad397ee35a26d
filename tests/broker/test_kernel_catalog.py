"""The broker's kernel catalog over the wire: raw agent streams, a real broker,
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any

import aiomqtt
import grpc
import pytest

from gpufleet.broker.mqtt import kernel_topic, parse_mqtt_url
from gpufleet.kernels.entry import config_hash
from gpufleet.proto import pb
from tests.broker.kernel_helpers import (
    A10G,
    H100,
    MATMUL,
    Factory,
    RawAgent,
    make_entry,
    verdict_on,
)
from tests.broker.kernel_helpers import (
    admin_call as _admin,
)
from tests.broker.kernel_helpers import (
    metrics_text as _metrics,
)
from tests.e2e.conftest import events_of


async def test_catalog_pushes_entry_to_same_hardware_only_and_to_late_joiners(
    db_url: str, brokers: Factory
) -> None:
    broker = await brokers(database_url=db_url)
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
        RawAgent(broker.addr, "h1", [H100]) as h1,
    ):
        entry = make_entry(tuned_by="someone-else")
        ack = await a1.report([entry])
        assert list(ack.refused) == []

        [pushed] = await a2.installed()
        assert pushed.slot_key == entry.slot_key
        assert dict(pushed.config) == entry.config
        assert pushed.tuned_by == "a1"  # the sender, not what the entry claimed
        assert pushed.agreeing_hosts == 1
        assert not pushed.pinned
        assert await h1.pending("install_kernels") == []
        assert await a1.pending("install_kernels") == []

        ack = await a1.report([entry])  # sent again after a reconnect
        assert list(ack.refused) == []
        assert await a2.pending("install_kernels") == []

        async with RawAgent(broker.addr, "a3", [A10G]) as a3:
            [late] = await a3.installed()
            assert late.slot_key == entry.slot_key

        view = await _admin(
            broker, "GetKernel", pb.KernelRequest(slot_key=pushed.slot_key)
        )
        assert view.state == "agreed"
        assert view.hosts_pushed == 2
        assert [(r.host_id, r.role) for r in view.reports] == [("a1", "tuned")]
        published = await events_of(broker, "kernel.published")
        assert [e.host_id for e in published] == ["a1"]
        text = await _metrics(broker)
        assert 'gpufleet_kernel_reports_total{role="tuned"} 1.0' in text
        assert "gpufleet_kernel_pushes_total 2.0" in text
        assert 'gpufleet_kernel_slots{state="agreed"} 1.0' in text


async def test_catalog_refuses_bad_entries_with_reasons_and_keeps_serving(
    db_url: str, brokers: Factory
) -> None:
    broker = await brokers(database_url=db_url)
    good = make_entry()
    not_listed = {**MATMUL[0], "BLOCK_M": 16}
    wrong_slot = good.to_proto()
    wrong_slot.slot_key = "f" * 24
    bad_fp_key = good.to_proto()
    bad_fp_key.fingerprint.key = "0" * 16
    absurd_time = good.to_proto()
    absurd_time.winner_ms = float("nan")
    odd_block = good.to_proto()
    odd_block.config["BLOCK_M"] = 3
    text_value = good.to_proto()
    text_value.tuning_key = "M=1;DROP TABLE kernel_reports"
    garbage = pb.KernelEntry(slot_key="\x00junk", kernel="💥", config={"x": 1})
    cases = {
        "wrong-fingerprint": make_entry(fingerprint=H100),
        "not-a-candidate": make_entry(not_listed),
        "out-of-bounds": make_entry(winner_ms=0.0),
        "bad-schema": wrong_slot,
    }
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
    ):
        for cause, entry in cases.items():
            ack = await a1.report([entry])
            assert len(ack.refused) == 1, cause
            assert f": {cause}: " in ack.refused[0], ack.refused[0]
        ack = await a1.report([bad_fp_key, absurd_time, odd_block, text_value, garbage])
        causes = [r.split(": ")[1] for r in ack.refused]
        assert (
            causes
            == ["bad-schema", "out-of-bounds", "out-of-bounds"] + ["bad-schema"] * 2
        )
        assert ack.refused[4].startswith("?junk: ")
        assert "H100" in (await a1.report([make_entry(fingerprint=H100)])).refused[0]
        # Only refusals so far: nothing was stored or pushed.
        assert await a2.pending("install_kernels") == []
        listing = await _admin(broker, "ListKernels", pb.ListKernelsRequest())
        assert list(listing.slots) == []

        ack = await a1.report([good])
        assert list(ack.refused) == []
        assert len(await a2.installed()) == 1
    refused = await events_of(broker, "kernel.refused")
    assert {e.cause for e in refused} >= set(cases)
    assert all(json.loads(e.data_json)["source"] == "broker" for e in refused)
    text = await _metrics(broker)
    assert 'gpufleet_kernel_refusals_total{cause="not-a-candidate"} 1.0' in text
    assert 'gpufleet_kernel_refusals_total{cause="wrong-fingerprint"} 2.0' in text
    hosts = await _admin(broker, "ListHosts", pb.ListHostsRequest())
    assert {h.identity.host_id for h in hosts.hosts} == {"a1", "a2"}


async def test_catalog_hello_with_bad_fingerprint_keeps_the_good_ones(
    brokers: Factory,
) -> None:
    broker = await brokers()
    forged = A10G.to_proto()
    forged.key = "0123456789abcdef"
    async with RawAgent(broker.addr, "a1", [forged, H100]) as a1:
        ack = await a1.report([make_entry(), make_entry(fingerprint=H100)])
        assert [r.split(": ")[1] for r in ack.refused] == ["wrong-fingerprint"]
    text = await _metrics(broker)
    assert 'reason="bad-kernel-fingerprint"} 1.0' in text


async def test_catalog_refused_verdict_flags_tuner_and_survives_restart(
    db_url: str, brokers: Factory
) -> None:
    broker = await brokers(database_url=db_url)
    entry = make_entry()
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
        RawAgent(broker.addr, "a3", [A10G]) as a3,
    ):
        await a1.report([entry])
        [pushed] = await a2.installed()
        await a3.installed()

        # A verdict naming a host that never tuned the config flags nobody,
        # nor does one from a verifier that could not reach a verdict.
        ack = await a2.report(
            verdicts=[
                verdict_on(
                    pushed, accepted=False, reason="wrong-result", tuned_by="a3"
                ),
                verdict_on(pushed, accepted=False, reason="verify-failed: timed out"),
            ]
        )
        assert list(ack.refused) == []
        listing = await _admin(broker, "ListKernels", pb.ListKernelsRequest())
        assert list(listing.flagged_hosts) == []
        assert listing.slots[0].state == "agreed"

        reason = "wrong-result: max error 3.5 > tolerance 0.01"
        await a3.report(verdicts=[verdict_on(pushed, accepted=False, reason=reason)])
        listing = await _admin(broker, "ListKernels", pb.ListKernelsRequest())
        assert len(listing.flagged_hosts) == 1
        assert listing.flagged_hosts[0].startswith("a1: a3 refused config ")
        assert reason in listing.flagged_hosts[0]
        assert listing.slots[0].state == "refused"
        assert not listing.slots[0].chosen.config

        other = make_entry(tuning_key="M=64,N=64,K=64,a=float16,b=float16")
        ack = await a1.report([other])
        assert [r.split(": ")[1] for r in ack.refused] == ["sender-flagged"]
        assert "wrong-result" in ack.refused[0]
        assert await a2.pending("install_kernels") == []

        # A flagged host's own verdicts do not flag anyone back.
        await a2.report([make_entry(MATMUL[2], tuning_key="M=128,N=128,K=128")])
        [fresh] = await a1.installed()
        await a1.report(verdicts=[verdict_on(fresh, accepted=False, reason="x: y")])
        listing = await _admin(broker, "ListKernels", pb.ListKernelsRequest())
        assert len(listing.flagged_hosts) == 1

    flagged = await events_of(broker, "kernel.peer_flagged")
    assert [(e.host_id, e.cause) for e in flagged] == [("a1", "wrong-result")]
    await broker.shutdown()

    again = await brokers(database_url=db_url)
    listing = await _admin(again, "ListKernels", pb.ListKernelsRequest())
    assert [f.split(":")[0] for f in listing.flagged_hosts] == ["a1"]
    states = {s.chosen.slot_key: s.state for s in listing.slots}
    assert states == {entry.slot_key: "refused", fresh.slot_key: "agreed"}
    async with RawAgent(again.addr, "a1", [A10G]) as a1:
        ack = await a1.report([other])
        assert [r.split(": ")[1] for r in ack.refused] == ["sender-flagged"]
    async with RawAgent(again.addr, "a4", [A10G]) as a4:
        [only] = await a4.installed()  # the flagged host's entry is not pushed
        assert only.slot_key == fresh.slot_key
        assert only.tuned_by == "a2"


async def test_catalog_agreement_decides_and_a_claimed_time_never_does(
    db_url: str, brokers: Factory
) -> None:
    """One host each: the config reported first stays, whatever time the
    second tuner claims; a verifier's acceptance makes agreement."""
    broker = await brokers(database_url=db_url)
    first_config = make_entry(MATMUL[1], winner_ms=2.0)
    boasting = make_entry(MATMUL[2], winner_ms=1e-300)
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
        RawAgent(broker.addr, "a3", [A10G]) as a3,
    ):
        await a1.report([first_config])
        [first] = await a2.installed()
        assert config_hash(dict(first.config)) == first_config.config_hash
        await a3.installed()

        await a2.report([boasting])
        [back] = await a2.installed()  # a2 runs its own now: sent the fleet's
        assert config_hash(dict(back.config)) == first_config.config_hash
        assert await a1.pending("install_kernels") == []
        assert await a3.pending("install_kernels") == []
        view = await _admin(
            broker, "GetKernel", pb.KernelRequest(slot_key=first_config.slot_key)
        )
        assert view.state == "disputed"
        assert dict(view.chosen.config) == first_config.config

        # a3 accepts the first config: two hosts agree on it now.
        await a3.report(verdicts=[verdict_on(first, accepted=True, entry_ms=2.1)])
        assert await a1.pending("install_kernels") == []  # a1 tuned it
        assert await a3.pending("install_kernels") == []  # a3 verified it
        view = await _admin(
            broker, "GetKernel", pb.KernelRequest(slot_key=first_config.slot_key)
        )
        assert view.chosen.agreeing_hosts == 2
        roles = sorted((r.host_id, r.role) for r in view.reports)
        assert roles == [("a1", "tuned"), ("a2", "tuned"), ("a3", "verified")]
        assert dict(view.chosen.config) == first_config.config
        verified = [r for r in view.reports if r.role == "verified"]
        assert dict(verified[0].config) == first_config.config
    assert len(await events_of(broker, "kernel.verified")) == 1


async def test_catalog_pin_and_evict_reach_every_agent_of_the_hardware(
    db_url: str, brokers: Factory
) -> None:
    broker = await brokers(database_url=db_url)
    slow = make_entry(MATMUL[1], winner_ms=2.0)
    fast = make_entry(MATMUL[2], winner_ms=1.0)
    slot = slow.slot_key
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
        RawAgent(broker.addr, "a3", [A10G]) as a3,
        RawAgent(broker.addr, "h1", [H100]) as h1,
    ):
        await a1.report([slow])
        await a2.installed()
        await a2.report([fast])
        await a2.installed()  # the fleet's choice (a1's, reported first) again
        assert len(await a3.pending("install_kernels")) == 1
        assert await a1.pending("install_kernels") == []

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _admin(
                broker,
                "PinKernel",
                pb.PinKernelRequest(slot_key=slot, from_host_id="a3"),
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'a3' reported no usable config" in str(info.value.details())
        assert "a1, a2" in str(info.value.details())

        view = await _admin(
            broker, "PinKernel", pb.PinKernelRequest(slot_key=slot, from_host_id="a2")
        )
        assert view.state == "pinned"
        assert view.chosen.pinned
        assert dict(view.chosen.config) == fast.config
        [pinned_a1] = await a1.installed()
        assert pinned_a1.pinned
        [pinned_a3] = await a3.installed()
        assert dict(pinned_a3.config) == fast.config
        assert await a2.pending("install_kernels") == []
        assert await h1.pending("install_kernels") == []

        # Reports change nothing while the pin holds.
        await a3.report(verdicts=[verdict_on(pinned_a3, accepted=True)])
        view = await _admin(broker, "GetKernel", pb.KernelRequest(slot_key=slot))
        assert view.state == "pinned"
        pinned = await events_of(broker, "kernel.pinned")
        assert [(e.host_id, e.cause) for e in pinned] == [("a2", "admin")]

        told = await _admin(broker, "EvictKernel", pb.KernelRequest(slot_key=slot))
        assert told.agents_told == 3
        for agent in (a1, a2, a3):
            message = await agent.take("evict_kernels")
            assert list(message.command.evict_kernels.slot_keys) == [slot]
        assert await h1.pending("evict_kernels") == []

    for method in ("GetKernel", "EvictKernel"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _admin(broker, method, pb.KernelRequest(slot_key=slot))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no kernel slot" in str(info.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _admin(broker, "PinKernel", pb.PinKernelRequest(slot_key=slot))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    evicted = await events_of(broker, "kernel.evicted")
    assert json.loads(evicted[0].data_json)["agents_told"] == 3
    listing = await _admin(broker, "ListKernels", pb.ListKernelsRequest())
    assert list(listing.slots) == []


async def test_catalog_pin_without_host_pins_the_current_choice(
    brokers: Factory,
) -> None:
    broker = await brokers()
    entry = make_entry()
    async with RawAgent(broker.addr, "a1", [A10G]) as a1:
        await a1.report([entry])
        view = await _admin(
            broker, "PinKernel", pb.PinKernelRequest(slot_key=entry.slot_key)
        )
    assert view.state == "pinned"
    assert view.chosen.tuned_by == "a1"
    assert dict(view.chosen.config) == entry.config
    listing = await _admin(
        broker, "ListKernels", pb.ListKernelsRequest(fingerprint_key=A10G.key)
    )
    assert [s.state for s in listing.slots] == ["pinned"]
    other = await _admin(
        broker, "ListKernels", pb.ListKernelsRequest(fingerprint_key=H100.key)
    )
    assert list(other.slots) == []
    by_kernel = await _admin(broker, "ListKernels", pb.ListKernelsRequest(kernel="add"))
    assert list(by_kernel.slots) == []


async def test_catalog_admin_calls_need_the_token(brokers: Factory) -> None:
    broker = await brokers()
    admin = broker.admin()
    admin.token = "wrong"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await admin.call("ListKernels", pb.ListKernelsRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def _first_catalog(
    mqtt_url: str, topic: str, wanted: Callable[[dict[str, Any]], bool]
) -> tuple[dict[str, Any], bool]:
    """Subscribes afresh; the first document that ``wanted`` accepts, and
    whether it came as the retained one."""
    target = parse_mqtt_url(mqtt_url)
    async with aiomqtt.Client(target.host, target.port) as sub:
        await sub.subscribe(topic, qos=1)
        async with asyncio.timeout(10):
            async for message in sub.messages:
                document = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                if wanted(document):
                    return dict(document), bool(message.retain)
    raise AssertionError("the subscription ended without a message")


async def _retained_catalog(
    mqtt_url: str, topic: str, wanted: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Waits until the broker published a wanted document, then checks that
    a subscriber arriving later gets it as the retained one."""
    await _first_catalog(mqtt_url, topic, wanted)
    document, retained = await _first_catalog(mqtt_url, topic, lambda d: True)
    assert retained
    assert wanted(document), document
    return document


async def test_catalog_is_published_retained_on_mqtt_per_fingerprint(
    brokers: Factory, mqtt_url: str
) -> None:
    fleet = f"k{secrets.token_hex(4)}"
    broker = await brokers(mqtt_url=mqtt_url, fleet=fleet)
    topic = kernel_topic(fleet, A10G.key)
    entry = make_entry()
    async with RawAgent(broker.addr, "a1", [A10G]) as a1:
        await a1.report([entry])

    document = await _retained_catalog(mqtt_url, topic, lambda d: bool(d["entries"]))
    [published] = document["entries"]
    assert published["slot_key"] == entry.slot_key
    assert published["config"] == entry.config
    assert published["agreeing_hosts"] == 1
    assert document["fleet"] == fleet
    assert document["fingerprint"]["product"] == "NVIDIA A10G"
    assert document["slots"] == {entry.slot_key: "agreed"}

    await broker.admin().call("EvictKernel", pb.KernelRequest(slot_key=entry.slot_key))
    document = await _retained_catalog(
        mqtt_url, topic, lambda d: not d["entries"] and not d["slots"]
    )
    assert document["fingerprint_key"] == A10G.key


async def test_catalog_reconnect_resends_open_install_instead_of_a_second_one(
    brokers: Factory,
) -> None:
    broker = await brokers()
    async with RawAgent(broker.addr, "a1", [A10G]) as a1:
        async with RawAgent(broker.addr, "a2", [A10G]) as a2:
            await a1.report([make_entry()])
            first = await a2.take("install_kernels")
        async with RawAgent(broker.addr, "a2", [A10G]) as a2:
            again = await a2.take("install_kernels")
            assert again.command.command_id == first.command.command_id
            assert await a2.pending("install_kernels") == []
            await a2.send(
                pb.AgentMessage(
                    command_result=pb.CommandResult(
                        command_id=first.command.command_id,
                        status=pb.COMMAND_STATUS_DONE,
                        detail="queued 1 of 1 kernel entries",
                    )
                )
            )
            await a2.sync()
        # Answered but never verified: the next session gets it once more.
        async with RawAgent(broker.addr, "a2", [A10G]) as a2:
            [entry] = await a2.installed()
            assert entry.tuned_by == "a1"


async def test_catalog_flood_of_bad_entries_is_answered_and_bounded(
    brokers: Factory,
) -> None:
    broker = await brokers()
    bad = make_entry(fingerprint=H100).to_proto()
    async with RawAgent(broker.addr, "a1", [A10G]) as a1:
        ack = await a1.report([bad] * 201)
        assert len(ack.refused) == 201
        assert "wrong-fingerprint" in ack.refused[199]
        assert "a report holds at most 200 entries and verdicts" in ack.refused[200]
        assert list((await a1.report([make_entry()])).refused) == []
    assert len(await events_of(broker, "kernel.refused")) == 20
    text = await _metrics(broker)
    assert 'gpufleet_kernel_refusals_total{cause="wrong-fingerprint"} 200.0' in text


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


async def test_catalog_sends_again_what_a_host_could_not_verify(
    db_url: str, brokers: Factory
) -> None:
    """A verifier that crashed is no verdict: the host gets the entry again."""
    broker = await brokers(database_url=db_url)
    async with RawAgent(broker.addr, "a1", [A10G]) as a1:
        await a1.report([make_entry()])
        async with RawAgent(broker.addr, "a2", [A10G]) as a2:
            install = await a2.take("install_kernels")
            [entry] = install.command.install_kernels.entries
            await _done(a2, install)
            failed = verdict_on(
                entry, accepted=False, reason="verify-failed: the verifier hung"
            )
            await a2.report(verdicts=[failed])
            assert await a2.pending("install_kernels") == []
        async with RawAgent(broker.addr, "a2", [A10G]) as a2:
            [again] = await a2.installed()
            assert again.slot_key == entry.slot_key
        listed = await _admin(broker, "ListKernels", pb.ListKernelsRequest())
        assert list(listed.flagged_hosts) == []


async def test_catalog_sends_the_choice_to_a_host_that_tuned_another_winner(
    db_url: str, brokers: Factory
) -> None:
    """After a host re-tunes a slot its own way, the fleet's choice comes back."""
    broker = await brokers(database_url=db_url)
    async with (
        RawAgent(broker.addr, "a1", [A10G]) as a1,
        RawAgent(broker.addr, "a2", [A10G]) as a2,
        RawAgent(broker.addr, "a3", [A10G]) as a3,
    ):
        await a1.report([make_entry(MATMUL[1], winner_ms=1.0)])
        for agent in (a2, a3):
            install = await agent.take("install_kernels")
            [entry] = install.command.install_kernels.entries
            await _done(agent, install)
            await agent.report(verdicts=[verdict_on(entry, accepted=True)])
        view = await _admin(
            broker, "GetKernel", pb.KernelRequest(slot_key=entry.slot_key)
        )
        assert view.chosen.agreeing_hosts == 3

        # a2 tunes the slot again and finds another config; a2 now runs that.
        await a2.report([make_entry(MATMUL[2], winner_ms=2.0)])
        [back] = await a2.installed()
        assert dict(back.config) == dict(entry.config)
        view = await _admin(
            broker, "GetKernel", pb.KernelRequest(slot_key=entry.slot_key)
        )
        assert view.state == "disputed"
        assert dict(view.chosen.config) == dict(entry.config)
        assert view.chosen.agreeing_hosts == 2  # a1 and a3; a2 runs its own now
        assert await a1.pending("install_kernels") == []
