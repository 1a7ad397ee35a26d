"""Kernel entries are checked data, and the host cache never breaks a reader."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from gpufleet.kernels.cache import CacheLockTimeout, KernelCache
from gpufleet.kernels.candidates import (
    CANDIDATES,
    SHARED_MEMORY_LIMITS,
    candidates_for,
    is_candidate,
)
from gpufleet.kernels.entry import (
    EntryRejected,
    KernelEntry,
    candidates_hash,
    check_config,
    source_hash,
)
from gpufleet.kernels.fingerprint import FingerprintError, HardwareFingerprint

A10G = HardwareFingerprint(
    "nvidia", "NVIDIA A10G", "8.6", 24, "550", "12.4", "3.9.0", 80
)
A100 = HardwareFingerprint(
    "nvidia", "NVIDIA A100-SXM4-80GB", "8.0", 80, "550", "12.4", "3.9.0", 108
)


def _entry(fingerprint: HardwareFingerprint = A10G, **changes: object) -> KernelEntry:
    candidates = candidates_for("matmul", "nvidia")
    fields: dict[str, object] = {
        "kernel": "matmul",
        "source_hash": source_hash("def kernel(): pass"),
        "candidates_hash": candidates_hash(candidates),
        "fingerprint": fingerprint,
        "tuning_key": "M=512,N=512,K=512,a=float16,b=float16",
        "config": candidates[3],
        "winner_ms": 0.05,
        "default_ms": 0.09,
        "tuned_by": "host-a",
        "tuned_at_s": 1_700_000_000.0,
        "tune_seconds": 12.5,
        "candidates_tried": len(candidates),
    }
    fields.update(changes)
    return KernelEntry(**fields)  # type: ignore[arg-type]


def test_entry_round_trips_through_proto_and_json() -> None:
    entry = _entry()
    assert KernelEntry.from_proto(entry.to_proto()) == entry
    assert KernelEntry.from_json(entry.to_json()) == entry
    assert entry.to_proto().slot_key == entry.slot_key


def test_slot_depends_on_fingerprint_source_key_and_candidates() -> None:
    base = _entry()
    assert _entry(A100).slot_key != base.slot_key
    assert _entry(source_hash=source_hash("other")).slot_key != base.slot_key
    assert _entry(tuning_key="M=1024,N=512,K=512").slot_key != base.slot_key
    assert _entry(candidates_hash=candidates_hash([{"x": 1}])).slot_key != (
        base.slot_key
    )
    # The winner and who found it do not move the slot.
    assert _entry(config=candidates_for("matmul", "nvidia")[0]).slot_key == (
        base.slot_key
    )


@pytest.mark.parametrize(
    ("config", "cause", "named"),
    [
        ({"BLOCK_M": 3}, "out-of-bounds", "BLOCK_M=3"),
        ({"BLOCK_M": 1 << 20}, "out-of-bounds", "BLOCK_M"),
        ({"num_warps": 3}, "out-of-bounds", "num_warps=3"),
        ({"num_stages": 99}, "out-of-bounds", "num_stages=99"),
        ({"BLOCK_M": -64}, "out-of-bounds", "BLOCK_M=-64"),
        ({"BLOCK_M": 64.0}, "bad-schema", "BLOCK_M"),
        ({"BLOCK_M": True}, "bad-schema", "BLOCK_M"),
        ({"BLOCK_M": "64"}, "bad-schema", "BLOCK_M"),
        ({"__import__('os')": 1}, "bad-schema", "__import__"),
        ({}, "bad-schema", "empty"),
        ({f"K{i}": 1 for i in range(40)}, "bad-schema", "40 names"),
        ([64, 64], "bad-schema", "mapping"),
    ],
)
def test_bad_configs_are_refused_with_the_value_named(
    config: object, cause: str, named: str
) -> None:
    with pytest.raises(EntryRejected) as caught:
        check_config(config)
    assert caught.value.cause == cause
    assert named in str(caught.value)


def test_forged_slot_and_fingerprint_keys_are_refused() -> None:
    data = _entry().to_dict()
    data["slot_key"] = "0" * 24
    with pytest.raises(EntryRejected, match="slot_key"):
        KernelEntry.from_dict(data)
    data = _entry().to_dict()
    data["fingerprint"]["key"] = "f" * 16
    with pytest.raises(EntryRejected, match="does not match its fields"):
        KernelEntry.from_dict(data)
    message = _entry().to_proto()
    message.fingerprint.key = "f" * 16
    with pytest.raises(EntryRejected):
        KernelEntry.from_proto(message)


@pytest.mark.parametrize(
    "change",
    [
        {"winner_ms": float("nan")},
        {"winner_ms": -1.0},
        {"tuned_at_s": float("inf")},
        {"tuning_key": "M=1;rm -rf /"},
        {"kernel": "../../etc/passwd"},
        {"source_hash": "not-hex"},
        {"candidates_tried": 10**9},
    ],
)
def test_absurd_fields_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(EntryRejected):
        _entry(**change).check()


def test_garbage_json_is_a_schema_error() -> None:
    for text in (b"\xff\xfe", "[1, 2]", "{", json.dumps({"fingerprint": 5})):
        with pytest.raises(EntryRejected) as caught:
            KernelEntry.from_json(text)
        assert caught.value.cause == "bad-schema"


def test_fingerprint_from_dict_checks_types() -> None:
    data = A10G.to_dict()
    data["mem_total_gib"] = "24"
    with pytest.raises(FingerprintError, match="mem_total_gib"):
        HardwareFingerprint.from_dict(data)


def test_candidate_lists_pass_their_own_checks() -> None:
    for kernel, by_vendor in CANDIDATES.items():
        for vendor, configs in by_vendor.items():
            assert configs, (kernel, vendor)
            for config in configs:
                check_config(config)
                assert is_candidate(kernel, vendor, config)
    # The deep A100/H100 pipeline that an A10G cannot fit (shared memory).
    deep = {
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "BLOCK_K": 64,
        "GROUP_M": 8,
        "num_warps": 8,
        "num_stages": 5,
    }
    assert is_candidate("matmul", "nvidia", deep)
    assert (128 * 64 + 64 * 128) * 2 * 5 == 163840 > SHARED_MEMORY_LIMITS["8.6"]
    assert not is_candidate("matmul", "nvidia", {**deep, "num_stages": 6})
    assert not is_candidate("nope", "nvidia", deep)


def test_cache_stores_looks_up_and_removes(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path)
    entry = _entry()
    cache.store(entry, "local")
    stored = cache.lookup(A10G.key, entry.slot_key)
    assert stored is not None
    assert stored.entry == entry
    assert stored.origin == "local"
    assert [s.entry for s in cache.entries(A10G.key)] == [entry]
    assert cache.entries(A100.key) == []
    assert cache.remove_slot(entry.slot_key)
    assert cache.lookup(A10G.key, entry.slot_key) is None


def test_damaged_cache_files_are_skipped_not_raised(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path)
    entry = _entry()
    stored = cache.store(entry, "peer", verified={"entry_ms": 1.0})
    for damage in (b"", b"{not json", b"\x00" * 10, json.dumps({"entry": 1}).encode()):
        stored.path.write_bytes(damage)
        assert cache.lookup(A10G.key, entry.slot_key) is None
        assert cache.entries() == []
    # An entry filed under another slot's name is not believed.
    other = _entry(tuning_key="M=1,N=1,K=1")
    data = {"entry": other.to_dict(), "origin": "local", "stored_at_s": 0}
    stored.path.write_text(json.dumps(data))
    assert cache.lookup(A10G.key, entry.slot_key) is None
    assert cache.lookup("../../etc", "passwd") is None


def test_incoming_and_refused_records(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path)
    entry = _entry()
    cache.put_incoming(entry)
    assert [e for _, e in cache.incoming()] == [entry]
    cache.refuse(entry, "wrong-result: max error 3.5")
    assert cache.incoming() == []
    [refused] = cache.refused()
    assert refused.entry == entry
    assert refused.reason.startswith("wrong-result")


def test_host_record_maps_gpus_to_fingerprints(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path)
    assert cache.read_host() is None
    cache.write_host({"GPU-1": A10G, "GPU-2": A100}, A10G.key)
    fingerprints, default = cache.read_host()  # type: ignore[misc]
    assert fingerprints == {"GPU-1": A10G, "GPU-2": A100}
    assert default == A10G.key
    assert cache.fingerprint(A100.key) == A100
    (tmp_path / "host.json").write_text("{]")
    assert cache.read_host() is None


def _hold_lock(root: str, slot: str, seconds: float) -> None:
    with KernelCache(root).slot_lock(slot):
        time.sleep(seconds)


def test_slot_lock_is_host_wide_and_times_out(tmp_path: Path) -> None:
    holder = multiprocessing.get_context("spawn").Process(
        target=_hold_lock, args=(str(tmp_path), "slot1", 3.0)
    )
    holder.start()
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "locks" / "slot1.lock").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        with (
            pytest.raises(CacheLockTimeout, match="slot1"),
            KernelCache(tmp_path).slot_lock("slot1", timeout_s=0.3),
        ):
            pass
        with KernelCache(tmp_path).slot_lock("other", timeout_s=0.3):
            pass
    finally:
        holder.join(10)
