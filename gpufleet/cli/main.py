"""The ``gpufleet`` command: one entry point, one module per command group.

Results go to stdout (a table, or one JSON document with ``--json``);
logs, progress and errors go to stderr. Exit codes: 0 success, 1 the
operation failed, 2 usage or configuration error, 3 broker unreachable,
130 interrupted.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click

import gpufleet
from gpufleet import logs
from gpufleet.cli.client import DEFAULT_BROKER, ClientOptions
from gpufleet.errors import (
    AuthError,
    BrokerUnavailableError,
    ConfigError,
    GpufleetError,
    NoGpuLibraryError,
)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(gpufleet.__version__, prog_name="gpufleet")
@click.option(
    "--broker",
    envvar="GPUFLEET_BROKER",
    default=DEFAULT_BROKER,
    show_default=True,
    help="Broker address HOST:PORT.",
)
@click.option(
    "--token",
    envvar="GPUFLEET_ADMIN_TOKEN",
    default=None,
    help="Admin token (default: the broker's admin.token file).",
)
@click.option(
    "--token-file",
    envvar="GPUFLEET_ADMIN_TOKEN_FILE",
    type=click.Path(path_type=Path),
    default=None,
)
@click.option("--tls-ca", envvar="GPUFLEET_TLS_CA", type=click.Path(path_type=Path))
@click.option("--tls-cert", envvar="GPUFLEET_TLS_CERT", type=click.Path(path_type=Path))
@click.option("--tls-key", envvar="GPUFLEET_TLS_KEY", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for the broker.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def cli(
    ctx: click.Context,
    broker: str,
    token: str | None,
    token_file: Path | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    as_json: bool,
    timeout_s: float,
    verbose: bool,
    debug: bool,
) -> None:
    """gpufleet: see every GPU of the fleet, and stop paying for idle ones."""
    ctx.obj = ClientOptions(
        broker=broker,
        token=token,
        token_file=token_file,
        timeout_s=timeout_s,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        json=as_json,
        debug=debug,
    )
    ctx.meta["log_level"] = "debug" if verbose else None


def _register() -> None:
    from gpufleet.cli import (
        daemons,
        demo,
        dev,
        events,
        fleet,
        instances,
        jobs,
        kernels,
        market,
        policy,
        simulate,
    )

    modules = (daemons, demo, dev, events, fleet, instances, jobs, kernels, market)
    for module in (*modules, policy, simulate):
        for command in module.COMMANDS:
            cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI and returns the exit code; only here is sys.exit called."""
    _register()
    debug = "--debug" in (argv if argv is not None else sys.argv)
    # stdout carries the result alone: whatever logs before a command sets
    # its own level goes to stderr.
    logs.configure("debug" if debug else "warning")
    try:
        # Without standalone mode Click returns a command's exit code (from
        # click.exceptions.Exit) instead of raising it.
        code = cli.main(args=argv, prog_name="gpufleet", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except BrokerUnavailableError as exc:
        _error(exc, debug)
        return EXIT_UNREACHABLE
    except (ConfigError, AuthError, NoGpuLibraryError) as exc:
        _error(exc, debug)
        return EXIT_USAGE
    except GpufleetError as exc:
        _error(exc, debug)
        return EXIT_FAILED
    except Exception:
        traceback.print_exc()
        click.echo(
            f"error: unexpected failure in gpufleet {gpufleet.__version__}; "
            "please report it with the traceback above",
            err=True,
        )
        return EXIT_FAILED
    return code if isinstance(code, int) else 0


def _error(exc: GpufleetError, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    click.echo(f"error: {exc}", err=True)
    if exc.hint:
        click.echo(f"hint: {exc.hint}", err=True)


if __name__ == "__main__":
    sys.exit(main())
