"""``gpufleet instances``: the hosts the broker launched for jobs."""

from __future__ import annotations

import click

from gpufleet.cli.client import AdminClient, ClientOptions, admin_options
from gpufleet.cli.output import print_json, print_table, to_dict, usd_rate, when
from gpufleet.proto import pb


@click.command("instances")
@click.option(
    "--all", "include_released", is_flag=True, help="Also released and failed ones."
)
@admin_options
@click.pass_obj
def instances(opts: ClientOptions, include_released: bool) -> None:
    """Instances the broker launched, their state and the job they serve."""
    client = AdminClient(opts)
    try:
        resp = client.call(
            "ListInstances", pb.ListInstancesRequest(include_released=include_released)
        )
    finally:
        client.close()
    if opts.json:
        print_json({"instances": [to_dict(v) for v in resp.instances]})
        return
    rows = [
        [
            v.launch_id,
            v.state,
            v.provider,
            v.zone or v.region,
            v.instance_type,
            v.lifecycle,
            usd_rate(v.usd_per_hour, 3),
            v.instance_id or "-",
            v.job_id or "-",
            v.host_id or "-",
            when(v.launched_at_s),
            v.detail,
        ]
        for v in resp.instances
    ]
    print_table(
        None,
        [
            "LAUNCH",
            "STATE",
            "CLOUD",
            "WHERE",
            "TYPE",
            "LIFECYCLE",
            "USD/H",
            "INSTANCE",
            "JOB",
            "HOST",
            "LAUNCHED",
            "DETAIL",
        ],
        rows,
    )


COMMANDS = [instances]
