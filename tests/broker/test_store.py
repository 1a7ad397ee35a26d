"""Tests of the broker's state store, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpufleet.broker.store import (
    Downsampler,
    HistoryRow,
    Store,
    StoreError,
    normalise_url,
)
from gpufleet.errors import ConfigError
from gpufleet.proto import pb


def _identity(host_id: str = "i-0abc") -> pb.HostIdentity:
    return pb.HostIdentity(
        host_id=host_id,
        hostname="gpu-a17",
        provider="aws",
        region="eu-central-1",
        zone="eu-central-1a",
        instance_id=host_id,
        instance_type="p4d.24xlarge",
        spot=True,
    )


def _gpu(index: int, mem_total_bytes: int = 80 * 2**30) -> pb.GpuInfo:
    return pb.GpuInfo(
        uuid=f"GPU-{index:04d}",
        index=index,
        name="NVIDIA A100-SXM4-80GB",
        vendor="nvidia",
        pci_bus_id=f"00000000:{index:02X}:00.0",
        driver_version="550.54",
        compute_capability="8.0",
        mem_total_bytes=mem_total_bytes,
        sm_activity_supported=True,
    )


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = Store(db_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_store_upsert_host_keeps_first_seen_and_updates_fields(
    store: Store,
) -> None:
    first = await store.upsert_host(
        _identity(),
        labels={"team": "nlp"},
        agent_version="0.1.0",
        status="connected",
        now_s=100.0,
    )
    again = await store.upsert_host(
        _identity(),
        labels={"team": "vision"},
        agent_version="0.2.0",
        status="connected",
        now_s=200.0,
    )
    assert first.first_seen_s == 100.0
    assert again.first_seen_s == 100.0
    assert again.last_seen_s == 200.0
    assert again.labels == {"team": "vision"}
    assert again.agent_version == "0.2.0"
    assert again.spot is True
    assert [h.host_id for h in await store.list_hosts()] == ["i-0abc"]


async def test_store_set_host_status_returns_previous_status(store: Store) -> None:
    await store.upsert_host(
        _identity(), labels={}, agent_version="1", status="connected", now_s=1.0
    )
    assert await store.set_host_status("i-0abc", "lost", 5.0) == "connected"
    assert await store.set_host_status("i-0abc", "lost", 6.0) == "lost"
    assert await store.set_host_status("i-unknown", "lost", 6.0) is None
    host = await store.get_host("i-0abc")
    assert host is not None
    assert (host.status, host.status_since_s, host.last_seen_s) == ("lost", 5.0, 1.0)


async def test_store_touch_hosts_only_moves_last_seen_forward(store: Store) -> None:
    for host_id in ("a", "b"):
        await store.upsert_host(
            _identity(host_id), labels={}, agent_version="1", status="ok", now_s=10.0
        )
    await store.touch_hosts({"a": 20.0, "b": 5.0, "missing": 30.0})
    seen = {h.host_id: h.last_seen_s for h in await store.list_hosts()}
    assert seen == {"a": 20.0, "b": 10.0}


async def test_store_upsert_gpus_keeps_health_and_lists_by_host(store: Store) -> None:
    await store.upsert_host(
        _identity(), labels={}, agent_version="1", status="ok", now_s=1.0
    )
    await store.upsert_gpus("i-0abc", [_gpu(1), _gpu(0)])
    await store.set_gpu_health("GPU-0000", "lost", last_sample_s=42.0)
    await store.upsert_gpus("i-0abc", [_gpu(0, mem_total_bytes=1)])
    gpus = await store.list_gpus("i-0abc")
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].health == "lost"
    assert gpus[0].last_sample_s == 42.0
    assert gpus[0].mem_total_bytes == 1
    assert gpus[1].to_info() == _gpu(1)
    assert await store.list_gpus("other") == []


async def test_store_history_lists_window_and_prunes_old_buckets(
    store: Store,
) -> None:
    rows = [
        HistoryRow("h", "GPU-0", start, 60, 0.5, 0.9, None, 2**40, None)
        for start in (0.0, 60.0, 120.0)
    ]
    await store.append_history(rows)
    got = await store.list_history("GPU-0", 60.0, 180.0)
    assert [r.bucket_start_s for r in got] == [60.0, 120.0]
    assert got[0] == rows[1]
    assert await store.prune_history(100.0) == 2
    assert await store.list_history("GPU-0", 0.0, 1e9) == [rows[2]]


async def test_store_concurrent_events_get_ids_in_call_order(store: Store) -> None:
    records = await asyncio.gather(
        *(store.add_event("host.connected", at_s=float(i)) for i in range(40))
    )
    ids = [r.id for r in records]
    assert ids == sorted(ids)
    assert len(set(ids)) == 40
    listed = await store.list_events(since_id=ids[9], limit=5)
    assert [e.id for e in listed] == ids[10:15]
    assert await store.last_event_id() == ids[-1]


async def test_store_list_events_filters_kinds_and_keeps_data(store: Store) -> None:
    await store.add_event("host.connected", host_id="a", at_s=1.0)
    lost = await store.add_event(
        "host.lost", host_id="a", cause="heartbeat-timeout", data={"n": 3}, at_s=2.0
    )
    got = await store.list_events(kinds=["host.lost"])
    assert got == [lost]
    assert got[0].data == {"n": 3}


async def test_store_action_lifecycle_tracks_open_action(store: Store) -> None:
    action_id = str(uuid.uuid4())
    await store.add_action(
        action_id=action_id,
        host_id="h",
        kind="stop-instance",
        state="pending",
        policy_group="default",
        gpu_uuids=["GPU-0", "GPU-1"],
        dry_run=False,
        started_at_s=1000.0,
        started_wall_s=5000.0,
        usd_per_hour=32.77,
        gpus_priced=8,
    )
    opened = await store.open_action_for_host("h")
    assert opened is not None
    assert opened.gpu_uuids == ["GPU-0", "GPU-1"]
    await store.update_action(action_id, state="done")
    ended = await store.update_action(
        action_id, ended_at_s=4600.0, gpu_hours_saved=2.0, money_saved_usd=32.77
    )
    assert (ended.state, ended.ended_at_s, ended.money_saved_usd) == (
        "done",
        4600.0,
        32.77,
    )
    assert await store.open_action_for_host("h") is None
    assert [a.action_id for a in await store.list_actions()] == [action_id]
    with pytest.raises(KeyError, match="no_such_field"):
        await store.update_action(action_id, no_such_field=1)


async def test_store_commands_leave_pending_once_finished(store: Store) -> None:
    payload = pb.Command(command_id="c1").SerializeToString()
    await store.add_command("c1", "h", "kill-processes", payload, 1.0, None)
    await store.add_command("c2", "h", "kill-processes", payload, 2.0, "a1")
    await store.set_command_state("c1", "acked")
    assert [c.command_id for c in await store.pending_commands("h")] == ["c1", "c2"]
    await store.set_command_state("c1", "done", "killed 2")
    pending = await store.pending_commands("h")
    assert [(c.command_id, c.action_id) for c in pending] == [("c2", "a1")]
    command = await store.get_command("c1")
    assert command is not None
    assert (command.state, command.detail, command.payload) == (
        "done",
        "killed 2",
        payload,
    )
    with pytest.raises(ValueError, match="exploded"):
        await store.set_command_state("c1", "exploded")


async def test_store_duplicate_command_id_raises_store_error(store: Store) -> None:
    await store.add_command("c1", "h", "kill-processes", b"", 1.0)
    with pytest.raises(StoreError, match="write failed"):
        await store.add_command("c1", "h", "kill-processes", b"", 2.0)
    assert len(await store.pending_commands("h")) == 1


async def test_store_gpus_of_unknown_host_raise_store_error(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.upsert_gpus("never-said-hello", [_gpu(0)])


async def test_store_reopen_keeps_every_kind_of_state(db_url: str) -> None:
    """A broker restart loses no state."""
    first = Store(db_url)
    await first.open()
    await first.upsert_host(
        _identity(), labels={"a": "b"}, agent_version="1", status="ok", now_s=1.0
    )
    await first.upsert_gpus("i-0abc", [_gpu(0)])
    event = await first.add_event("policy.applied", at_s=3.0, data={"v": 1})
    await first.add_command("c1", "i-0abc", "kill-processes", b"\x00\x01", 4.0)
    await first.save_policy("groups: []\n", 5.0)
    await first.close()

    second = Store(db_url)
    await second.open()
    try:
        assert (await second.get_host("i-0abc")) is not None
        assert len(await second.list_gpus()) == 1
        assert await second.list_events() == [event]
        assert [c.payload for c in await second.pending_commands("i-0abc")] == [
            b"\x00\x01"
        ]
        assert await second.load_policy() == ("groups: []\n", 5.0)
        later = await second.add_event("host.back", at_s=6.0)
        assert later.id > event.id
    finally:
        await second.close()


async def test_store_load_policy_returns_newest_or_none(store: Store) -> None:
    assert await store.load_policy() is None
    await store.save_policy("a: 1\n", 1.0)
    await store.save_policy("a: 2\n", 2.0)
    assert await store.load_policy() == ("a: 2\n", 2.0)


@pytest.mark.parametrize(
    "url",
    ["mysql://root:hunter2@db/fleet", "redis://x", "not a url at all"],
)
def test_store_unsupported_url_raises_config_error_without_password(
    url: str,
) -> None:
    with pytest.raises(ConfigError) as caught:
        Store(url)
    assert "hunter2" not in str(caught.value)
    assert "sqlite" in (caught.value.hint or "")


def test_store_url_normalises_to_async_drivers() -> None:
    assert normalise_url("sqlite:///x.db").drivername == "sqlite+aiosqlite"
    assert normalise_url("postgresql://u@h/d").drivername == "postgresql+asyncpg"
    assert normalise_url("postgres://u@h/d").drivername == "postgresql+asyncpg"


async def test_store_open_unreachable_postgres_raises_store_error() -> None:
    store = Store("postgresql://postgres:s3cret@127.0.0.1:1/nope")
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert "s3cret" not in str(caught.value)


async def test_store_call_before_open_raises_store_error(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(StoreError, match="not open"):
        await store.list_hosts()


def _sample(ts: float, util: float | None, **fields: float) -> pb.GpuSample:
    sample = pb.GpuSample(gpu_uuid="GPU-0", timestamp_s=ts, **fields)
    if util is not None:
        sample.util_ratio = util
    return sample


def test_downsampler_closes_bucket_when_next_bucket_starts() -> None:
    down = Downsampler(bucket_s=60)
    assert down.add("h", _sample(60.0, 0.2, power_w=100.0)) == []
    assert down.add("h", _sample(90.0, 0.6, mem_used_bytes=5)) == []
    assert down.add("h", _sample(100.0, None, power_w=999.0)) == []
    rows = down.add("h", _sample(121.0, 0.0))
    assert len(rows) == 1
    row = rows[0]
    assert row.bucket_start_s == 60.0
    assert row.samples == 2
    assert row.util_mean_ratio == pytest.approx(0.4)
    assert row.util_max_ratio == 0.6
    assert row.sm_active_max_ratio is None
    assert row.mem_used_max_bytes == 5
    assert row.power_mean_w == 100.0


def test_downsampler_drops_late_samples_and_flushes_open_buckets() -> None:
    down = Downsampler(bucket_s=10)
    down.add("h", _sample(25.0, 0.5, sm_active_ratio=0.3))
    assert down.add("h", _sample(5.0, 0.9)) == []
    assert down.late_samples == 1
    rows = down.flush()
    assert [(r.bucket_start_s, r.sm_active_max_ratio) for r in rows] == [(20.0, 0.3)]
    assert down.flush() == []
