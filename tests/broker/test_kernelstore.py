"""The kernel catalog's tables on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gpufleet.broker.kernelstore import FlagRecord, KernelStore
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
