"""``gpufleet demo``: a simulated fleet reaped on real GPU traces.

``gpufleet demo migrate``: a real training job moved between two agents on a
spot notice, its losses checked against an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import click

from gpufleet import logs


@click.group("demo", invoke_without_command=True)
@click.option(
    "--hosts",
    "hosts_count",
    type=click.IntRange(1, 10),
    default=10,
    show_default=True,
    help="Simulated GPU hosts (one trace pod each).",
)
@click.option(
    "--speedup",
    type=float,
    default=1440.0,
    show_default=True,
    help="Trace seconds per wall second (1440: a day in a minute).",
)
@click.option(
    "--traces",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the Alibaba traces (default: data/alibaba-genai-2026).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep logs and the database here (default: a temp folder).",
)
@click.option("--max-seconds", type=float, help="Stop after this many wall seconds.")
@click.option("--no-live", is_flag=True, help="Do not keep the live table on screen.")
@click.pass_context
def demo(
    ctx: click.Context,
    hosts_count: int,
    speedup: float,
    traces: Path | None,
    out_dir: Path | None,
    max_seconds: float | None,
    no_live: bool,
) -> None:
    """Run a broker and agents on loopback and reap idle GPUs on real traces.

    Without a subcommand: the idle-reaper demo. 'gpufleet demo migrate': the
    preemption and migration demo. 'gpufleet demo spot': the spot market, a
    launched host, a notice and the replacement in another zone.
    """
    if ctx.invoked_subcommand is not None:
        return
    from gpufleet.demo.run import run_demo

    logs.configure(ctx.meta.get("log_level") or "warning")
    code = run_demo(
        hosts_count=hosts_count,
        speedup=speedup,
        traces=traces,
        out_dir=out_dir,
        max_wall_s=max_seconds,
        live=not no_live,
    )
    if code:
        raise click.exceptions.Exit(code)


@demo.command("migrate")
@click.option(
    "--steps",
    type=click.IntRange(30, 100_000),
    default=300,
    show_default=True,
    help="Training steps of the job.",
)
@click.option(
    "--step-delay",
    "step_delay_s",
    type=click.FloatRange(0.0, 10.0),
    default=0.08,
    show_default=True,
    help="Seconds the job sleeps per step (the losses do not depend on it).",
)
@click.option(
    "--notice-at",
    "notice_at_ratio",
    type=click.FloatRange(0.05, 0.9),
    default=1 / 3,
    show_default="0.33",
    help="Announce the spot interruption after this fraction of the steps.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep logs, checkpoints and the database here (default: a temp folder).",
)
@click.pass_context
def migrate(
    ctx: click.Context,
    steps: int,
    step_delay_s: float,
    notice_at_ratio: float,
    out_dir: Path | None,
) -> None:
    """Move a real PyTorch training job to another agent on a spot notice.

    Exits 1 when steps were lost or the losses differ from an uninterrupted
    run of the same job.
    """
    from gpufleet.demo.migrate import run_migrate_demo

    logs.configure(ctx.find_root().meta.get("log_level") or "warning")
    code = run_migrate_demo(
        steps=steps,
        step_delay_s=step_delay_s,
        notice_at_ratio=notice_at_ratio,
        out_dir=out_dir,
    )
    if code:
        raise click.exceptions.Exit(code)


@demo.command("spot")
@click.option(
    "--steps",
    type=click.IntRange(60, 100_000),
    default=300,
    show_default=True,
    help="Training steps of the job.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep logs, checkpoints and the database here (default: a temp folder).",
)
@click.pass_context
def spot(ctx: click.Context, steps: int, out_dir: Path | None) -> None:
    """An empty fleet buys spot hosts for a job, moves it on a notice, and
    gives every host back.

    Exits 1 when a step was lost, the replacement landed in the preempted
    zone, or an instance was left running.
    """
    from gpufleet.demo.spot import run_spot_demo

    logs.configure(ctx.find_root().meta.get("log_level") or "warning")
    code = run_spot_demo(steps=steps, out_dir=out_dir)
    if code:
        raise click.exceptions.Exit(code)


COMMANDS = [demo]
