"""A kernel tuned on one host runs tuned on its twin, and nowhere else.

Three agents join a real broker: node-a and node-b have an A10G, node-c an
H100. A job on node-a calls matmul, which tunes it (Triton's interpreter,
real benchmarks). node-a's agent publishes the winner; the broker pushes it
to node-b only, whose agent verifies it with the real verifier; then a job
on node-b runs matmul with that config and no benchmark at all.

Interpreter timings are only ever filed under a replayed GPU's fingerprint,
so the fleet that shares tuned winners replays its GPUs, as a rehearsal
fleet on CPUs does; the hostile peer's fleet keeps real NVIDIA fingerprints,
whose shared-memory limits the verifier checks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.config import KernelsConfig
from gpufleet.kernels.cache import KernelCache
from gpufleet.kernels.candidates import candidates_for
from gpufleet.kernels.entry import KernelEntry, candidates_hash
from gpufleet.proto import pb
from tests.e2e.conftest import agent_config, events_of, eventually
from tests.fakes.nvml import FakeNvml, a10g, h100_idle

# Looked up, not imported: importing Triton here, before tests/kernels sets
# TRITON_INTERPRET, would make the kernels there compile for a GPU.
pytestmark = [
    pytest.mark.slow,
    # Tuning and verifying in the interpreter take a minute on a busy machine.
    pytest.mark.timeout(400),
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None, reason="Triton is not installed"
    ),
]

JOB = Path(__file__).with_name("kernel_job.py")
ROOT = Path(__file__).resolve().parents[2]
SHAPE = ("64", "48", "32")


def _run_job(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(JOB), *SHAPE],
        env={**os.environ, **env, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]


class ReplayedNvml(NvmlCollector):
    """The fake GPUs as a host that replays GPU traces reports them."""

    def open(self) -> list[pb.GpuInfo]:
        gpus = super().open()
        for gpu in gpus:
            gpu.vendor = "replay"
        return gpus


@pytest.fixture(params=["nvidia"])
def collector(request: pytest.FixtureRequest) -> type[NvmlCollector]:
    return ReplayedNvml if request.param == "replay" else NvmlCollector


@pytest.fixture
async def fleet(tmp_path: Path, broker_factory, agent_factory, monkeypatch, collector):
    # The agents' verifier subprocesses inherit this: Triton on the CPU.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    broker = await broker_factory()
    gpus = {
        "node-a": a10g(uuid="GPU-a"),
        "node-b": a10g(uuid="GPU-b"),
        "node-c": h100_idle(uuid="GPU-c"),
    }
    agents = {}
    for name, gpu in gpus.items():
        kernels = KernelsConfig(
            scan_interval_s=0.1,
            # Interpreter timings are noise; the time check has its own tests.
            verify_bench="tests.kernels.fake_bench:equal",
        )
        cfg = agent_config(tmp_path, broker.addr, name, kernels=kernels)
        agents[name] = (await agent_factory(cfg, collector(FakeNvml([gpu])))).agent
    return broker, agents


def _matmul_source_hash() -> str:
    # Asked of another process: importing Triton here would stall the event
    # loop that the broker and the agents share with this test.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gpufleet.kernels import matmul; "
            "print(matmul.matmul_kernel.source_hash)",
        ],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip()


def _share(agent: Any) -> Any:
    assert agent.kernels is not None
    return agent.kernels


@pytest.mark.parametrize("collector", ["replay"], indirect=True)
async def test_tuned_winner_reaches_same_hardware_only_and_runs_untuned(
    fleet,
) -> None:
    broker, agents = fleet
    share_a, share_b, share_c = (
        _share(agents[n]) for n in ("node-a", "node-b", "node-c")
    )
    env_a = share_a.job_env(["GPU-a"])
    env_b = share_b.job_env(["GPU-b"])
    assert env_a["GPUFLEET_KERNEL_FINGERPRINT"] == env_b["GPUFLEET_KERNEL_FINGERPRINT"]

    tuned = await asyncio.to_thread(_run_job, env_a)
    assert tuned["bench_runs"] > 0
    assert tuned["origin"] == "local"
    assert tuned["max_error"] < 1e-4

    async def verified_on_b() -> bool:
        stored = KernelCache(env_b["GPUFLEET_KERNEL_CACHE"]).lookup(
            tuned["fingerprint"], tuned["slot_key"]
        )
        return stored is not None and stored.origin == "peer"

    await eventually(verified_on_b, timeout_s=240)
    reused = await asyncio.to_thread(_run_job, env_b)
    assert reused["bench_runs"] == 0
    assert reused["cache_hits"] == 1
    assert reused["config"] == tuned["config"]
    assert reused["checksum"] == tuned["checksum"]

    # The broker saw both hosts agree; the H100 host was never sent it.
    admin = broker.admin()
    view = await admin.call("GetKernel", pb.KernelRequest(slot_key=tuned["slot_key"]))
    assert view.chosen.agreeing_hosts == 2
    assert {(r.host_id, r.role) for r in view.reports} == {
        ("node-a", "tuned"),
        ("node-b", "verified"),
    }
    assert KernelCache(share_c.cache.root).entries() == []
    assert share_c.counters.verified == 0
    assert await events_of(broker, "kernel.verified")


async def test_hostile_entries_are_refused_and_the_sender_flagged(fleet) -> None:
    """A peer pushes a config too big for an A10G, then more entries."""
    broker, agents = fleet
    share_a, share_b = _share(agents["node-a"]), _share(agents["node-b"])
    fingerprint = share_a.fingerprints["GPU-a"]
    candidates = candidates_for("matmul", "nvidia")
    deep = {
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "BLOCK_K": 64,
        "GROUP_M": 8,
        "num_warps": 8,
        "num_stages": 5,
    }
    forged = KernelEntry(
        kernel="matmul",
        source_hash=await asyncio.to_thread(_matmul_source_hash),
        candidates_hash=candidates_hash(candidates),
        fingerprint=fingerprint,
        tuning_key="M=256,N=256,K=256,dtypes=float16:float16:float16",
        config=deep,
        winner_ms=0.01,
        default_ms=1.0,
        tuned_at_s=1.7e9,
        tune_seconds=1.0,
        candidates_tried=len(candidates),
    )
    share_a.cache.store(forged, "local")

    async def flagged() -> bool:
        listed = await broker.admin().call("ListKernels", pb.ListKernelsRequest())
        return any(h.startswith("node-a:") for h in listed.flagged_hosts)

    await eventually(flagged, timeout_s=240)
    [refused] = KernelCache(share_b.cache.root).refused()
    assert "163840" in refused.reason
    assert "101376" in refused.reason
    assert KernelCache(share_b.cache.root).entries() == []

    # Later entries of the flagged host are refused by the broker itself.
    share_a.cache.store(
        dataclasses.replace(
            forged,
            config=candidates[0],
            tuning_key="M=128,N=128,K=128,dtypes=float16:float16:float16",
        ),
        "local",
    )

    async def refused_as_flagged() -> bool:
        return any(
            e.cause == "sender-flagged"
            for e in await events_of(broker, "kernel.refused")
        )

    await eventually(refused_as_flagged, timeout_s=30)
    assert await events_of(broker, "kernel.peer_flagged")

    # The broker and the agents are still serving.
    async def all_connected() -> bool:
        listed = await broker.admin().call("ListHosts", pb.ListHostsRequest())
        return {h.status for h in listed.hosts} == {"connected"}

    assert await all_connected()
