"""``gpufleet prices``: the broker's spot-market catalog, best offer first."""

from __future__ import annotations

import click

from gpufleet.cli.client import AdminClient, ClientOptions, admin_options
from gpufleet.cli.output import (
    duration,
    print_json,
    print_table,
    to_dict,
    usd_rate,
    when,
)
from gpufleet.errors import BrokerTimeoutError
from gpufleet.proto import pb

_COLUMNS = (
    "PROVIDER",
    "REGION",
    "ZONE",
    "TYPE",
    "LIFECYCLE",
    "GPUS",
    "ACCEL",
    "USD/H",
    "RISK/H",
    "BAND",
    "SCORE",
    "SOURCE",
)


def _row(offer: pb.Offer) -> list[str]:
    return [
        offer.provider,
        offer.region,
        offer.zone or "*",
        offer.instance_type,
        offer.lifecycle,
        str(offer.gpus or "?"),
        offer.accelerator or "?",
        usd_rate(offer.usd_per_hour),
        f"{offer.hourly_risk:.2%}" if offer.lifecycle == "spot" else "-",
        offer.interruption_band or "-",
        f"{offer.score:.4f}",
        offer.source,
    ]


def _header(resp: pb.ListOffersResponse) -> str:
    if not resp.refreshed_at_s:
        return f"{resp.total} offers; live prices never refreshed"
    return (
        f"{resp.total} offers; refreshed {when(resp.refreshed_at_s)} UTC "
        f"({duration(resp.age_s)} ago)"
    )


# How the broker's staleness warnings (market.py) begin.
_STALE_STARTS = ("prices are", "live spot prices were never")


def _stale_line(resp: pb.ListOffersResponse) -> str | None:
    """The staleness warning, for a broker that sent none of its own."""
    if not resp.stale:
        return None
    if not resp.refreshed_at_s:
        # age_s is 0 then: the broker cannot send "never" as an age.
        return (
            "live spot prices were never refreshed (stale after "
            f"{resp.stale_after_s / 3600:.1f} h); placement uses the tables"
        )
    return (
        f"prices are {resp.age_s / 3600:.1f} h old (stale after "
        f"{resp.stale_after_s / 3600:.1f} h); placement still uses them"
    )


def _slow_refresh(exc: BrokerTimeoutError, opts: ClientOptions) -> BrokerTimeoutError:
    """The error for a --refresh that outlasted --timeout: the broker is up,
    the clouds it asks are slow."""
    error = BrokerTimeoutError(exc.address, exc.reason)
    error.args = (
        f"the broker at {exc.address} did not answer within {opts.timeout_s:g} s: "
        "--refresh first reads the live prices from the clouds, which took "
        "longer",
    )
    error.hint = (
        "the refresh goes on in the broker: run 'gpufleet prices' without "
        "--refresh to see the catalog, or pass a longer --timeout"
    )
    return error


@click.command("prices")
@click.option(
    "--provider",
    type=click.Choice(["aws", "gcp"]),
    default=None,
    help="Only this cloud.",
)
@click.option("--region", default="", help="Only this region.")
@click.option("--type", "instance_type", default="", help="Only this type.")
@click.option(
    "--lifecycle",
    type=click.Choice(["spot", "on-demand"]),
    default=None,
    help="Only spot or only on-demand.",
)
@click.option("--accelerator", default="", help="Only this GPU model, e.g. a10g.")
@click.option(
    "--limit",
    type=click.IntRange(0, 10000),
    default=0,
    help="At most N offers (0: the broker's default, 50).",
)
@click.option("--refresh", is_flag=True, help="Refresh the catalog first.")
@admin_options
@click.pass_obj
def prices(
    opts: ClientOptions,
    provider: str | None,
    region: str,
    instance_type: str,
    lifecycle: str | None,
    accelerator: str,
    limit: int,
    refresh: bool,
) -> None:
    """Hourly prices and interruption risks, the best score first."""
    request = pb.ListOffersRequest(
        provider=provider or "",
        region=region,
        instance_type=instance_type,
        lifecycle=lifecycle or "",
        accelerator=accelerator.lower(),
        limit=limit,
        refresh=refresh,
    )
    client = AdminClient(opts)
    try:
        resp: pb.ListOffersResponse = client.call("ListOffers", request)
    except BrokerTimeoutError as exc:
        if refresh:
            raise _slow_refresh(exc, opts) from None
        raise
    finally:
        client.close()
    lines = list(resp.warnings)
    stale = _stale_line(resp)
    if stale and not any(line.startswith(_STALE_STARTS) for line in lines):
        lines.insert(0, stale)
    for line in lines:
        click.echo(f"warning: {line}", err=True)
    if opts.json:
        print_json(to_dict(resp))
        return
    click.echo(_header(resp))
    print_table(None, _COLUMNS, [_row(o) for o in resp.offers])
    if resp.total > len(resp.offers):
        click.echo(
            f"showing the best {len(resp.offers)} of {resp.total}; pass --limit "
            f"{min(resp.total, 10000)} for all, or filter",
            err=True,
        )


COMMANDS = [prices]
