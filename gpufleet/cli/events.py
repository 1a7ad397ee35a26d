"""``gpufleet events [--follow]``: the fleet's event log."""

from __future__ import annotations

import json

import click

from gpufleet.cli.client import AdminClient, ClientOptions, admin_options
from gpufleet.cli.output import print_json, to_dict, when
from gpufleet.proto import pb


def _line(e: pb.Event) -> str:
    data = json.loads(e.data_json or "{}")
    fields = " ".join(f"{k}={v}" for k, v in data.items())
    host, cause = e.host_id or "-", e.cause or "-"
    return f"{when(e.at_s)} #{e.id} {e.kind} host={host} cause={cause} {fields}"


@click.command("events")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming new events.")
@click.option(
    "--since", "since_id", type=int, default=0, help="Only events after this id."
)
@click.option("--kind", "kinds", multiple=True, help="Only these kinds (repeatable).")
@click.option("--limit", type=int, default=100, show_default=True)
@admin_options
@click.pass_obj
def events(
    opts: ClientOptions, follow: bool, since_id: int, kinds: tuple[str, ...], limit: int
) -> None:
    """Show fleet events; with --follow, stream them (JSON Lines with --json)."""
    client = AdminClient(opts)
    request = pb.ListEventsRequest(since_id=since_id, limit=limit, kinds=list(kinds))
    try:
        if follow:
            for e in client.stream("FollowEvents", request):
                if opts.json:
                    click.echo(json.dumps(to_dict(e), sort_keys=True))
                else:
                    click.echo(_line(e))
            return
        if not since_id:
            # The newest `limit` events, oldest first.
            request.since_id = 0
            request.limit = 10_000
        resp = client.call("ListEvents", request)
    finally:
        client.close()
    rows = list(resp.events)[-limit:]
    if opts.json:
        print_json({"events": [to_dict(e) for e in rows]})
        return
    for e in rows:
        click.echo(_line(e))


COMMANDS = [events]
