"""The kernel catalog's tables on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpufleet.broker.kernelstore import KNOWN, NEW, NEWER, FlagRecord, KernelStore
from gpufleet.broker.store import Store
from tests.broker.kernel_helpers import MATMUL, make_entry


@pytest.fixture
async def kstore(db_url: str) -> AsyncIterator[KernelStore]:
    store = Store(db_url)
    await store.open()
    try:
        yield KernelStore(store)
    finally:
        await store.close()


async def test_kernelstore_tuned_report_is_idempotent_per_slot_host_config(
    kstore: KernelStore,
) -> None:
    entry = make_entry(tuned_by="a")
    assert await kstore.add_tuned(entry, "a", 1.0)
    assert not await kstore.add_tuned(entry, "a", 2.0)
    assert await kstore.add_tuned(make_entry(MATMUL[2]), "a", 3.0)
    assert await kstore.add_tuned(entry, "b", 4.0)
    reports = (await kstore.reports_for_slots([entry.slot_key]))[entry.slot_key]
    assert sorted((r.host_id, r.config_hash, r.at_s) for r in reports) == sorted(
        [
            ("a", entry.config_hash, 1.0),
            ("a", make_entry(MATMUL[2]).config_hash, 3.0),
            ("b", entry.config_hash, 4.0),
        ]
    )
    assert reports[0].entry is not None
    assert reports[0].entry.fingerprint == entry.fingerprint


async def test_kernelstore_verdict_never_overwrites_a_tuned_report(
    kstore: KernelStore,
) -> None:
    entry = make_entry()
    await kstore.add_tuned(entry, "a", 1.0)
    await kstore.add_tuned(entry, "b", 1.0)
    [tuned_a] = [
        r
        for r in (await kstore.reports_for_slots([entry.slot_key]))[entry.slot_key]
        if r.host_id == "a"
    ]
    common = {"entry_ms": 1.0, "default_ms": 2.0, "at_s": 5.0}
    assert not await kstore.add_verdict(
        tuned_a, "b", accepted=False, reason="x", **common
    )
    assert await kstore.add_verdict(tuned_a, "c", accepted=True, reason="", **common)
    assert not await kstore.add_verdict(
        tuned_a, "c", accepted=True, reason="", **common
    )
    assert await kstore.add_verdict(
        tuned_a, "c", accepted=False, reason="y: z", **common
    )
    roles = {
        r.host_id: (r.role, r.tuned_by, r.reason)
        for r in (await kstore.reports_for_slots([entry.slot_key]))[entry.slot_key]
    }
    assert roles == {
        "a": ("tuned", "a", ""),
        "b": ("tuned", "b", ""),
        "c": ("refused", "a", "y: z"),
    }
    assert await kstore.slots_of_host("c") == {entry.slot_key}
    assert await kstore.reported_by_host("c") == {(entry.slot_key, entry.config_hash)}


async def test_kernelstore_pins_flags_and_deletes_survive_reopen(db_url: str) -> None:
    entry = make_entry(tuned_by="a")
    first = Store(db_url)
    await first.open()
    ks = KernelStore(first)
    await ks.add_tuned(entry, "a", 1.0)
    await ks.set_pin(entry, "a", 2.0)
    flag = FlagRecord(
        "a", "b refused it: wrong-result", "b", entry.slot_key, "c" * 16, 3.0
    )
    assert await ks.add_flag(flag)
    assert not await ks.add_flag(FlagRecord("a", "later", "c", "", "", 4.0))
    await first.close()

    second = Store(db_url)
    await second.open()
    try:
        ks = KernelStore(second)
        assert await ks.flags() == {"a": flag}
        pins = await ks.pins()
        assert pins[entry.slot_key].entry == entry
        assert list(await ks.all_reports()) == [entry.slot_key]
        assert await ks.delete_slot(entry.slot_key) == 1
        assert await ks.all_reports() == {}
        assert await ks.pins() == {}
        assert "a" in await ks.flags()  # flags are per host, not per slot
    finally:
        await second.close()


async def test_kernelstore_writes_a_batch_of_tuned_reports_in_one_transaction(
    kstore: KernelStore,
) -> None:
    store = kstore._store
    writes = 0
    real_write = store._write

    def counting_write() -> Any:
        nonlocal writes
        writes += 1
        return real_write()

    entries = [make_entry(tuning_key=f"M={n},N=8,K=8") for n in range(50)]
    first = entries[0]
    bumped = dataclasses.replace(first, tuned_at_s=first.tuned_at_s + 10)
    store._write = counting_write  # type: ignore[method-assign]
    try:
        outcomes = await kstore.add_tuned_many([*entries, first], "a", 1.0)
        assert writes == 1
        assert outcomes == [NEW] * 50 + [KNOWN]
        again = await kstore.add_tuned_many(
            [bumped, entries[1], make_entry(MATMUL[2], tuning_key="M=1,N=8,K=8")],
            "a",
            2.0,
        )
        assert writes == 2
    finally:
        store._write = real_write  # type: ignore[method-assign]
    assert again == [NEWER, KNOWN, NEW]
    tuned = await kstore.tuned_of_host("a")
    assert len(tuned) == 50
    assert tuned[entries[1].slot_key] == {
        entries[1].config_hash,
        make_entry(MATMUL[2]).config_hash,
    }
    reports = (await kstore.reports_for_slots([first.slot_key]))[first.slot_key]
    assert [(r.at_s, r.entry.tuned_at_s if r.entry else 0) for r in reports] == [
        (2.0, bumped.tuned_at_s)
    ]
    assert await kstore.tuned_of_host("b") == {}


async def test_store_lists_a_hosts_commands_of_one_kind_in_any_state(
    db_url: str,
) -> None:
    store = Store(db_url)
    await store.open()
    try:
        await store.add_command("c1", "h", "install_kernels", b"1", 1.0)
        await store.add_command("c2", "h", "evict_kernels", b"2", 2.0)
        await store.add_command("c3", "h", "install_kernels", b"3", 3.0)
        await store.add_command("c4", "other", "install_kernels", b"4", 4.0)
        await store.set_command_state("c1", "done")
        await store.set_command_state("c3", "failed", "no")
        found = await store.commands_of_kind("h", "install_kernels")
        assert [(c.command_id, c.state) for c in found] == [
            ("c1", "done"),
            ("c3", "failed"),
        ]
        assert await store.pending_commands("h") == [await store.get_command("c2")]
    finally:
        await store.close()
