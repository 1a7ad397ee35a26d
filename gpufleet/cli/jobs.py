"""``gpufleet jobs``: submit, inspect, checkpoint, migrate and cancel jobs."""

from __future__ import annotations

import datetime as dt
import math
import re
import time

import click

from gpufleet.broker.job_policy import MAX_DEADLINE_S
from gpufleet.cli.client import AdminClient, ClientOptions, admin_options
from gpufleet.cli.output import print_json, print_table, to_dict, when
from gpufleet.errors import ConfigError
from gpufleet.proto import pb


def _call(opts: ClientOptions, method: str, request: object) -> pb.JobView:
    client = AdminClient(opts)
    try:
        return client.call(method, request)  # type: ignore[no-any-return]
    finally:
        client.close()


def _show(opts: ClientOptions, view: pb.JobView) -> None:
    if opts.json:
        print_json(to_dict(view))
        return
    click.echo(f"job {view.job_id}: {view.state} on {view.host_id or '-'}")
    step = view.step if view.step >= 0 else "?"
    ckpt = view.checkpoint_step if view.checkpoint_step >= 0 else "-"
    click.echo(
        f"  step {step}, checkpoint at step {ckpt}, attempt {view.attempt}, "
        f"steps lost {view.steps_lost}"
    )
    spec = view.spec
    if spec.policy or spec.deadline_s or view.lifecycle:
        deadline = f"{when(spec.deadline_s)} UTC" if spec.deadline_s else "none"
        policy = spec.policy or (
            "gpufleet (default)" if spec.deadline_s else "none (plain placement)"
        )
        click.echo(
            f"  policy {policy}, deadline {deadline}, on "
            f"{view.lifecycle or '-'}, ran {view.run_seconds / 3600:.2f} h of "
            f"{spec.work_hours or '?'} h, cost {view.cost_usd:.2f} USD"
        )
    if view.history:
        click.echo("  history (UTC):")
    for line in view.history:
        click.echo(f"  {when(line.at_s)} {line.kind} {line.detail}")


@click.group("jobs")
def jobs() -> None:
    """Jobs that gpufleet places, supervises and moves on a preemption."""


@jobs.command("submit", context_settings={"ignore_unknown_options": True})
@click.option("--gpus", type=click.IntRange(0, 64), default=1, show_default=True)
@click.option(
    "--hardware",
    default="",
    help="Hardware fingerprint key to require (see `gpufleet hosts`).",
)
@click.option(
    "--label", "labels", multiple=True, help="KEY=VALUE host label to require."
)
@click.option(
    "--checkpoint",
    "checkpoint_url",
    default="",
    help="Where checkpoints go: a shared path or s3://bucket/prefix.",
)
@click.option("--name", default="job")
@click.option("--env", "envs", multiple=True, help="KEY=VALUE for the job.")
@click.option("--workdir", default="")
@click.option(
    "--policy",
    default="",
    help="Placement policy: on-demand, greedy-spot, uniform-progress or "
    "gpufleet (default: gpufleet when a deadline is given).",
)
@click.option(
    "--deadline",
    default="",
    help="When the job must be done: 12h or 90m from now, or an ISO time "
    "such as 2026-12-24T18:00Z.",
)
@click.option(
    "--work-hours",
    type=click.FloatRange(0, 8760, min_open=True),
    default=None,
    help="Hours of compute the job needs (with --deadline).",
)
@click.option(
    "--max-price",
    type=click.FloatRange(0),
    default=0.0,
    help="Most the job's host may cost, USD an hour (0: no limit).",
)
@click.option(
    "--accelerator",
    default="",
    help="GPU model the job runs on, e.g. a10g, l4, a100, a100-80gb: connected "
    "hosts whose GPU name has these words, and the offers launched for it.",
)
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@admin_options
@click.pass_obj
def submit(
    opts: ClientOptions,
    gpus: int,
    hardware: str,
    labels: tuple[str, ...],
    checkpoint_url: str,
    name: str,
    envs: tuple[str, ...],
    workdir: str,
    policy: str,
    deadline: str,
    work_hours: float | None,
    max_price: float,
    accelerator: str,
    argv: tuple[str, ...],
) -> None:
    """Submit a job: gpufleet jobs submit --gpus 1 -- python train.py"""
    bad = [x for x in (*labels, *envs) if "=" not in x]
    if bad:
        raise ConfigError("jobs submit", [f"{x!r}: must be KEY=VALUE" for x in bad])
    work_hours = work_hours or 0.0
    for flag, value in (("--work-hours", work_hours), ("--max-price", max_price)):
        if not math.isfinite(value):
            raise ConfigError("jobs submit", [f"{flag}: must be a number, got {value}"])
    spec = pb.JobSpec(
        name=name,
        argv=list(argv),
        gpus=gpus,
        hardware=hardware,
        labels=dict(x.split("=", 1) for x in labels),
        env=dict(x.split("=", 1) for x in envs),
        checkpoint_url=checkpoint_url,
        workdir=workdir,
        policy=policy,
        deadline_s=parse_deadline(deadline) if deadline else 0.0,
        work_hours=work_hours,
        max_usd_per_hour=max_price,
        accelerator=accelerator.lower(),
    )
    _show(opts, _call(opts, "SubmitJob", pb.SubmitJobRequest(spec=spec)))


@jobs.command("list")
@click.option("--state", default="", help="Only jobs in this state.")
@admin_options
@click.pass_obj
def list_jobs(opts: ClientOptions, state: str) -> None:
    """List jobs."""
    client = AdminClient(opts)
    try:
        resp = client.call("ListJobs", pb.ListJobsRequest(state=state))
    finally:
        client.close()
    if opts.json:
        print_json({"jobs": [to_dict(v) for v in resp.jobs]})
        return
    rows = [
        [
            v.job_id,
            v.state,
            v.host_id or "-",
            str(v.spec.gpus),
            str(v.step if v.step >= 0 else "?"),
            str(v.attempt),
            when(v.updated_at_s),
        ]
        for v in resp.jobs
    ]
    print_table(
        None,
        ["JOB", "STATE", "HOST", "GPUS", "STEP", "ATTEMPT", "UPDATED (UTC)"],
        rows,
    )


@jobs.command("show")
@click.argument("job_id")
@admin_options
@click.pass_obj
def show(opts: ClientOptions, job_id: str) -> None:
    """A job's state and every step of its history."""
    _show(opts, _call(opts, "GetJob", pb.JobRequest(job_id=job_id)))


@jobs.command("logs")
@click.argument("job_id")
@admin_options
@click.pass_obj
def logs(opts: ClientOptions, job_id: str) -> None:
    """The last lines of a job's output."""
    view = _call(opts, "GetJob", pb.JobRequest(job_id=job_id))
    if opts.json:
        print_json({"job_id": view.job_id, "log_tail": view.log_tail})
        return
    click.echo(view.log_tail, nl=False)


@jobs.command("cancel")
@click.argument("job_id")
@admin_options
@click.pass_obj
def cancel(opts: ClientOptions, job_id: str) -> None:
    """Stop a job for good."""
    _show(opts, _call(opts, "CancelJob", pb.JobRequest(job_id=job_id)))


@jobs.command("checkpoint")
@click.argument("job_id")
@admin_options
@click.pass_obj
def checkpoint(opts: ClientOptions, job_id: str) -> None:
    """Ask a running job to checkpoint now."""
    _show(opts, _call(opts, "CheckpointJobNow", pb.JobRequest(job_id=job_id)))


@jobs.command("migrate")
@click.argument("job_id")
@click.option("--to", "to_host_id", default="", help="Target host (default: the best).")
@admin_options
@click.pass_obj
def migrate(opts: ClientOptions, job_id: str, to_host_id: str) -> None:
    """Checkpoint a running job and resume it on another host."""
    request = pb.MigrateJobRequest(job_id=job_id, to_host_id=to_host_id)
    _show(opts, _call(opts, "MigrateJob", request))


_RELATIVE = re.compile(r"^\+?([0-9]+(?:\.[0-9]+)?)\s*(m|min|h|d)$")


def parse_deadline(text: str, now_s: float | None = None) -> float:
    """A deadline as epoch seconds, from ``12h``, ``90m``, ``2d`` (from now)
    or an ISO 8601 time (UTC when it names no zone).

    Raises:
        ConfigError: the text is neither.
    """
    now_s = time.time() if now_s is None else now_s
    hint = "e.g. --deadline 12h, --deadline 90m or --deadline 2026-12-24T18:00Z"
    match = _RELATIVE.match(text.strip().lower())
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        at_s = now_s + amount * {"m": 60, "min": 60, "h": 3600, "d": 86400}[unit]
    else:
        try:
            moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                "jobs submit",
                [f"--deadline {text!r}: not a duration or an ISO 8601 time"],
                hint=hint,
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        at_s = moment.timestamp()
    if at_s <= now_s:
        raise ConfigError(
            "jobs submit",
            [f"--deadline {text!r}: is not in the future; give a later time"],
            hint=hint,
        )
    if at_s > now_s + MAX_DEADLINE_S:
        raise ConfigError(
            "jobs submit",
            [f"--deadline {text!r}: must be in the next 365 days"],
            hint=hint,
        )
    return at_s


COMMANDS = [jobs]
