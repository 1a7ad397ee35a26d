"""How long one tick of the broker's job manager takes as the fleet grows.

The job manager ticks once a second on the broker's event loop: it places
pending jobs, asks each job's placement policy what it should run on, and
moves migrations on. Its time is time the loop serves no heartbeat. This
drives the real ``JobManager`` with N pending jobs and H busy hosts (every
host runs a job, so nothing can be placed and every pending job is asked
again on every tick), with the job store and event bus replaced by ones that
keep nothing, and prints the median and worst of five ticks.

    .venv/bin/python bench/job_tick.py [--sizes 500x50,2000x200] [--policy gpufleet]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import types

import structlog

from gpufleet.broker.fleet import GpuState, HostState
from gpufleet.broker.jobs import JobManager
from gpufleet.broker.jobstore import JobRecord
from gpufleet.broker.prices import PriceTable
from gpufleet.proto import pb


class _Store:
    async def save(self, record: JobRecord) -> None:
        return None


class _Events:
    async def emit(self, *args: object, **fields: object) -> None:
        return None


async def _send(host: HostState, command: pb.Command, action_id: object) -> None:
    return None


def _manager(pending: int, hosts: int, policy: str) -> JobManager:
    fleet: dict[str, HostState] = {}
    for i in range(hosts):
        ident = pb.HostIdentity(
            host_id=f"h{i}",
            provider="aws",
            region="us-east-1",
            zone="us-east-1a",
            instance_type="g5.xlarge",
            spot=i % 2 == 0,
        )
        host = HostState(identity=ident, labels={}, agent_version="bench", reaper=None)  # type: ignore[arg-type]
        info = pb.GpuInfo(uuid=f"G{i}", index=0, name="NVIDIA A10G")
        host.gpus = {info.uuid: GpuState(info=info)}
        host.outbox = asyncio.Queue()
        fleet[host.host_id] = host
    core = types.SimpleNamespace(
        fleet=types.SimpleNamespace(hosts=fleet),
        events=_Events(),
        send_command=_send,
        metrics=None,
    )
    manager = JobManager(core, _Store(), PriceTable.load())  # type: ignore[arg-type]
    now = time.time()
    spec = dict(work_hours=10, deadline_s=now + 86400, policy=policy)
    for i in range(hosts):
        view = pb.JobView(
            job_id=f"r{i}",
            state="RUNNING",
            host_id=f"h{i}",
            created_at_s=now,
            spec=pb.JobSpec(gpus=1, argv=["x"], checkpoint_url="/c", **spec),
        )
        view.gpu_uuids.append(f"G{i}")
        manager.jobs[view.job_id] = JobRecord(view)
    for i in range(pending):
        view = pb.JobView(
            job_id=f"p{i}",
            state="PENDING",
            created_at_s=now,
            spec=pb.JobSpec(gpus=1, argv=["x"], **spec),
        )
        manager.jobs[view.job_id] = JobRecord(view)
    return manager


async def _measure(pending: int, hosts: int, policy: str) -> list[float]:
    manager = _manager(pending, hosts, policy)
    await manager.tick()
    times = []
    for _ in range(5):
        manager._last_tick_s = time.time() - 1.0
        started = time.perf_counter()
        await manager.tick()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100x10,500x50,2000x200")
    parser.add_argument("--policy", default="gpufleet")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL)
    )
    print("| pending jobs | hosts | policy | tick median | tick max |")
    print("|---|---|---|---|---|")
    for size in args.sizes.split(","):
        pending, hosts = (int(x) for x in size.split("x"))
        times = asyncio.run(_measure(pending, hosts, args.policy))
        print(
            f"| {pending} | {hosts} | {args.policy} | "
            f"{statistics.median(times) * 1000:.0f} ms | {max(times) * 1000:.0f} ms |"
        )


if __name__ == "__main__":
    main()
