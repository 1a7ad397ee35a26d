"""``gpufleet hosts``, ``gpus``, ``idle`` and ``savings``: the fleet's state."""

from __future__ import annotations

import click

from gpufleet.cli.client import AdminClient, ClientOptions, admin_options
from gpufleet.cli.output import (
    duration,
    gib,
    pct,
    print_json,
    print_table,
    to_dict,
    when,
)
from gpufleet.proto import pb

HEALTH = {
    pb.GPU_HEALTH_OK: "ok",
    pb.GPU_HEALTH_LOST: "LOST",
    pb.GPU_HEALTH_ERROR: "error",
}


def _call(opts: ClientOptions, method: str, request: object) -> object:
    client = AdminClient(opts)
    try:
        return client.call(method, request)
    finally:
        client.close()


@click.command("hosts")
@admin_options
@click.pass_obj
def hosts(opts: ClientOptions) -> None:
    """List the hosts of the fleet and whether they report."""
    resp = _call(opts, "ListHosts", pb.ListHostsRequest())
    if opts.json:
        print_json({"hosts": [to_dict(h) for h in resp.hosts]})  # type: ignore[attr-defined]
        return
    rows = []
    for h in resp.hosts:  # type: ignore[attr-defined]
        i = h.identity
        where = "/".join(x for x in (i.provider, i.zone or i.region) if x) or "on-prem"
        kind = (
            i.instance_type + (" (spot)" if i.spot else "") if i.instance_type else "-"
        )
        rows.append(
            [
                h.identity.host_id,
                h.status,
                where,
                kind,
                str(h.gpu_count),
                h.policy_group or "-",
                ", ".join(f"{fp.key} {fp.product}" for fp in h.kernel_fingerprints)
                or "-",
                when(h.last_seen_s),
                h.agent_version,
            ]
        )
    print_table(
        None,
        [
            "HOST",
            "STATUS",
            "WHERE",
            "INSTANCE",
            "GPUS",
            "POLICY",
            "HARDWARE",
            "LAST SEEN (UTC)",
            "AGENT",
        ],
        rows,
    )


@click.command("gpus")
@click.option("--host", "host_id", default="", help="Only this host's GPUs.")
@admin_options
@click.pass_obj
def gpus(opts: ClientOptions, host_id: str) -> None:
    """List every GPU with its latest sample."""
    resp = _call(opts, "ListGpus", pb.ListGpusRequest(host_id=host_id))
    views = list(resp.gpus)  # type: ignore[attr-defined]
    if opts.json:
        print_json({"gpus": [to_dict(g) for g in views]})
        return
    # A GPU's last sample says nothing once its host stopped reporting.
    hosts = _call(opts, "ListHosts", pb.ListHostsRequest())
    status = {h.identity.host_id: h.status for h in hosts.hosts}  # type: ignore[attr-defined]
    rows = []
    for g in views:
        s = g.last_sample
        health = HEALTH.get(s.health, "?") if g.HasField("last_sample") else "no data"
        host_status = status.get(g.host_id, "connected")
        if host_status != "connected":
            health = f"host {host_status}"
        mem = (
            f"{gib(s.mem_used_bytes)}/{gib(g.info.mem_total_bytes)}"
            if s.HasField("mem_used_bytes")
            else "?"
        )
        procs = (
            "unreliable"
            if s.process_state == pb.PROCESS_LIST_UNRELIABLE
            else str(len(s.processes))
        )
        rows.append(
            [
                g.host_id,
                str(g.info.index),
                g.info.name,
                health,
                pct(s, "util_ratio"),
                pct(s, "sm_active_ratio"),
                mem,
                f"{s.power_w:.0f}" if s.HasField("power_w") else "?",
                procs,
                "idle" if g.idle and host_status == "connected" else "-",
            ]
        )
    print_table(
        None,
        [
            "HOST",
            "#",
            "MODEL",
            "HEALTH",
            "UTIL",
            "SM ACT",
            "MEM GiB",
            "POWER W",
            "PROCS",
            "IDLE",
        ],
        rows,
    )
    away = [g for g in views if status.get(g.host_id, "connected") != "connected"]
    here = [g for g in views if status.get(g.host_id, "connected") == "connected"]
    healthy = sum(1 for g in here if g.last_sample.health == pb.GPU_HEALTH_OK)
    lost = sum(1 for g in here if g.last_sample.health == pb.GPU_HEALTH_LOST)
    summary = f"{len(views)} GPUs: {healthy} healthy, {lost} lost"
    if away:
        summary += f", {len(away)} on hosts not connected"
    click.echo(summary, err=True)


@click.command("idle")
@admin_options
@click.pass_obj
def idle(opts: ClientOptions) -> None:
    """What is idle now, since when, and what the policy will do and when."""
    resp = _call(opts, "ListIdle", pb.ListIdleRequest())
    views = list(resp.idle)  # type: ignore[attr-defined]
    if opts.json:
        print_json({"idle": [to_dict(v) for v in views]})
        return
    rows = []
    for v in views:
        procs = ", ".join(f"{p.pid} {p.name}".strip() for p in v.processes) or "-"
        then = when(v.action_at_s) if v.action_at_s else "-"
        action = v.action + (" (dry run)" if v.dry_run else "")
        rows.append(
            [
                v.host_id,
                v.gpu_uuid,
                when(v.idle_since_s),
                duration(v.idle_for_s),
                procs,
                action,
                then,
                v.reason or "-",
            ]
        )
    print_table(
        None,
        [
            "HOST",
            "GPU",
            "IDLE SINCE",
            "FOR",
            "PROCESSES",
            "ACTION",
            "AT (UTC)",
            "REASON",
        ],
        rows,
    )


@click.command("savings")
@admin_options
@click.pass_obj
def savings(opts: ClientOptions) -> None:
    """GPU-hours and money saved by the reaper's actions."""
    r = _call(opts, "GetSavings", pb.GetSavingsRequest())
    if opts.json:
        print_json(to_dict(r))  # type: ignore[arg-type]
        return
    rows = [
        [
            a.action_id,
            a.host_id,
            a.kind + (" (dry run)" if a.dry_run else ""),
            a.state,
            when(a.started_at_s),
            when(a.ended_at_s) if a.ended_at_s else "still off",
            f"{a.gpu_hours_saved:.2f}",
            f"{a.money_saved_usd:.2f}",
        ]
        for a in r.actions
    ]  # type: ignore[attr-defined]
    print_table(
        None,
        [
            "ACTION",
            "HOST",
            "KIND",
            "STATE",
            "STARTED",
            "ENDED",
            "GPU-H SAVED",
            "USD SAVED",
        ],
        rows,
    )
    click.echo(
        f"GPU-hours idle: {r.gpu_hours_idle:.1f}  saved: {r.gpu_hours_saved:.1f}  "  # type: ignore[attr-defined]
        f"money saved: ${r.money_saved_usd:.2f}  actions: {r.actions_total}"  # type: ignore[attr-defined]
    )


COMMANDS = [hosts, gpus, idle, savings]
