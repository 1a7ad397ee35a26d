"""``gpufleet kernels`` against a real broker and agents, and on a local cache.

Two agents with the same A10G share one entry: node-a has it tuned in its
cache, the broker pushes it to node-b, whose verifier (a stand-in script at
the subprocess boundary) accepts it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.config import KernelsConfig
from gpufleet.cli.main import main
from gpufleet.kernels.cache import KernelCache
from gpufleet.kernels.candidates import candidates_for
from gpufleet.kernels.entry import KernelEntry, candidates_hash
from gpufleet.kernels.fingerprint import HardwareFingerprint, fingerprint_of
from gpufleet.proto import pb
from tests.e2e.conftest import TOKEN, agent_config, eventually
from tests.fakes.nvml import FakeNvml, a10g

FAKE_VERIFY = Path(__file__).parents[1] / "agent" / "fake_verify.py"
ROOT = Path(__file__).resolve().parents[2]
TUNING_KEY = "M=256,N=256,K=256,dtypes=float16:float16:float16"
UNKNOWN_SLOT = "0123456789abcdef01234567"
Capture = pytest.CaptureFixture[str]


async def run_cli(*args: str) -> int:
    return await asyncio.to_thread(main, list(args))


def _admin(addr: str, *args: str) -> list[str]:
    return ["--broker", addr, "--token", TOKEN, *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tuned_entry(cache: KernelCache) -> KernelEntry:
    host = cache.read_host()
    assert host is not None
    fingerprints, default_key = host
    candidates = candidates_for("matmul", "nvidia")
    return KernelEntry(
        kernel="matmul",
        source_hash="0123456789abcdef",
        candidates_hash=candidates_hash(candidates),
        fingerprint=next(fp for fp in fingerprints.values() if fp.key == default_key),
        tuning_key=TUNING_KEY,
        config=dict(candidates[1]),
        winner_ms=0.8,
        default_ms=1.2,
        tuned_at_s=1.7e9,
        tune_seconds=4.0,
        candidates_tried=len(candidates),
    )


@pytest.fixture
async def fleet(tmp_path: Path, broker_factory, agent_factory, capsys: Capture):
    broker = await broker_factory()
    caches, agents = {}, {}
    for name in ("node-a", "node-b"):
        kernels = KernelsConfig(
            scan_interval_s=0.05,
            verify_command=[
                sys.executable,
                str(FAKE_VERIFY),
                "accept",
                str(tmp_path / f"{name}-verify.jsonl"),
            ],
        )
        cfg = agent_config(tmp_path, broker.addr, name, kernels=kernels)
        collector = NvmlCollector(FakeNvml([a10g(uuid=f"GPU-{name}")]))
        agents[name] = (await agent_factory(cfg, collector)).agent
        caches[name] = KernelCache(cfg.kernel_cache_dir)
    entry = _tuned_entry(caches["node-a"])
    caches["node-a"].store(entry, "local")

    async def verified_by_b() -> bool:
        slots = (await _list_json(broker.addr, capsys))["slots"]
        return bool(slots) and slots[0]["chosen"]["agreeing_hosts"] == 2

    await eventually(verified_by_b)
    # The broker acknowledged node-a's report; node-b only sent a verdict.
    share_a, share_b = agents["node-a"].kernels, agents["node-b"].kernels
    assert share_a is not None
    assert share_b is not None
    await eventually(lambda: share_a.counters.published == 1)
    assert (share_b.counters.published, share_b.counters.verified) == (0, 1)
    return broker, entry, caches


async def _list_json(addr: str, capsys: Capture, *args: str) -> dict[str, Any]:
    code = await run_cli(*_admin(addr, "kernels", "list", "--json", *args))
    assert code == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


async def test_cli_kernels_list_shows_shared_slot_agreed_by_both_hosts(
    fleet, capsys: Capture
) -> None:
    broker, entry, _ = fleet

    data = await _list_json(broker.addr, capsys)
    code = await run_cli(*_admin(broker.addr, "kernels", "list"))
    table = capsys.readouterr()

    slot = data["slots"][0]
    assert slot["state"] == "agreed"
    assert slot["chosen"]["slot_key"] == entry.slot_key
    assert slot["chosen"]["tuned_by"] == "node-a"
    assert data["flagged_hosts"] == []
    assert code == 0
    assert entry.slot_key in table.out
    assert "NVIDIA A10G" in table.out
    assert "1 slots, 0 flagged hosts" in table.err


async def test_cli_kernels_list_filters_by_fingerprint_and_kernel(
    fleet, capsys: Capture
) -> None:
    broker, entry, _ = fleet

    mine = await _list_json(broker.addr, capsys, "--fingerprint", entry.fingerprint.key)
    other = await _list_json(broker.addr, capsys, "--kernel", "softmax")

    assert [s["chosen"]["slot_key"] for s in mine["slots"]] == [entry.slot_key]
    assert other["slots"] == []


async def test_cli_kernels_show_lists_tuned_and_verified_reports(
    fleet, capsys: Capture
) -> None:
    broker, entry, _ = fleet

    code = await run_cli(
        *_admin(broker.addr, "kernels", "show", entry.slot_key, "--json")
    )
    view = json.loads(capsys.readouterr().out)

    assert code == 0
    roles = {(r["host_id"], r["role"]) for r in view["reports"]}
    assert roles == {("node-a", "tuned"), ("node-b", "verified")}
    verified = next(r for r in view["reports"] if r["role"] == "verified")
    assert (verified["entry_ms"], verified["default_ms"]) == (1.5, 2.0)

    code = await run_cli(*_admin(broker.addr, "kernels", "show", entry.slot_key))
    out = capsys.readouterr().out
    assert code == 0
    assert f"slot {entry.slot_key}: matmul on NVIDIA A10G" in out
    assert "node-b" in out


async def test_cli_kernels_pin_from_host_makes_slot_pinned(
    fleet, capsys: Capture
) -> None:
    broker, entry, _ = fleet

    code = await run_cli(
        *_admin(broker.addr, "kernels", "pin", entry.slot_key, "--from-host", "node-a")
    )
    out = capsys.readouterr().out

    assert code == 0
    assert "state pinned" in out
    data = await _list_json(broker.addr, capsys)
    assert data["slots"][0]["state"] == "pinned"


async def test_cli_kernels_evict_tells_agents_and_they_drop_the_entry(
    fleet, capsys: Capture
) -> None:
    broker, entry, caches = fleet

    code = await run_cli(
        *_admin(broker.addr, "kernels", "evict", entry.slot_key, "--json")
    )
    result = json.loads(capsys.readouterr().out)

    assert code == 0
    assert result == {"slot_key": entry.slot_key, "agents_told": 2}

    async def dropped() -> bool:
        found = await asyncio.to_thread(
            caches["node-b"].lookup, entry.fingerprint.key, entry.slot_key
        )
        return found is None

    await eventually(dropped)
    assert (await _list_json(broker.addr, capsys))["slots"] == []


async def test_cli_kernels_unknown_slot_is_not_found_with_hint(
    fleet, capsys: Capture
) -> None:
    broker, _, _ = fleet

    code = await run_cli(*_admin(broker.addr, "kernels", "show", UNKNOWN_SLOT))
    err = capsys.readouterr().err

    assert code == 1
    assert err.startswith("error: ")
    assert UNKNOWN_SLOT in err
    assert "\nhint: " in err
    assert "NOT_FOUND" not in err


async def test_cli_kernels_pin_from_unknown_host_fails_naming_hosts(
    fleet, capsys: Capture
) -> None:
    broker, entry, _ = fleet

    code = await run_cli(
        *_admin(broker.addr, "kernels", "pin", entry.slot_key, "--from-host", "nope")
    )
    err = capsys.readouterr().err

    assert code == 1
    assert "'nope'" in err
    assert "hint: " in err
    assert "node-a" in err


async def test_cli_kernels_list_local_shows_peer_entry_with_verified_times(
    fleet, capsys: Capture
) -> None:
    _, entry, caches = fleet
    root = str(caches["node-b"].root)

    code = await run_cli("kernels", "list", "--local", "--cache-dir", root, "--json")
    data = json.loads(capsys.readouterr().out)

    assert code == 0
    assert data["host"]["default"] == entry.fingerprint.key
    stored = data["entries"][0]
    assert stored["origin"] == "peer"
    assert stored["entry"]["tuned_by"] == "node-a"
    assert stored["verified"]["entry_ms"] == 1.5
    assert data["incoming"] == []
    assert data["refused"] == []


async def test_cli_kernels_unreachable_broker_exits_3(capsys) -> None:
    addr = f"127.0.0.1:{_free_port()}"

    code = await run_cli(*_admin(addr, "--timeout", "1", "kernels", "list"))

    assert code == 3
    assert "cannot reach the broker" in capsys.readouterr().err


# Without a broker --------------------------------------------------------------


def _refused_cache(root: Path) -> tuple[KernelCache, KernelEntry]:
    cache = KernelCache(root)
    fingerprint = _tuned_entry_fingerprint()
    entry = KernelEntry(
        kernel="matmul",
        source_hash="0123456789abcdef",
        candidates_hash="fedcba9876543210",
        fingerprint=fingerprint,
        tuning_key=TUNING_KEY,
        config=dict(candidates_for("matmul", "nvidia")[0]),
        tuned_by="host-z",
    )
    cache.refuse(entry, "wrong-result: output 0 differs in 12 of 65536 values")
    (root / "flagged-hosts.json").write_text(
        json.dumps({"host-z": {"reason": "wrong-result: output 0 differs"}})
    )
    cache.put_incoming(entry.with_agreement(1, pinned=False))
    return cache, entry


def _tuned_entry_fingerprint() -> HardwareFingerprint:
    gpu = pb.GpuInfo(
        name="NVIDIA A10G",
        vendor="nvidia",
        compute_capability="8.6",
        driver_version="550.54.15",
        mem_total_bytes=24 * 1024**3,
    )
    return fingerprint_of(gpu)


def test_cli_kernels_list_local_shows_refused_with_reason(
    tmp_path: Path, capsys: Capture
) -> None:
    _, entry = _refused_cache(tmp_path / "cache")

    code = main(["kernels", "list", "--local", "--cache-dir", str(tmp_path / "cache")])
    out, err = capsys.readouterr()

    assert code == 0
    assert "refused here" in out
    assert "wrong-result: output 0 differs" in out
    assert "waiting for verification" in out
    assert "flagged here" in out
    assert "host-z" in out
    assert entry.slot_key in out
    assert "0 entries, 1 waiting, 1 refused" in err
    assert "no host.json" in err


def test_cli_kernels_list_local_reads_gpufleet_kernel_cache(
    tmp_path: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refused_cache(tmp_path / "cache")
    monkeypatch.setenv("GPUFLEET_KERNEL_CACHE", str(tmp_path / "cache"))

    code = main(["kernels", "list", "--local", "--json", "--kernel", "matmul"])
    data = json.loads(capsys.readouterr().out)

    assert code == 0
    assert data["cache"] == str(tmp_path / "cache")
    assert data["refused"][0]["reason"].startswith("wrong-result")
    assert data["flagged_hosts"] == [
        {"host_id": "host-z", "reason": "wrong-result: output 0 differs"}
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kernels", "show", "not-a-slot"], "24 hexadecimal characters"),
        (["kernels", "evict", "ABC"], "24 hexadecimal characters"),
        (["kernels", "list", "--cache-dir", "/tmp"], "--cache-dir only goes with"),
        (["kernels", "list", "--local", "--cache-dir", "/no/such/dir"], "no such"),
        (["kernels", "tune", "matmul", "--shape", "512xx512"], "positive sizes"),
        (["kernels", "tune", "matmul", "--shape", "-4"], "positive sizes"),
        (["kernels", "tune", "matmul"], "Missing option '--shape'"),
    ],
)
def test_cli_kernels_bad_arguments_are_usage_errors(
    args: list[str], message: str, capsys: Capture
) -> None:
    code = main(args)

    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_kernels_tune_interpreted_stores_local_entry(tmp_path: Path) -> None:
    """Runs in a subprocess: the interpreter must be chosen before Triton loads."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    argv = [sys.executable, "-m", "gpufleet", "kernels", "tune", "add"]
    argv += ["--shape", "2048", "--interpret", "--cache-dir", str(cache_dir), "--json"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["tuned"] is True
    assert result["entry"]["kernel"] == "add"
    stored = KernelCache(cache_dir).entries()
    assert [(s.origin, s.entry.slot_key) for s in stored] == [
        ("local", result["entry"]["slot_key"])
    ]
