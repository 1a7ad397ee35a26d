"""The agent's kernel sharing: fingerprints, reports, installs and verification.

The verifier is a subprocess; ``fake_verify.py`` stands in for it at that
boundary, and one test runs the real ``python -m gpufleet.kernels.verify``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.agent.config import AgentConfig, KernelsConfig, load_agent_config
from gpufleet.agent.jobs import JobSupervisor
from gpufleet.agent.kernels import (
    FLAGS_FILE,
    RESEND_AFTER_S,
    KernelShare,
    parse_verifier_output,
    triton_version,
)
from gpufleet.errors import ConfigError
from gpufleet.kernels.cache import KernelCache
from gpufleet.kernels.entry import KernelEntry
from gpufleet.kernels.fingerprint import HardwareFingerprint, fingerprint_of
from gpufleet.proto import pb
from tests.e2e.conftest import agent_config, eventually, start_agent
from tests.fakes.nvml import FakeNvml, a10g, h100_idle

FAKE_VERIFY = Path(__file__).with_name("fake_verify.py")
GIB = 1024**3
HOST = "host-a"
PEER = "host-b"


def _gpu(uuid: str, index: int, name: str, cc: str, mem_gib: int) -> pb.GpuInfo:
    return pb.GpuInfo(
        uuid=uuid,
        index=index,
        name=name,
        vendor="nvidia",
        driver_version="550.54.15",
        compute_capability=cc,
        mem_total_bytes=mem_gib * GIB,
    )


A10G_0 = _gpu("GPU-a10g-0", 0, "NVIDIA A10G", "8.6", 24)
A10G_1 = _gpu("GPU-a10g-1", 1, "NVIDIA A10G", "8.6", 24)
H100 = _gpu("GPU-h100-0", 2, "NVIDIA H100 80GB HBM3", "9.0", 80)
BIG_MATMUL = {
    "BLOCK_M": 128,
    "BLOCK_N": 128,
    "BLOCK_K": 64,
    "GROUP_M": 8,
    "num_warps": 8,
    "num_stages": 5,
}
SMALL_MATMUL = {**BIG_MATMUL, "BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 3}


def _fp(gpu: pb.GpuInfo) -> HardwareFingerprint:
    return fingerprint_of(gpu, triton=triton_version())


def _entry(
    fp: HardwareFingerprint,
    config: dict[str, int] = BIG_MATMUL,
    *,
    tuned_by: str = PEER,
    tuning_key: str = "M=256,N=256,K=256,a=float16,b=float16",
) -> KernelEntry:
    return KernelEntry(
        kernel="matmul",
        source_hash="0123456789abcdef",
        candidates_hash="fedcba9876543210",
        fingerprint=fp,
        tuning_key=tuning_key,
        config=dict(config),
        winner_ms=1.0,
        default_ms=2.0,
        tuned_by=tuned_by,
        tuned_at_s=1.7e9,
        tune_seconds=3.0,
        candidates_tried=8,
    )


class Harness:
    """A KernelShare whose broker stream is a list of posted messages."""

    def __init__(self, tmp_path: Path, mode: str, timeout_s: float) -> None:
        self.record = tmp_path / "verify-runs.jsonl"
        self.cfg = KernelsConfig(
            scan_interval_s=0.05,
            verify_command=[sys.executable, str(FAKE_VERIFY), mode, str(self.record)],
            verify_timeout_s=timeout_s,
        )
        self.root = tmp_path / "cache"
        self.cache = KernelCache(self.root)
        self.posted: list[pb.AgentMessage] = []
        self.connected = True
        self.now_s = 1000.0
        self.share = self.new_share()

    def new_share(self) -> KernelShare:
        return KernelShare(
            self.cfg, self.root, host_id=HOST, post=self._post, clock=self.clock
        )

    def clock(self) -> float:
        return self.now_s

    def _post(self, message: pb.AgentMessage) -> bool:
        if self.connected:
            self.posted.append(message)
        return self.connected

    def reports(self) -> list[pb.KernelReport]:
        return [m.kernel_report for m in self.posted if m.HasField("kernel_report")]

    def verdicts(self) -> list[pb.KernelVerdict]:
        return [v for r in self.reports() for v in r.verdicts]

    def runs(self) -> list[dict[str, object]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


Make = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    tasks: list[asyncio.Task[None]] = []

    async def build(
        mode: str = "accept",
        *,
        gpus: tuple[pb.GpuInfo, ...] = (A10G_0, A10G_1, H100),
        timeout_s: float = 20.0,
        run: bool = True,
    ) -> Harness:
        harness = Harness(tmp_path, mode, timeout_s)
        await harness.share.start(list(gpus))
        if run:
            tasks.append(asyncio.create_task(harness.share.run_loop()))
        return harness

    yield build
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _install(h: Harness, *entries: KernelEntry) -> pb.CommandResult:
    command = pb.InstallKernels(entries=[e.to_proto() for e in entries])
    result = await h.share.install(command)
    await h.share.drained()
    return result


# Fingerprints ------------------------------------------------------------------


async def test_kernel_share_start_writes_host_json_with_one_fingerprint_per_gpu(
    make: Make,
) -> None:
    h = await make(run=False)
    host = h.cache.read_host()
    assert host is not None
    by_uuid, default_key = host
    assert set(by_uuid) == {A10G_0.uuid, A10G_1.uuid, H100.uuid}
    assert default_key == _fp(A10G_0).key
    assert by_uuid[A10G_1.uuid] == by_uuid[A10G_0.uuid] != by_uuid[H100.uuid]
    hello = h.share.hello_fingerprints()
    assert sorted(f.key for f in hello) == sorted({_fp(A10G_0).key, _fp(H100).key})
    assert all(HardwareFingerprint.from_proto(f).key == f.key for f in hello)


async def test_kernel_share_job_env_names_cache_and_first_gpu_fingerprint(
    make: Make,
) -> None:
    h = await make(run=False)
    env = h.share.job_env([H100.uuid, A10G_0.uuid])
    assert env == {
        "GPUFLEET_KERNEL_CACHE": str(h.root),
        "GPUFLEET_KERNEL_FINGERPRINT": _fp(H100).key,
    }
    assert h.share.job_env([])["GPUFLEET_KERNEL_FINGERPRINT"] == _fp(A10G_0).key


# Publishing --------------------------------------------------------------------


async def test_kernel_share_publishes_local_entries_once_with_this_host_id(
    make: Make,
) -> None:
    h = await make(run=False)
    h.cache.store(_entry(_fp(A10G_0), tuned_by="job-pid-42"), "local")
    h.cache.store(_entry(_fp(H100), SMALL_MATMUL), "peer")

    report = await h.share.scan_once()
    again = await h.share.scan_once()

    assert report is not None
    assert again is None
    assert [e.tuned_by for e in report.entries] == [HOST]
    assert report.entries[0].fingerprint.key == _fp(A10G_0).key
    h.share.on_ack(pb.KernelReportAck(report_id=report.report_id))
    assert h.share.counters.published == 1
    assert await h.share.scan_once() is None


async def test_kernel_share_restart_does_not_republish_acked_entries(
    make: Make,
) -> None:
    h = await make(run=False)
    h.cache.store(_entry(_fp(A10G_0)), "local")
    first = await h.share.scan_once()
    assert first is not None
    h.share.on_ack(pb.KernelReportAck(report_id=first.report_id))
    await h.share.scan_once()  # saves the acknowledgement

    restarted = h.new_share()
    await restarted.start([A10G_0])
    assert await restarted.scan_once() is None

    h.cache.store(_entry(_fp(A10G_0), SMALL_MATMUL), "local")
    retuned = await restarted.scan_once()
    assert retuned is not None
    assert retuned.report_id > first.report_id
    assert dict(retuned.entries[0].config) == SMALL_MATMUL


async def test_kernel_share_resends_unacked_reports_after_reconnect(
    make: Make,
) -> None:
    h = await make(run=False)
    h.connected = False
    h.cache.store(_entry(_fp(A10G_0)), "local")
    report = await h.share.scan_once()
    assert report is not None
    assert not h.posted

    resent = h.share.resend()

    assert [m.kernel_report for m in resent] == [report]
    h.share.on_ack(pb.KernelReportAck(report_id=report.report_id))
    assert h.share.resend() == []


async def test_kernel_share_posts_again_a_report_unacked_for_a_minute(
    make: Make,
) -> None:
    h = await make(run=False)
    h.cache.store(_entry(_fp(A10G_0)), "local")
    report = await h.share.scan_once()
    h.now_s += RESEND_AFTER_S / 2
    await h.share.scan_once()
    assert h.reports() == [report]

    h.now_s += RESEND_AFTER_S
    await h.share.scan_once()

    assert h.reports() == [report, report]


async def test_kernel_share_logs_each_refusal_in_an_ack_and_does_not_resend(
    make: Make,
) -> None:
    h = await make(run=False)
    h.cache.store(_entry(_fp(A10G_0)), "local")
    report = await h.share.scan_once()
    assert report is not None
    slot = report.entries[0].slot_key
    ack = pb.KernelReportAck(
        report_id=report.report_id,
        refused=[f"{slot}: sender-flagged: {HOST} sent a wrong result before"],
    )

    with capture_logs() as logs:
        h.share.on_ack(ack)

    refusals = [e for e in logs if e["event"] == "kernels.report_refused"]
    assert refusals[0]["slot_key"] == slot
    assert refusals[0]["reason"].startswith("sender-flagged")
    assert h.share.counters.published == 0
    assert await h.share.scan_once() is None


# Installing --------------------------------------------------------------------


async def test_kernel_share_install_accepted_entry_replaces_local_and_reports(
    make: Make,
) -> None:
    h = await make("noisy")
    fp = _fp(A10G_0)
    h.cache.store(_entry(fp, SMALL_MATMUL, tuned_by=HOST), "local")
    entry = _entry(fp)

    result = await _install(h, entry)

    assert result.status == pb.COMMAND_STATUS_DONE
    assert result.detail == "queued 1 of 1 kernel entries"
    stored = h.cache.lookup(fp.key, entry.slot_key)
    assert stored is not None
    assert (stored.origin, stored.entry.config) == ("peer", BIG_MATMUL)
    assert stored.verified is not None
    assert (stored.verified["entry_ms"], stored.verified["default_ms"]) == (1.5, 2.0)
    assert h.cache.incoming() == []
    assert h.share.counters.verified == 1
    await eventually(lambda: bool(h.verdicts()), timeout_s=5)
    verdict = h.verdicts()[0]
    assert verdict.accepted
    assert verdict.tuned_by == PEER
    assert (verdict.slot_key, verdict.config_hash) == (
        entry.slot_key,
        entry.config_hash,
    )


async def test_kernel_share_runs_verifier_with_entry_key_cache_and_environment(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    h = await make()
    h.cfg.verify_bench = "tests.bench:timer"
    entry = _entry(_fp(H100))

    await _install(h, entry)

    run = h.runs()[0]
    args = run["args"]
    assert isinstance(args, list)
    assert args[1:] == [
        "--fingerprint-key",
        _fp(H100).key,
        "--cache",
        str(h.root),
        "--slack",
        "0.25",
        "--bench",
        "tests.bench:timer",
    ]
    assert run["env"] == {
        "TRITON_INTERPRET": "1",
        "GPUFLEET_KERNEL_CACHE": str(h.root),
        "GPUFLEET_KERNEL_FINGERPRINT": _fp(H100).key,
    }
    assert not await asyncio.to_thread(Path(args[0]).exists), "entry file removed"


async def test_kernel_share_refusal_flags_sender_and_skips_its_later_entries(
    make: Make,
) -> None:
    h = await make("refuse")
    fp = _fp(A10G_0)
    first = _entry(fp)

    await _install(h, first)

    refused = h.cache.refused()
    assert [r.reason for r in refused] == [
        "out-of-resources: needs 163840 bytes of shared memory, this GPU allows 101376"
    ]
    assert h.cache.lookup(fp.key, first.slot_key) is None
    assert PEER in h.share.flagged_hosts
    flags = json.loads((h.root / FLAGS_FILE).read_text())
    assert flags[PEER]["slot_key"] == first.slot_key

    later = _entry(fp, SMALL_MATMUL, tuning_key="M=512,N=512,K=512")
    result = await _install(h, later)

    assert "skipped 1: " in result.detail
    assert "sender-flagged" in result.detail
    assert len(h.runs()) == 1, "the flagged sender's entry never reached the verifier"
    await eventually(lambda: len(h.verdicts()) == 2, timeout_s=5)
    assert [v.reason.split(":")[0] for v in h.verdicts()] == [
        "out-of-resources",
        "sender-flagged",
    ]
    assert h.share.counters.refused == 1

    restarted = h.new_share()
    await restarted.start([A10G_0])
    assert PEER in restarted.flagged_hosts


@pytest.mark.parametrize(
    ("mode", "timeout_s", "detail"),
    [
        ("crash", 20.0, "exited with code 1"),
        ("garbage", 20.0, "printed no verdict line"),
        ("hang", 0.3, "ran longer than kernels.verify_timeout_s=0.3 s"),
    ],
)
async def test_kernel_share_broken_verifier_refuses_without_flagging_sender(
    make: Make, mode: str, timeout_s: float, detail: str
) -> None:
    h = await make(mode, timeout_s=timeout_s)
    entry = _entry(_fp(A10G_0))

    with capture_logs() as logs:
        await _install(h, entry)

    assert h.share.flagged_hosts == {}
    assert h.share.counters.verify_failed == 1
    failed = [e for e in logs if e["event"] == "kernel.verify_failed"]
    assert detail in failed[0]["reason"]
    await eventually(lambda: bool(h.verdicts()), timeout_s=5)
    verdict = h.verdicts()[0]
    assert not verdict.accepted
    assert verdict.reason.startswith("verify-failed: ")
    assert h.cache.lookup(_fp(A10G_0).key, entry.slot_key) is None

    result = await _install(h, entry)
    assert result.detail == "queued 1 of 1 kernel entries", "a later push retries"


async def test_kernel_share_verifies_one_entry_at_a_time(make: Make) -> None:
    h = await make()
    entries = [
        _entry(_fp(A10G_0), tuning_key=f"M={m},N=64,K=64") for m in (64, 128, 256)
    ]

    result = await _install(h, *entries)

    assert result.detail == "queued 3 of 3 kernel entries"
    runs = sorted(h.runs(), key=lambda r: float(r["started"]))  # type: ignore[arg-type]
    assert len(runs) == 3
    for before, after in itertools.pairwise(runs):
        assert float(before["ended"]) <= float(after["started"])  # type: ignore[arg-type]


async def test_kernel_share_pre_checks_skip_without_running_the_verifier(
    make: Make,
) -> None:
    h = await make(gpus=(A10G_0,), run=False)
    fp = _fp(A10G_0)
    installed = _entry(fp)
    h.cache.store(installed, "peer")
    foreign = _entry(_fp(H100))
    malformed = _entry(fp, tuning_key="M=1").to_proto()
    malformed.config["num_warps"] = 3

    command = pb.InstallKernels(
        entries=[installed.to_proto(), foreign.to_proto(), malformed]
    )
    result = await h.share.install(command)
    await h.share.drained()

    assert result.status == pb.COMMAND_STATUS_DONE
    assert result.detail.startswith("queued 0 of 3 kernel entries; skipped 3: ")
    assert "already installed" in result.detail
    assert "wrong-fingerprint" in result.detail
    assert "out-of-bounds" in result.detail
    assert h.runs() == []
    assert await h.share.scan_once() is None, "no verdict on any of them"
    assert h.share.flagged_hosts == {}


async def test_kernel_share_evict_removes_slot_and_reports_count(make: Make) -> None:
    h = await make(run=False)
    entry = _entry(_fp(A10G_0))
    h.cache.store(entry, "peer")

    result = await h.share.evict(pb.EvictKernels(slot_keys=[entry.slot_key, "0" * 24]))

    assert result.status == pb.COMMAND_STATUS_DONE
    assert result.detail == "removed 1 of 2 kernel slots"
    assert h.cache.lookup(_fp(A10G_0).key, entry.slot_key) is None


async def test_kernel_share_damaged_state_files_do_not_stop_it(make: Make) -> None:
    h = await make(run=False)
    (h.root / "agent-state.json").write_text("{not json")
    (h.root / FLAGS_FILE).write_text("[1, 2]")
    h.cache.store(_entry(_fp(A10G_0)), "local")

    restarted = h.new_share()
    await restarted.start([A10G_0])

    assert restarted.flagged_hosts == {}
    assert await restarted.scan_once() is not None


ACCEPTED_LINE = b'{"accepted": true, "reason": "", "entry_ms": 1, "default_ms": 2}\n'
WRONG_LINE = b'{"accepted": false, "reason": "wrong-result: max error 3.0"}'


@pytest.mark.parametrize(
    ("stdout", "code", "accepted", "cause"),
    [
        (ACCEPTED_LINE, 0, True, ""),
        (b"log line\n" + WRONG_LINE, 0, False, "wrong-result"),
        (b'{"accepted": false}', 0, False, "verify-failed"),
        (b'{"accepted": true, "entry_ms": -1}', 0, False, "verify-failed"),
        (b'{"accepted": true, "entry_ms": -0.0}', 0, False, "verify-failed"),
        (b'{"accepted": true, "default_ms": 1e8}', 0, False, "verify-failed"),
        (b'{"accepted": true, "entry_ms": 1e400}', 0, False, "verify-failed"),
        (b'{"accepted": true, "entry_ms": 1e7, "default_ms": 0}', 0, True, ""),
        (b'{"accepted": "yes"}', 0, False, "verify-failed"),
        (b"", 0, False, "verify-failed"),
        (ACCEPTED_LINE, 2, False, "verify-failed"),
    ],
)
def test_parse_verifier_output_takes_only_well_formed_verdicts(
    stdout: bytes, code: int, accepted: bool, cause: str
) -> None:
    outcome = parse_verifier_output(stdout, code, b"usage: verify ENTRY.json")
    assert outcome.accepted is accepted
    assert outcome.reason.split(":")[0] == cause
    assert outcome.blame_sender is (cause != "verify-failed")


@pytest.mark.parametrize(
    ("reason", "blamed"),
    [
        ("verify-failed: the entry is too large to verify here", False),
        (" verify-failed : padded", False),
        ("verify-failedness: not the verifier's own cause", True),
        ("wrong-result: output 0 differs", True),
    ],
)
def test_parse_verifier_output_blames_the_sender_unless_the_cause_is_verify_failed(
    reason: str, blamed: bool
) -> None:
    line = json.dumps({"accepted": False, "reason": reason}).encode()

    outcome = parse_verifier_output(line, 0, b"")

    assert outcome.blame_sender is blamed


def test_agent_config_kernels_section_reports_every_bad_field() -> None:
    cfg = AgentConfig()
    cfg.kernels = KernelsConfig(
        scan_interval_s=0,
        verify_command=[],
        verify_timeout_s=-1,
        verify_bench="not a reference",
        slack=-0.5,
    )
    with pytest.raises(ConfigError) as info:
        cfg.validate("agent.yaml")
    fields = [p.split(":")[0] for p in info.value.problems]
    assert fields == [
        "kernels.scan_interval_s",
        "kernels.verify_timeout_s",
        "kernels.verify_command",
        "kernels.verify_bench",
        "kernels.slack",
    ]
    assert AgentConfig().kernel_cache_dir == Path("/var/lib/gpufleet/kernels")


# Wiring into the daemon -----------------------------------------------------------


async def test_job_supervisor_gives_jobs_the_kernel_cache_and_fingerprint(
    make: Make, tmp_path: Path
) -> None:
    h = await make(run=False)
    updates: list[pb.JobUpdate] = []
    jobs = JobSupervisor(
        tmp_path / "state",
        updates.append,
        poll_interval_s=0.02,
        kernel_env=h.share.job_env,
    )
    code = (
        "import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
        "if k.startswith('GPUFLEET_KERNEL')}))"
    )
    command = pb.StartJob(
        job_id="tune-1",
        attempt=1,
        spec=pb.JobSpec(argv=[sys.executable, "-c", code]),
        gpu_uuids=[H100.uuid],
    )

    result = await jobs.start(command)
    assert result.status == pb.COMMAND_STATUS_DONE, result.detail

    async def finished() -> bool:
        await jobs.poll()
        return any(u.state == "succeeded" for u in updates)

    await eventually(finished, timeout_s=10)
    output = tmp_path / "state" / "jobs" / "tune-1" / "1" / "output.log"
    assert json.loads(output.read_text()) == {
        "GPUFLEET_KERNEL_CACHE": str(h.root),
        "GPUFLEET_KERNEL_FINGERPRINT": _fp(H100).key,
    }


@pytest.mark.parametrize("enabled", [True, False])
async def test_agent_runs_kernel_share_and_executes_kernel_commands(
    tmp_path: Path, enabled: bool
) -> None:
    cfg = agent_config(tmp_path, "127.0.0.1:9", "node-k")
    cfg.kernels.enabled = enabled
    collector = NvmlCollector(FakeNvml([a10g(uuid="GPU-k0"), h100_idle(uuid="GPU-k1")]))
    handle = await start_agent(cfg, collector)
    try:
        agent = handle.agent
        hello = agent.hello()
        evict = pb.Command(
            command_id="c1", evict_kernels=pb.EvictKernels(slot_keys=["0" * 24])
        )
        result = await agent.execute(evict)
    finally:
        await handle.shutdown()

    host = KernelCache(tmp_path / "node-k" / "kernels").read_host()
    if enabled:
        assert host is not None
        assert set(host[0]) == {"GPU-k0", "GPU-k1"}
        assert len(hello.kernel_fingerprints) == 2
        assert result.status == pb.COMMAND_STATUS_DONE
        assert result.detail == "removed 0 of 1 kernel slots"
    else:
        assert host is None
        assert not hello.kernel_fingerprints
        assert result.status == pb.COMMAND_STATUS_REFUSED
        assert "kernels.enabled" in result.detail


def test_agent_config_reads_kernels_section_from_yaml_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "kernels:\n"
        "  cache_dir: /srv/kernels\n"
        "  verify_command: [/opt/train/bin/python, -m, gpufleet.kernels.verify]\n"
        "  verify_bench: lab.bench:cuda_events\n"
    )
    monkeypatch.setenv("GPUFLEET_AGENT_KERNELS__SLACK", "0.1")

    cfg = load_agent_config(path)

    assert cfg.kernels.enabled is True
    assert cfg.kernel_cache_dir == Path("/srv/kernels")
    assert cfg.kernels.verify_command[0] == "/opt/train/bin/python"
    assert (cfg.kernels.verify_bench, cfg.kernels.slack) == (
        "lab.bench:cuda_events",
        0.1,
    )
    assert cfg.kernels.scan_interval_s == 5.0
    assert AgentConfig().kernels.verify_command == [
        sys.executable,
        "-m",
        "gpufleet.kernels.verify",
    ]

    path.write_text("kernels:\n  slak: 0.1\n  verify_timeout_s: soon\n")
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert info.value.problems == [
        "kernels.slak: unknown field; did you mean kernels.slack?",
        "kernels.verify_timeout_s: must be a number, got 'soon'",
    ]


# Hardening ------------------------------------------------------------------


async def test_kernel_share_verifies_an_admin_pin_from_a_locally_flagged_sender(
    make: Make,
) -> None:
    h = await make("refuse")
    fp = _fp(A10G_0)
    await _install(h, _entry(fp))
    assert PEER in h.share.flagged_hosts

    refused_pin = dataclasses.replace(
        _entry(fp, SMALL_MATMUL, tuning_key="M=64,N=64,K=64"), pinned=True
    )
    await _install(h, refused_pin)
    h.cfg.verify_command = [
        sys.executable,
        str(FAKE_VERIFY),
        "accept",
        str(h.record),
    ]
    accepted_pin = dataclasses.replace(
        _entry(fp, SMALL_MATMUL, tuning_key="M=128,N=64,K=64"), pinned=True
    )
    unpinned = _entry(fp, SMALL_MATMUL, tuning_key="M=256,N=64,K=64")
    result = await _install(h, accepted_pin, unpinned)

    assert len(h.runs()) == 3, "both pins were verified"
    assert h.cache.lookup(fp.key, refused_pin.slot_key) is None
    stored = h.cache.lookup(fp.key, accepted_pin.slot_key)
    assert stored is not None
    assert stored.origin == "pinned"
    assert result.detail.startswith("queued 1 of 2 kernel entries; skipped 1: ")
    assert "sender-flagged" in result.detail


async def test_kernel_share_pauses_a_sender_after_twenty_verify_failed_in_a_row(
    make: Make,
) -> None:
    h = await make()
    h.cfg.verify_command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    fp = _fp(A10G_0)
    flood = [_entry(fp, tuning_key=f"M={m},N=64,K=64") for m in range(1, 26)]

    with capture_logs() as logs:
        await _install(h, *flood)

    assert h.share.counters.verify_failed == 20
    assert h.share.counters.skipped == 5, "the rest of the queue was set aside"
    assert h.cache.incoming() == []
    paused = [e for e in logs if e["event"] == "kernels.sender_paused"]
    assert [(e["peer"], e["verify_failed_in_a_row"]) for e in paused] == [(PEER, 20)]
    assert h.share.flagged_hosts == {}

    later = _entry(fp, tuning_key="M=999,N=64,K=64")
    other = _entry(fp, tuning_key="M=998,N=64,K=64", tuned_by="host-c")
    result = await _install(h, later, other)
    assert "sender-paused" in result.detail
    assert result.detail.startswith("queued 1 of 2 kernel entries")
    assert h.share.counters.verify_failed == 21, "another sender is still verified"

    h.now_s += 3601.0
    result = await _install(h, later)
    assert result.detail == "queued 1 of 1 kernel entries", "the pause ended"


async def test_kernel_share_verify_failed_streak_ends_with_a_real_verdict(
    make: Make,
) -> None:
    h = await make()
    fp = _fp(A10G_0)
    failing = [sys.executable, "-c", "import sys; sys.exit(3)"]
    accepting = list(h.cfg.verify_command)
    for round_ in range(2):
        h.cfg.verify_command = failing
        await _install(
            h,
            *[_entry(fp, tuning_key=f"M={m},N={round_ + 1},K=8") for m in range(1, 16)],
        )
        h.cfg.verify_command = accepting
        await _install(h, _entry(fp, tuning_key=f"M=1,N={round_ + 1},K=9"))

    assert h.share.counters.verify_failed == 30
    assert h.share.counters.verified == 2, "15 + 15 failures never made 20 in a row"


async def test_kernel_share_rewrites_a_missing_or_damaged_host_file(
    make: Make,
) -> None:
    h = await make(gpus=(A10G_0,), run=False)
    host_file = h.root / "host.json"

    with capture_logs() as logs:
        host_file.unlink()
        await h.share.scan_once()
        assert h.cache.read_host() == ({A10G_0.uuid: _fp(A10G_0)}, _fp(A10G_0).key)
        host_file.write_text('{"fingerprints": ')
        await h.share.scan_once()
        assert h.cache.fingerprint(_fp(A10G_0).key) == _fp(A10G_0)
        await h.share.scan_once()

    rewritten = [e for e in logs if e["event"] == "kernels.host_file_rewritten"]
    assert len(rewritten) == 2, "one line per rewrite, none while it is intact"


@pytest.mark.parametrize(
    "raw", ["1e300", "Infinity", '"12"', "true", "-3", str(2**64), "null"]
)
async def test_kernel_share_bad_next_report_id_falls_back_to_one(
    make: Make, raw: str
) -> None:
    h = await make(run=False)
    (h.root / "agent-state.json").write_text(
        '{"version": 1, "next_report_id": ' + raw + ', "acked": {"s/c": "published"}}'
    )
    h.cache.store(_entry(_fp(A10G_0), tuned_by=HOST), "local")
    restarted = h.new_share()

    with capture_logs() as logs:
        await restarted.start([A10G_0])
    first = await restarted.scan_once()
    h.cache.store(_entry(_fp(A10G_0), tuning_key="M=8,N=8,K=8"), "local")
    second = await restarted.scan_once()

    assert first is not None
    assert first.report_id == 1
    assert second is not None
    assert second.report_id == 2
    assert any(e["event"] == "kernels.state_report_id_invalid" for e in logs)


def _orphaning_verifier(tmp_path: Path, *, new_session: bool) -> list[str]:
    """A verifier that prints its verdict and leaves a child holding stdout."""
    script = tmp_path / "orphaning_verify.py"
    script.write_text(
        "import json, subprocess, sys\n"
        "child = subprocess.Popen(\n"
        "    [sys.executable, '-c', 'import time; time.sleep(30)'],\n"
        f"    start_new_session={new_session},\n"
        ")\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "print(json.dumps({'accepted': True, 'reason': '', 'entry_ms': 1.0,\n"
        "                  'default_ms': 2.0}), flush=True)\n"
    )
    return [sys.executable, str(script)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("new_session", [False, True], ids=["group", "escaped"])
async def test_kernel_share_verifier_child_holding_stdout_does_not_fail_it(
    make: Make, tmp_path: Path, new_session: bool
) -> None:
    h = await make(timeout_s=6.0)
    h.cfg.verify_command = _orphaning_verifier(tmp_path, new_session=new_session)
    entry = _entry(_fp(A10G_0))
    loop = asyncio.get_running_loop()

    started = loop.time()
    try:
        await _install(h, entry)
        took_s = loop.time() - started
        pid = int((tmp_path / "child.pid").read_text())
        if not new_session:
            await eventually(lambda: not _alive(pid), timeout_s=5)
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((tmp_path / "child.pid").read_text()), signal.SIGKILL)

    assert h.share.counters.verify_failed == 0
    assert h.share.counters.verified == 1
    assert took_s < 5.0
    stored = h.cache.lookup(_fp(A10G_0).key, entry.slot_key)
    assert stored is not None
    assert stored.origin == "peer"


# The real verifier -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gpufleet.kernels.verify") is None,
    reason="gpufleet.kernels.verify is not installed",
)
async def test_kernel_share_real_verifier_refuses_config_too_big_for_a10g(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Case 21: an A100 winner forged to the A10G fingerprint is refused."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    registry = pytest.importorskip("gpufleet.kernels.registry")
    h = await make(gpus=(A10G_0,))
    h.cfg.verify_command = [sys.executable, "-m", "gpufleet.kernels.verify"]
    spec = registry.get("matmul")
    entry = KernelEntry(
        kernel="matmul",
        source_hash=spec.source_hash,
        candidates_hash=spec.candidates_hash("nvidia"),
        fingerprint=_fp(A10G_0),
        tuning_key=spec.tuning_key_for([256, 256, 256], "float16"),
        config=BIG_MATMUL,
        winner_ms=0.5,
        tuned_by="a100-host",
    )

    await _install(h, entry)

    reasons = [r.reason for r in h.cache.refused()]
    assert reasons == [
        "out-of-resources: needs 163840 bytes of shared memory, this GPU allows 101376"
    ]
    assert "a100-host" in h.share.flagged_hosts
