"""``gpufleet agent run`` and ``gpufleet broker serve|init-certs``."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import click
from click.core import ParameterSource

from gpufleet import logs


def _config_path(value: Path | None, env: str, default: str) -> Path | None:
    if value is not None:
        return value
    if os.environ.get(env):
        return Path(os.environ[env])
    path = Path(default)
    return path if path.is_file() else None


def _explicit_broker(ctx: click.Context) -> str | None:
    """The global --broker, when the user gave it (flag or environment)."""
    root = ctx.find_root()
    source = root.get_parameter_source("broker")
    explicit = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return root.params["broker"] if source in explicit else None


@click.group("agent")
def agent() -> None:
    """The per-host agent."""


@agent.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML file (default: $GPUFLEET_AGENT_CONFIG or /etc/gpufleet/agent.yaml).",
)
@click.option(
    "--name", help="Host name in the fleet (default: instance id or hostname)."
)
@click.option("--collector", type=click.Choice(["auto", "nvidia", "amd", "replay"]))
@click.option(
    "--trace",
    "duty_csv",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Replay: a duty-cycle CSV (Alibaba format).",
)
@click.option(
    "--trace-mem",
    "mem_csv",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Replay: the matching memory CSV.",
)
@click.option(
    "--trace-wide",
    "wide_csv",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Replay: a wide CSV (t_s,gpu,gpu_util_pct,...).",
)
@click.option(
    "--pod", "pods", multiple=True, help="Replay: pod id to replay (one GPU each)."
)
@click.option("--speedup", type=float, help="Replay: trace seconds per wall second.")
@click.option(
    "--label", "labels", multiple=True, help="KEY=VALUE host label (repeatable)."
)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--interval", "interval_s", type=float, help="Seconds between samples.")
@click.pass_context
def agent_run(
    ctx: click.Context,
    config_path: Path | None,
    name: str | None,
    collector: str | None,
    duty_csv: Path | None,
    mem_csv: Path | None,
    wide_csv: Path | None,
    pods: tuple[str, ...],
    speedup: float | None,
    labels: tuple[str, ...],
    state_dir: Path | None,
    interval_s: float | None,
) -> None:
    """Run the agent: sample the GPUs and stream to the broker."""
    from gpufleet.agent import daemon
    from gpufleet.agent.config import load_agent_config
    from gpufleet.errors import ConfigError

    bad = [x for x in labels if "=" not in x]
    if bad:
        raise ConfigError("--label", [f"--label {x!r}: must be KEY=VALUE" for x in bad])
    overrides: dict[str, object] = {
        "broker": _explicit_broker(ctx),
        "name": name,
        "collector": collector,
        "replay.duty_csv": duty_csv,
        "replay.mem_csv": mem_csv,
        "replay.wide_csv": wide_csv,
        "replay.pods": list(pods) or None,
        "replay.speedup": speedup,
        "state_dir": state_dir,
        "interval_s": interval_s,
    }
    path = _config_path(
        config_path, "GPUFLEET_AGENT_CONFIG", "/etc/gpufleet/agent.yaml"
    )
    cfg = load_agent_config(path, overrides)
    if labels:
        cfg.labels.update(dict(x.split("=", 1) for x in labels))
    logs.configure(ctx.meta.get("log_level") or cfg.log_level)
    asyncio.run(daemon.run(cfg))


@click.group("broker")
def broker() -> None:
    """The fleet's broker."""


@broker.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML file (default: $GPUFLEET_BROKER_CONFIG or /etc/gpufleet/broker.yaml).",
)
@click.option("--listen", help="gRPC address HOST:PORT (default 127.0.0.1:50051).")
@click.option("--metrics-listen", help="Prometheus /metrics address HOST:PORT.")
@click.option("--database-url", help="sqlite:///path or postgresql://...")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--policy", "policy_file", type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--mqtt-url", help="Publish events to this MQTT broker.")
@click.pass_context
def broker_serve(
    ctx: click.Context,
    config_path: Path | None,
    listen: str | None,
    metrics_listen: str | None,
    database_url: str | None,
    state_dir: Path | None,
    policy_file: Path | None,
    mqtt_url: str | None,
) -> None:
    """Run the broker."""
    from gpufleet.broker.config import load_broker_config
    from gpufleet.broker.server import serve

    path = _config_path(
        config_path, "GPUFLEET_BROKER_CONFIG", "/etc/gpufleet/broker.yaml"
    )
    cfg = load_broker_config(
        path,
        {
            "listen": listen,
            "metrics_listen": metrics_listen,
            "database_url": database_url,
            "state_dir": state_dir,
            "policy_file": policy_file,
            "mqtt_url": mqtt_url,
        },
    )
    logs.configure(ctx.meta.get("log_level") or cfg.log_level)
    asyncio.run(serve(cfg))


@broker.command("init-certs")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--broker-name",
    "broker_names",
    multiple=True,
    help="DNS name or IP of the broker (repeatable; localhost is always in).",
)
@click.option("--agent", "agent_names", multiple=True, help="Agent name (repeatable).")
@click.option("--days", type=int, default=825, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def init_certs(
    out_dir: Path,
    broker_names: tuple[str, ...],
    agent_names: tuple[str, ...],
    days: int,
    force: bool,
) -> None:
    """Make a CA and certificates for the broker, agents and the admin CLI."""
    from gpufleet.broker.tls import init_certs as make

    written = make(
        out_dir,
        broker_names=list(broker_names),
        agent_names=list(agent_names),
        days=days,
        force=force,
    )
    for role, path in written.items():
        click.echo(f"{role}\t{path}")


COMMANDS = [agent, broker]
