"""Benchmark: how many agents one broker serves while the admin API stays fast.

Starts a real broker process, then a simulator process that opens one real
``AgentService.Connect`` stream per simulated agent (grpc.aio, 100 streams
per channel, each channel its own TCP connection). Every simulated agent says
a valid Hello (its own host_id, one GPU), sends one TelemetryBatch holding one
GpuSample each second (wall-clock timestamps, start times spread over the
second), reads the broker's acks, bounds its unacknowledged batches to 16 as
the real agent does, and sends a Heartbeat when it has sent nothing for the
interval the Welcome gave. Meanwhile this process calls ListHosts and ListGpus
with the admin token, one call every ``--admin-pause`` seconds, and records
their latency.

N grows over ``--steps``; agents of a step stay connected into the next. At
each step, after every agent connected, figures are taken over ``--seconds``
of steady state: connected agents, samples/s the broker counted
(``gpufleet_broker_telemetry_samples_total`` on /metrics), batches acked
later than 2 s, broker CPU (% of one core) and RSS, admin p50/p99. The ramp
stops after a step where the broker could not keep up (over 1 % of batches
late, under 95 % of the samples sent counted, or its core saturated at
95 % CPU) or admin p99 exceeded 200 ms (``--keep-going``: ramp on past a
slow admin API).

On Linux with 2 or more CPUs the broker is pinned to CPU 0 and the simulator
and this process to CPU 1, so that load generation does not take the
broker's core; the simulator's own CPU use is printed to show when it, not
the broker, is the limit. All traffic stays on 127.0.0.1. Run from the
repository root:

    .venv/bin/python bench/broker_load.py [--steps 250,500,1000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

# Run as a script, so this folder is on sys.path.
from agent_footprint import (
    ADMIN_TOKEN,
    SAMPLES_METRIC,
    Broker,
    read_counter,
    start_broker,
    stop_process,
)

from gpufleet.proto import PROTOCOL_VERSION, pb, rpc

DEFAULT_STEPS = "250,500,1000,2000,4000,10000"
LATE_AFTER_S = 2.0
MAX_LATE_RATIO = 0.01
MIN_RECEIVED_RATIO = 0.95
SATURATED_CPU_PCT = 95.0
ADMIN_P99_LIMIT_S = 0.200
MAX_IN_FLIGHT = 16
CONNECT_CONCURRENCY = 200
CONNECT_TIMEOUT_S = 180.0
SETTLE_S = 3.0
MB = 1024 * 1024
GPU_MEM_TOTAL_BYTES = 80 * 1024**3

# One step's figures by name (numbers, and the "problems" text).
Row = dict[str, Any]


# ------------------------------------------------------------ simulator side


@dataclass
class SimStats:
    """What the simulated agents saw since the last ``mark``."""

    batches_sent: int = 0
    samples_sent: int = 0
    heartbeats_sent: int = 0
    held_back: int = 0
    ack_latencies_s: list[float] = field(default_factory=list)
    stream_errors: int = 0


class SimAgent:
    """One simulated agent: one stream, one GPU, one batch a second."""

    def __init__(self, index: int, run_id: str, channel: grpc.aio.Channel) -> None:
        self.host_id = f"bench-{run_id}-{index:05d}"
        self.gpu_uuid = f"GPU-bench-{run_id}-{index:05d}"
        self.channel = channel
        self.call: grpc.aio.StreamStreamCall | None = None
        self.heartbeat_interval_s = 5.0
        self.in_flight: dict[int, float] = {}
        self.next_batch_id = 1
        self.last_sent = time.monotonic()
        self.alive = False

    def hello(self) -> pb.AgentMessage:
        gpu = pb.GpuInfo(
            uuid=self.gpu_uuid,
            index=0,
            name="NVIDIA H100 80GB HBM3 (simulated)",
            vendor="nvidia",
            driver_version="580.00",
            compute_capability="9.0",
            mem_total_bytes=GPU_MEM_TOTAL_BYTES,
            sm_activity_supported=True,
        )
        identity = pb.HostIdentity(host_id=self.host_id, hostname=self.host_id)
        hello = pb.Hello(
            agent_version="bench",
            protocol_version=PROTOCOL_VERSION,
            host=identity,
            gpus=[gpu],
            sent_at_s=time.time(),
        )
        return pb.AgentMessage(hello=hello)

    async def connect(self) -> None:
        """Opens the stream, says hello and waits for the Welcome."""
        self.call = rpc.AgentServiceStub(self.channel).Connect()
        await self.call.write(self.hello())
        async with asyncio.timeout(60):
            first = await self.call.read()
        if first is grpc.aio.EOF or first.WhichOneof("body") != "welcome":
            raise RuntimeError(f"{self.host_id}: no welcome: {first}")
        self.heartbeat_interval_s = first.welcome.heartbeat_interval_s or 5.0
        self.alive = True

    def sample(self) -> pb.GpuSample:
        """A busy H100, as the NVML collector reports one."""
        util = random.uniform(0.3, 0.95)
        return pb.GpuSample(
            gpu_uuid=self.gpu_uuid,
            timestamp_s=time.time(),
            health=pb.GPU_HEALTH_OK,
            util_ratio=util,
            sm_active_ratio=util * 0.8,
            mem_util_ratio=util * 0.5,
            mem_used_bytes=60 * 1024**3,
            mem_total_bytes=GPU_MEM_TOTAL_BYTES,
            power_w=200 + 400 * util,
            temperature_c=55.0,
            sm_clock_hz=1.98e9,
            process_state=pb.PROCESS_LIST_OK,
            processes=[pb.GpuProcess(pid=4242, used_mem_bytes=60 * 1024**3)],
        )

    async def send_loop(self, phase_s: float, stats: SimStats) -> None:
        """One batch each second at ``phase_s`` into the second; heartbeats."""
        assert self.call is not None
        next_tick = time.monotonic() + phase_s
        while True:
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            next_tick += 1.0
            now = time.monotonic()
            if len(self.in_flight) < MAX_IN_FLIGHT:
                batch_id = self.next_batch_id
                self.next_batch_id += 1
                batch = pb.TelemetryBatch(batch_id=batch_id, samples=[self.sample()])
                self.in_flight[batch_id] = now
                await self.call.write(pb.AgentMessage(telemetry=batch))
                stats.batches_sent += 1
                stats.samples_sent += 1
                self.last_sent = now
                continue
            stats.held_back += 1
            if now - self.last_sent >= self.heartbeat_interval_s:
                beat = pb.Heartbeat(sent_at_s=time.time())
                await self.call.write(pb.AgentMessage(heartbeat=beat))
                stats.heartbeats_sent += 1
                self.last_sent = now

    async def read_loop(self, stats: SimStats) -> None:
        """Reads acks and records how long each batch waited for its ack."""
        assert self.call is not None
        while True:
            message = await self.call.read()
            if message is grpc.aio.EOF:
                raise RuntimeError(f"{self.host_id}: the broker ended the stream")
            if message.WhichOneof("body") != "batch_ack":
                continue
            sent = self.in_flight.pop(message.batch_ack.batch_id, None)
            if sent is not None:
                stats.ack_latencies_s.append(time.monotonic() - sent)

    def overdue(self, now: float) -> int:
        """Batches sent more than LATE_AFTER_S ago and still not acked."""
        return sum(1 for sent in self.in_flight.values() if now - sent > LATE_AFTER_S)


class Simulator:
    """Every simulated agent of this process, and the channels they share."""

    def __init__(self, broker_addr: str, agents_per_channel: int) -> None:
        self.broker_addr = broker_addr
        self.agents_per_channel = agents_per_channel
        self.run_id = f"{os.getpid():x}"
        self.channels: list[grpc.aio.Channel] = []
        self.agents: list[SimAgent] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.stats = SimStats()
        self.proc = psutil.Process()
        self.mark_cpu = self.proc.cpu_times()
        self.mark_wall = time.monotonic()

    def _channel_for(self, index: int) -> grpc.aio.Channel:
        while len(self.channels) * self.agents_per_channel <= index:
            # A local subchannel pool gives each channel its own connection.
            options = [("grpc.use_local_subchannel_pool", 1)]
            self.channels.append(
                grpc.aio.insecure_channel(self.broker_addr, options=options)
            )
        return self.channels[index // self.agents_per_channel]

    async def grow_to(self, target: int, timeout_s: float) -> dict[str, float]:
        """Connects agents until ``target`` streams are open or time is up."""
        started = time.monotonic()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        new = [
            SimAgent(i, self.run_id, self._channel_for(i))
            for i in range(len(self.agents), target)
        ]
        self.agents += new

        async def connect(agent: SimAgent) -> None:
            async with gate:
                try:
                    await agent.connect()
                except BaseException:
                    if agent.call is not None:
                        agent.call.cancel()
                    raise

        tasks = [asyncio.create_task(connect(a)) for a in new]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for agent in new:
            if agent.alive:
                self._spawn(agent.send_loop(random.random(), self.stats), agent)
                self._spawn(agent.read_loop(self.stats), agent)
        return {
            "connected": sum(1 for a in self.agents if a.alive),
            "failed": sum(1 for a in new if not a.alive),
            "connect_s": time.monotonic() - started,
        }

    def _spawn(self, coro: object, agent: SimAgent) -> None:
        task = asyncio.create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and t.exception() is not None and agent.alive:
                agent.alive = False
                self.stats.stream_errors += 1

        task.add_done_callback(done)

    def mark(self) -> dict[str, float]:
        """Starts a measurement window."""
        self.stats.__dict__.update(SimStats().__dict__)
        self.mark_cpu = self.proc.cpu_times()
        self.mark_wall = time.monotonic()
        return {}

    def report(self) -> dict[str, float]:
        """The window's figures, as the orchestrator prints them."""
        now = time.monotonic()
        wall_s = now - self.mark_wall
        cpu = self.proc.cpu_times()
        cpu_s = cpu.user - self.mark_cpu.user + cpu.system - self.mark_cpu.system
        lat = sorted(self.stats.ack_latencies_s) or [0.0]
        late = sum(1 for x in lat if x > LATE_AFTER_S)
        late += sum(a.overdue(now) for a in self.agents if a.alive)
        return {
            "connected": sum(1 for a in self.agents if a.alive),
            "channels": len(self.channels),
            "samples_sent_per_s": self.stats.samples_sent / wall_s,
            "batches_sent": self.stats.batches_sent,
            "batches_late": late,
            "held_back": self.stats.held_back,
            "heartbeats_sent": self.stats.heartbeats_sent,
            "stream_errors": self.stats.stream_errors,
            "ack_p50_s": percentile(lat, 0.50),
            "ack_p99_s": percentile(lat, 0.99),
            "sim_cpu_pct": 100.0 * cpu_s / wall_s,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values)) - 1))
    return sorted_values[rank]


async def simulate(broker_addr: str, agents_per_channel: int) -> None:
    """The simulator process: obeys JSON-line commands read from stdin."""
    sim = Simulator(broker_addr, agents_per_channel)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    while line := await reader.readline():
        command = json.loads(line)
        if command["cmd"] == "grow":
            reply = await sim.grow_to(int(command["n"]), command["timeout_s"])
        elif command["cmd"] == "mark":
            reply = sim.mark()
        elif command["cmd"] == "report":
            reply = sim.report()
        else:
            break
        print(json.dumps(reply), flush=True)
    for task in list(sim.tasks):
        task.cancel()
    for channel in sim.channels:
        await channel.close()


# --------------------------------------------------------- orchestrator side


class SimProcess:
    """The simulator child process, driven over its stdin and stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls, broker_addr: str, agents_per_channel: int, cpu: int | None
    ) -> SimProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--simulate",
            broker_addr,
            "--agents-per-channel",
            str(agents_per_channel),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        if cpu is not None:
            os.sched_setaffinity(proc.pid, {cpu})
        return cls(proc)

    async def ask(self, command: dict[str, object], timeout_s: float) -> dict:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()
        async with asyncio.timeout(timeout_s):
            line = await self.proc.stdout.readline()
        if not line:
            raise SystemExit("error: the simulator process died; see its stderr")
        return dict(json.loads(line))

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(b'{"cmd": "quit"}\n')
            self.proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def admin_loop(
    channel: grpc.aio.Channel, seconds: float, pause_s: float
) -> dict[str, list[float]]:
    """Calls ListHosts and ListGpus in turn for ``seconds``; their latencies."""
    stub = rpc.AdminServiceStub(channel)
    metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    calls = (
        ("ListHosts", stub.ListHosts, pb.ListHostsRequest()),
        ("ListGpus", stub.ListGpus, pb.ListGpusRequest()),
    )
    latencies: dict[str, list[float]] = {name: [] for name, _, _ in calls}
    deadline = time.monotonic() + seconds
    turn = 0
    while time.monotonic() < deadline:
        name, method, request = calls[turn % len(calls)]
        turn += 1
        started = time.perf_counter()
        # A failed call (a deadline, say) counts with the time it took.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await method(request, metadata=metadata, timeout=30)
        latencies[name].append(time.perf_counter() - started)
        await asyncio.sleep(pause_s)
    return latencies


@dataclass
class StepContext:
    """What a step needs to measure."""

    broker: Broker
    broker_proc: psutil.Process
    sim: SimProcess
    admin_channel: grpc.aio.Channel
    seconds: float
    admin_pause_s: float


async def measure_step(ctx: StepContext, n: int) -> Row:
    """Grows the fleet to ``n`` agents, then measures a steady window."""
    grow = await ctx.sim.ask(
        {"cmd": "grow", "n": n, "timeout_s": CONNECT_TIMEOUT_S},
        timeout_s=CONNECT_TIMEOUT_S + 60,
    )
    await asyncio.sleep(SETTLE_S)
    await ctx.sim.ask({"cmd": "mark"}, timeout_s=30)
    url = ctx.broker.metrics_url
    samples0 = await asyncio.to_thread(read_counter, url, SAMPLES_METRIC)
    cpu0 = ctx.broker_proc.cpu_times()
    wall0 = time.monotonic()
    admin = await admin_loop(ctx.admin_channel, ctx.seconds, ctx.admin_pause_s)
    samples1 = await asyncio.to_thread(read_counter, url, SAMPLES_METRIC)
    cpu1 = ctx.broker_proc.cpu_times()
    wall_s = time.monotonic() - wall0
    report = await ctx.sim.ask({"cmd": "report"}, timeout_s=30)
    cpu_s = cpu1.user - cpu0.user + cpu1.system - cpu0.system
    row: Row = {"n": n, "connect_s": grow["connect_s"], **report}
    row["connect_failed"] = grow["failed"]
    row["received_per_s"] = (samples1 - samples0) / wall_s
    row["broker_cpu_pct"] = 100.0 * cpu_s / wall_s
    row["broker_rss_mib"] = ctx.broker_proc.memory_info().rss / MB
    for name, values in admin.items():
        ordered = sorted(values)
        row[f"{name}_p50_s"] = percentile(ordered, 0.50)
        row[f"{name}_p99_s"] = percentile(ordered, 0.99)
        row[f"{name}_calls"] = len(values)
    row["admin_p50_s"] = percentile(sorted(admin["ListHosts"] + admin["ListGpus"]), 0.5)
    row["admin_p99_s"] = percentile(
        sorted(admin["ListHosts"] + admin["ListGpus"]), 0.99
    )
    return row


def ingest_problems(row: Row) -> str:
    """Why the telemetry path fell behind at this step, or "" if it kept up."""
    reasons = []
    if row["connected"] < row["n"]:
        reasons.append(f"only {row['connected']:.0f} of {row['n']} connected")
    if row["samples_sent_per_s"] < MIN_RECEIVED_RATIO * row["n"]:
        reasons.append(
            f"the simulator sent only {row['samples_sent_per_s']:.0f} samples/s "
            "(a load-generator limit, not the broker's)"
        )
    sent = max(row["batches_sent"], 1)
    if row["batches_late"] / sent > MAX_LATE_RATIO:
        reasons.append(f"{row['batches_late']:.0f} batches acked after 2 s or never")
    if row["received_per_s"] < MIN_RECEIVED_RATIO * row["samples_sent_per_s"]:
        reasons.append("the broker counted < 95 % of the samples sent")
    if row["broker_cpu_pct"] >= SATURATED_CPU_PCT:
        reasons.append(
            f"broker CPU {row['broker_cpu_pct']:.0f} % of its core: saturated, "
            "a larger fleet can only fall behind"
        )
    return "; ".join(reasons)


def admin_problem(row: Row) -> str:
    """Why the admin API was too slow at this step, or ""."""
    if row["admin_p99_s"] > ADMIN_P99_LIMIT_S:
        return f"admin p99 {row['admin_p99_s'] * 1000:.0f} ms > 200 ms"
    return ""


HEADER = (
    "| N | connected | connect s | sent/s | received/s | late batches | ack p99 ms "
    "| broker CPU % | broker RSS MiB | ListHosts p50/p99 ms | ListGpus p50/p99 ms "
    "| admin p50/p99 ms | sim CPU % |"
)


def format_row(r: Row) -> str:
    ms = 1000.0
    cells = [
        f"{r['n']}",
        f"{r['connected']:.0f}",
        f"{r['connect_s']:.1f}",
        f"{r['samples_sent_per_s']:.0f}",
        f"{r['received_per_s']:.0f}",
        f"{r['batches_late']:.0f}",
        f"{r['ack_p99_s'] * ms:.0f}",
        f"{r['broker_cpu_pct']:.0f}",
        f"{r['broker_rss_mib']:.0f}",
        f"{r['ListHosts_p50_s'] * ms:.0f}/{r['ListHosts_p99_s'] * ms:.0f}",
        f"{r['ListGpus_p50_s'] * ms:.0f}/{r['ListGpus_p99_s'] * ms:.0f}",
        f"{r['admin_p50_s'] * ms:.0f}/{r['admin_p99_s'] * ms:.0f}",
        f"{r['sim_cpu_pct']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def pick_cpus(pin: bool) -> tuple[int | None, int | None]:
    """(broker CPU, load CPU): the first two CPUs we may use, or no pinning."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


async def run_steps(ctx: StepContext, args: argparse.Namespace) -> list[Row]:
    """Measures each step in turn, printing its row; stops when one fails."""
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    rows: list[Row] = []
    for n in args.steps:
        row = await measure_step(ctx, n)
        ingest, admin = ingest_problems(row), admin_problem(row)
        row["problems"] = "; ".join(p for p in (ingest, admin) if p)
        rows.append(row)
        print(format_row(row), flush=True)
        if ingest or (admin and not args.keep_going):
            break
    return rows


async def ramp(args: argparse.Namespace, state_dir: Path) -> list[Row]:
    """Starts the broker and the simulator, runs the steps, stops both."""
    broker_cpu, load_cpu = pick_cpus(not args.no_pin)
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
        print(
            f"broker on CPU {broker_cpu}, simulator and admin client on CPU {load_cpu}"
        )
    else:
        print("no CPU pinning")
    print(
        f"{args.agents_per_channel} streams per channel; "
        f"{args.seconds:.0f} s steady state per step\n"
    )
    broker = start_broker(state_dir, cpu=broker_cpu)
    try:
        sim = await SimProcess.start(
            broker.grpc_addr, args.agents_per_channel, load_cpu
        )
        admin_channel = grpc.aio.insecure_channel(broker.grpc_addr)
        ctx = StepContext(
            broker,
            psutil.Process(broker.proc.pid),
            sim,
            admin_channel,
            args.seconds,
            args.admin_pause,
        )
        try:
            return await run_steps(ctx, args)
        finally:
            await sim.stop()
            await admin_channel.close()
    finally:
        stop_process(broker.proc)


def print_summary(rows: list[Row]) -> None:
    """Says where the ramp stopped and the largest N that passed."""
    good = [r for r in rows if not r["problems"]]
    print()
    for r in rows:
        if r["problems"]:
            print(f"N={r['n']}: {r['problems']}")
    best = max((int(r["n"]) for r in good), default=0)
    print(
        f"largest N that kept up with admin p99 under "
        f"{ADMIN_P99_LIMIT_S * 1000:.0f} ms: {best or 'none'} (target: 10000)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        default=DEFAULT_STEPS,
        type=lambda s: [int(x) for x in s.split(",")],
        help=f"agent counts to ramp through (default {DEFAULT_STEPS})",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="steady window")
    parser.add_argument(
        "--admin-pause", type=float, default=0.5, help="seconds between admin calls"
    )
    parser.add_argument("--agents-per-channel", type=int, default=100)
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="ramp on past a slow admin API; stop only when telemetry falls behind",
    )
    parser.add_argument("--simulate", metavar="BROKER", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.simulate:
        asyncio.run(simulate(args.simulate, args.agents_per_channel))
        return 0
    state_dir = Path(tempfile.mkdtemp(prefix="gpufleet-bench-"))
    started = time.monotonic()
    try:
        rows = asyncio.run(ramp(args, state_dir))
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    print_summary(rows)
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
