"""The demo's main sequence: start the fleet, watch it live, summarise."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from gpufleet.broker.policy import IdleRule
from gpufleet.cli.client import AdminClient, ClientOptions
from gpufleet.demo import fleet as demo
from gpufleet.demo import score
from gpufleet.proto import pb


def run_demo(
    *,
    hosts_count: int,
    speedup: float,
    traces: Path | None,
    out_dir: Path | None,
    max_wall_s: float | None,
    live: bool,
) -> int:
    """Runs the demo; returns 0 when no action hit a busy GPU."""
    console = Console(stderr=False)
    traces = demo.find_traces(traces)
    pods, origin_s = demo.pods_in(traces, hosts_count)
    work = demo.work_dir(out_dir)
    policy_path = work / "policy.yaml"
    policy_path.write_text(demo.DEMO_POLICY)
    grpc_port, metrics_port = demo.free_port(), demo.free_port()
    broker_addr = f"127.0.0.1:{grpc_port}"
    token = "demo-" + str(grpc_port)
    console.print(
        f"[bold]gpufleet demo[/]: {len(pods)} hosts replaying real GPU traces "
        f"at {speedup:.0f}x; work dir {work}"
    )
    with demo.moto_ec2() as endpoint:
        env = demo.base_env()
        import os

        os.environ.update(demo.fake_aws_env())
        hosts = demo.start_instances(endpoint, pods)
        users = demo.UserStand(endpoint)
        env_broker = dict(
            env,
            GPUFLEET_BROKER_AWS_ENDPOINT_URL=endpoint,
            GPUFLEET_BROKER_ADMIN_TOKEN=token,
        )
        broker = demo.spawn(
            [
                "broker",
                "serve",
                "--listen",
                broker_addr,
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                "--state-dir",
                str(work / "broker"),
                "--policy",
                str(policy_path),
            ],
            env_broker,
            work / "broker.log",
        )
        opts = ClientOptions(broker=broker_addr, token=token, timeout_s=5.0)
        client = _wait_for_broker(opts, broker)
        start_wall_s = time.time() + 2.0
        for h in hosts:
            agent_env = dict(
                env,
                GPUFLEET_AGENT_IDENTITY__PROVIDER="aws",
                GPUFLEET_AGENT_IDENTITY__REGION=demo.REGION,
                GPUFLEET_AGENT_IDENTITY__ZONE=demo.ZONE,
                GPUFLEET_AGENT_IDENTITY__INSTANCE_ID=h.instance_id,
                GPUFLEET_AGENT_IDENTITY__INSTANCE_TYPE=h.instance_type,
                GPUFLEET_AGENT_IDENTITY__DISCOVER="false",
                GPUFLEET_AGENT_REPLAY__ORIGIN_S=str(origin_s),
                GPUFLEET_AGENT_REPLAY__START_WALL_S=str(start_wall_s),
            )
            h.process = demo.spawn(
                [
                    "--broker",
                    broker_addr,
                    "agent",
                    "run",
                    "--collector",
                    "replay",
                    "--name",
                    h.name,
                    "--trace",
                    str(traces / "pod_gpu_duty_cycle_sample.csv"),
                    "--trace-mem",
                    str(traces / "pod_gpu_memory_used_bytes_sample.csv"),
                    "--pod",
                    h.pod,
                    "--speedup",
                    str(speedup),
                    "--state-dir",
                    str(work / h.name),
                    "--label",
                    "demo=true",
                ],
                agent_env,
                work / f"{h.name}.log",
            )
        by_instance = {h.instance_id: h for h in hosts}
        watcher = demo.EventWatcher(AdminClient(opts), users, by_instance)
        watcher.start()
        duty_csv = traces / "pod_gpu_duty_cycle_sample.csv"
        series = {h.pod: score.load_pod_series(duty_csv, h.pod) for h in hosts}
        span_s = max(s[-1][0] for s in series.values()) - origin_s
        wall_s = span_s / speedup + 4.0
        if max_wall_s:
            wall_s = min(wall_s, max_wall_s)
        deadline = time.monotonic() + wall_s
        try:
            with Live(
                _table(client, users, hosts),
                console=console,
                refresh_per_second=2,
                transient=not live,
            ) as view:
                while time.monotonic() < deadline:
                    time.sleep(1.0)
                    view.update(_table(client, users, hosts))
                    _check_alive(broker, hosts)
            savings = client.call("GetSavings", pb.GetSavingsRequest())
        finally:
            codes = demo.stop_all([h.process for h in hosts if h.process] + [broker])
        shift_s = start_wall_s - origin_s
        return _summary(
            console,
            savings,
            hosts,
            series,
            shift_s,
            codes,
            work,
            watcher.counts,
            users.restarts,
        )


def _wait_for_broker(opts: ClientOptions, broker: object) -> AdminClient:
    deadline = time.monotonic() + 30
    while True:
        try:
            client = AdminClient(opts)
            client.call("ListHosts", pb.ListHostsRequest())
            return client
        except Exception as exc:
            if time.monotonic() > deadline or broker.poll() is not None:  # type: ignore[attr-defined]
                raise RuntimeError(f"the demo's broker did not start: {exc}") from exc
            time.sleep(0.3)


def _check_alive(broker: object, hosts: list[demo.DemoHost]) -> None:
    if broker.poll() is not None:  # type: ignore[attr-defined]
        raise RuntimeError("the demo's broker exited; see broker.log in the work dir")


def _table(
    client: AdminClient, users: demo.UserStand, hosts: list[demo.DemoHost]
) -> Table:
    table = Table(title="gpufleet demo: the fleet, live", header_style="bold")
    for col in (
        "HOST",
        "INSTANCE",
        "EC2 STATE",
        "BROKER",
        "UTIL",
        "MEM GiB",
        "IDLE FOR",
        "TRACE TIME",
    ):
        table.add_column(col)
    try:
        gpus = {
            g.host_id: g for g in client.call("ListGpus", pb.ListGpusRequest()).gpus
        }
        listed = {
            h.identity.host_id: h
            for h in client.call("ListHosts", pb.ListHostsRequest()).hosts
        }
        states = users.states()
    except Exception as exc:
        table.caption = f"broker not answering: {exc}"
        return table
    for h in hosts:
        g = gpus.get(h.instance_id)
        s = g.last_sample if g else None
        util = f"{s.util_ratio * 100:5.1f}%" if s and s.HasField("util_ratio") else "?"
        mem = (
            f"{s.mem_used_bytes / 1024**3:.1f}"
            if s and s.HasField("mem_used_bytes")
            else "?"
        )
        idle_for = "-"
        if g and g.idle and s:
            idle_for = f"{(s.timestamp_s - g.idle_since_s) / 60:.0f} min"
        status = listed[h.instance_id].status if h.instance_id in listed else "-"
        trace_time = time.strftime("%H:%M", time.gmtime(s.timestamp_s)) if s else "-"
        table.add_row(
            h.name,
            f"{h.instance_id} {h.instance_type}",
            states.get(h.instance_id, "?"),
            status,
            util,
            mem,
            idle_for,
            trace_time,
        )
    return table


def _summary(
    console: Console,
    savings: pb.SavingsReport,
    hosts: list[demo.DemoHost],
    series: dict[str, list[tuple[float, float]]],
    shift_s: float,
    codes: list[int],
    work: Path,
    counts: dict[str, int],
    restarts: int,
) -> int:
    pod_of = {h.instance_id: h.pod for h in hosts}
    acted = [
        (pod_of[a.host_id], a.started_at_s - shift_s)
        for a in savings.actions
        if not a.dry_run and a.host_id in pod_of
    ]
    rule = IdleRule(max_activity_ratio=demo.DEMO_THRESHOLD)
    result = score.score_actions(acted, series, rule, demo.DEMO_GRACE_S)
    total_h = sum(s[-1][0] - s[0][0] for s in series.values() if s) / 3600
    oracle = result.oracle_gpu_hours
    table = Table(title="Summary (trace time; one GPU per host)", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("note")
    rows = [
        ("GPU-hours in the traces", f"{total_h:.1f}", ""),
        ("GPU-hours idle", f"{result.gpu_hours_idle:.1f}", "activity <= 2 %"),
        (
            "oracle savings, GPU-h",
            f"{oracle:.1f}",
            "each idle period past 15 min, minus the 15 min",
        ),
        (
            "GPU-hours saved",
            f"{result.saved_gpu_hours:.1f}",
            f"{_ratio(result.saved_gpu_hours, oracle)} of the oracle; "
            "action to the trace's next work",
        ),
        (
            "GPU-hours saved, broker ledger",
            f"{savings.gpu_hours_saved:.1f}",
            "until the host is back or the demo ends",
        ),
        (
            "money saved, broker ledger",
            f"${savings.money_saved_usd:.2f}",
            "on-demand prices of the packaged table",
        ),
        (
            "stop-instance actions",
            str(savings.actions_total),
            f"instances restarted for users: {restarts}",
        ),
        ("actions on busy GPUs", str(result.false_kills), "must be 0"),
        ("regrets", str(result.regrets), "work within 10 min of an action"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print()
    console.print(table)
    console.print(f"events: {dict(sorted(counts.items()))}")
    console.print(
        f"processes exited with {sorted(set(codes))}; logs and database in {work}"
    )
    return 0 if result.false_kills == 0 else 1


def _ratio(a: float, b: float) -> str:
    return f"{a / b * 100:.0f}%" if b else "n/a"
