"""Listing a large kernel catalog: ListKernels cuts at a limit and says how
many slots there are, and ``gpufleet kernels list`` tells when it was cut."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpufleet.broker import admin_kernels
from gpufleet.cli.main import main
from gpufleet.proto import pb
from tests.broker.kernel_helpers import A10G, RawAgent, make_entry
from tests.e2e.conftest import TOKEN, BrokerHandle, start_broker

Capture = pytest.CaptureFixture[str]


@pytest.fixture
async def catalog(tmp_path: Path) -> AsyncIterator[tuple[BrokerHandle, list[str]]]:
    """A broker whose catalog holds seven matmul slots; their keys, sorted."""
    broker = await start_broker(tmp_path)
    entries = [make_entry(tuning_key=f"M={n},N=8,K=8") for n in range(7)]
    async with RawAgent(broker.addr, "a1", [A10G]) as a1:
        assert list((await a1.report(entries)).refused) == []
    try:
        yield broker, sorted(e.slot_key for e in entries)
    finally:
        await broker.shutdown()


async def _list(broker: BrokerHandle, **fields: Any) -> Any:
    return await broker.admin().call("ListKernels", pb.ListKernelsRequest(**fields))


async def test_list_kernels_returns_at_most_the_limit_in_a_stable_order(
    catalog: tuple[BrokerHandle, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker, slots = catalog
    everything = await _list(broker)
    assert [s.chosen.slot_key for s in everything.slots] == slots
    assert everything.total_slots == 7

    cut = await _list(broker, limit=3)
    assert [s.chosen.slot_key for s in cut.slots] == slots[:3]
    assert cut.total_slots == 7
    none = await _list(broker, limit=3, kernel="softmax")
    assert (list(none.slots), none.total_slots) == ([], 0)

    monkeypatch.setattr(admin_kernels, "DEFAULT_LIST_LIMIT", 2)
    monkeypatch.setattr(admin_kernels, "MAX_LIST_LIMIT", 5)
    assert len((await _list(broker)).slots) == 2
    capped = await _list(broker, limit=1_000_000)
    assert [s.chosen.slot_key for s in capped.slots] == slots[:5]
    assert capped.total_slots == 7


async def _cli(capsys: Capture, broker: BrokerHandle, *args: str) -> Any:
    argv = ["--broker", broker.addr, "--token", TOKEN, "kernels", "list", *args]
    code = await asyncio.to_thread(main, argv)
    assert code == 0
    return capsys.readouterr()


async def test_cli_kernels_list_says_when_it_shows_only_part(
    catalog: tuple[BrokerHandle, list[str]], capsys: Capture
) -> None:
    broker, slots = catalog
    out = await _cli(capsys, broker, "--limit", "3")
    assert "showing 3 of 7 slots" in out.err
    assert [s for s in slots if s in out.out] == slots[:3]

    data = json.loads((await _cli(capsys, broker, "--limit", "3", "--json")).out)
    assert data["total_slots"] == 7
    assert [s["chosen"]["slot_key"] for s in data["slots"]] == slots[:3]

    whole = await _cli(capsys, broker)
    assert "7 slots, 0 flagged hosts" in whole.err
    assert "showing" not in whole.err
    assert json.loads((await _cli(capsys, broker, "--json")).out)["total_slots"] == 7


def test_cli_kernels_list_refuses_a_limit_below_one(capsys: Capture) -> None:
    code = main(["kernels", "list", "--limit", "0"])
    assert code == 2
    assert "--limit" in capsys.readouterr().err
