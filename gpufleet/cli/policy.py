"""``gpufleet policy show|apply``: read and change the idle policy."""

from __future__ import annotations

from pathlib import Path

import click

from gpufleet.cli.client import AdminClient, ClientOptions, admin_options
from gpufleet.cli.output import print_json, when
from gpufleet.errors import ConfigError
from gpufleet.proto import pb


@click.group("policy")
def policy() -> None:
    """Show or apply the idle-reaper policy."""


@policy.command("show")
@admin_options
@click.pass_obj
def show(opts: ClientOptions) -> None:
    """Print the policy the broker applies now."""
    client = AdminClient(opts)
    try:
        doc = client.call("GetPolicy", pb.GetPolicyRequest())
    finally:
        client.close()
    if opts.json:
        print_json({"yaml": doc.yaml, "applied_at_s": doc.applied_at_s})
        return
    applied = when(doc.applied_at_s) if doc.applied_at_s else "never (built-in)"
    click.echo(f"# applied {applied}")
    click.echo(doc.yaml.rstrip())


@policy.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate only; change nothing.")
@admin_options
@click.pass_obj
def apply(opts: ClientOptions, file: Path, dry_run: bool) -> None:
    """Validate FILE and make it the broker's policy."""
    client = AdminClient(opts)
    try:
        resp = client.call(
            "ApplyPolicy", pb.ApplyPolicyRequest(yaml=file.read_text(), dry_run=dry_run)
        )
    finally:
        client.close()
    if opts.json:
        print_json({"applied": resp.applied, "problems": list(resp.problems)})
    if resp.problems:
        raise ConfigError(str(file), list(resp.problems))
    if not opts.json:
        click.echo(f"policy {file} is valid" + ("" if dry_run else " and applied"))


COMMANDS = [policy]
