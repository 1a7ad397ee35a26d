"""``gpufleet dev metadata-server``: a local cloud metadata service.

Prints the server's URL on stdout, logs on stderr, and stops on SIGINT or
SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import click

from gpufleet import logs
from gpufleet.errors import ConfigError

CONTROL_HELP = """
\b
Control endpoint (JSON in, JSON out; loopback only, no authentication):
  POST /_gpufleet/notice  {"kind": "spot-interruption", "in_s": 0,
                           "deadline_in_s": 120, "action": "terminate",
                           "moving_time": false}
       kinds: aws spot-interruption | rebalance-recommendation | maintenance;
       gcp preempted | maintenance; azure preempted | maintenance | freeze
  POST /_gpufleet/raw     {"path": "/latest/meta-data/spot/instance-action",
                           "body": "...", "status": 200}   (body null: undo)
  POST /_gpufleet/fault   {"mode": "ok|slow|garbled|error|unauthorized",
                           "delay_s": 2}
  POST /_gpufleet/expire-tokens    (AWS: every IMDSv2 token is dropped)
  POST /_gpufleet/clear            (notices, raw answers and faults)
  GET  /_gpufleet/state
"""


@click.group("dev")
def dev() -> None:
    """Tools to rehearse gpufleet on one machine."""


@dev.command("metadata-server", epilog=CONTROL_HELP)
@click.option("--cloud", type=click.Choice(["aws", "gcp", "azure"]), required=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port", type=int, default=0, show_default=True, help="0: any free port."
)
@click.option(
    "--notice-in",
    "notice_in_s",
    type=float,
    help="Announce the cloud's spot notice this many seconds after start.",
)
@click.option(
    "--notice-kind",
    help="Kind of the --notice-in notice (default: the cloud's spot notice).",
)
@click.option(
    "--instance-id", help="Instance id (AWS), numeric id (GCP), vmId (Azure)."
)
@click.option("--instance-type", help="Instance type, machine type or VM size.")
@click.option("--region", help="Region (Azure: location).")
@click.option("--zone", help="Zone.")
@click.option(
    "--vm-name",
    default="gpufleet-dev-vm",
    show_default=True,
    help="Azure compute name / GCP instance name.",
)
@click.option("--spot/--on-demand", default=True, show_default=True)
@click.option(
    "--token-ttl-max",
    "token_ttl_max_s",
    type=int,
    default=21600,
    show_default=True,
    help="AWS: the longest IMDSv2 token TTL granted, in seconds.",
)
@click.pass_context
def metadata_server(
    ctx: click.Context,
    cloud: str,
    host: str,
    port: int,
    notice_in_s: float | None,
    notice_kind: str | None,
    instance_id: str | None,
    instance_type: str | None,
    region: str | None,
    zone: str | None,
    vm_name: str,
    spot: bool,
    token_ttl_max_s: int,
) -> None:
    """Serve AWS IMDSv2, the GCP metadata server or Azure IMDS locally.

    Point the agent at the printed URL (aws_base, gcp_base or azure_base) to
    rehearse a preemption: the server answers identity and notice paths as
    the cloud documents, and announces a notice --notice-in seconds after
    start or whenever the control endpoint is asked.
    """
    from gpufleet.dev.metadata_server import MetadataServer

    problems = []
    if notice_in_s is not None and notice_in_s < 0:
        problems.append(f"--notice-in {notice_in_s}: must be >= 0")
    if token_ttl_max_s < 1:
        problems.append(f"--token-ttl-max {token_ttl_max_s}: must be >= 1")
    if not 0 <= port <= 65535:
        problems.append(f"--port {port}: must be 0..65535")
    if problems:
        raise ConfigError("metadata-server options", problems)
    logs.configure(ctx.meta.get("log_level") or "info")

    server = MetadataServer(
        cloud,
        host=host,
        port=port,
        instance_id=instance_id,
        instance_type=instance_type,
        region=region,
        zone=zone,
        spot=spot,
        vm_name=vm_name,
        token_ttl_max_s=token_ttl_max_s,
    )
    if notice_in_s is not None:
        try:
            server.schedule_notice(notice_kind, in_s=notice_in_s)
        except ValueError as exc:
            raise ConfigError("metadata-server options", [str(exc)]) from None
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    click.echo(server.start())
    try:
        stop.wait()
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


COMMANDS = [dev]
