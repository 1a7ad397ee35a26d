"""``gpufleet demo``: a simulated fleet reaped on real GPU traces."""

from __future__ import annotations

from pathlib import Path

import click

from gpufleet import logs


@click.command("demo")
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
    """Run a broker and agents on loopback and reap idle GPUs on real traces."""
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


COMMANDS = [demo]
