"""``gpufleet kernels``: tuned Triton kernel configs, in the fleet and on this host.

``list``, ``show``, ``pin`` and ``evict`` ask the broker's kernel catalog;
``list --local`` reads this host's kernel cache directly, and ``tune`` tunes a
kernel in this process with the job-side library (torch and Triton, imported
only by that command).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import click
import grpc

from gpufleet.agent.kernels import FLAGS_FILE
from gpufleet.cli.client import AdminClient, ClientOptions, admin_options
from gpufleet.cli.output import print_json, print_table, to_dict, when
from gpufleet.errors import ConfigError, GpufleetError, NoGpuLibraryError
from gpufleet.kernels.cache import ENV_CACHE, KernelCache, StoredEntry
from gpufleet.kernels.entry import KernelEntry
from gpufleet.proto import pb

# Where the agent keeps its cache unless kernels.cache_dir says otherwise.
AGENT_CACHE_DIR = Path("/var/lib/gpufleet/kernels")
_SLOT_KEY = re.compile(r"^[0-9a-f]{24}$")
_SHAPE_PART = re.compile(r"^[1-9][0-9]{0,9}$")
MAX_DIMENSION = 1 << 26


class KernelSlotNotFoundError(GpufleetError):
    """The broker's catalog has no such slot (or no such host's config)."""


# ---------------------------------------------------------------- helpers


def _check_slot(slot_key: str) -> None:
    if not _SLOT_KEY.match(slot_key):
        raise ConfigError(
            "kernel slot",
            [f"{slot_key!r}: a slot key is 24 hexadecimal characters"],
            hint="copy it from the SLOT column of 'gpufleet kernels list'",
        )


def _call(opts: ClientOptions, method: str, request: Any) -> Any:
    client = AdminClient(opts)
    try:
        return client.call(method, request)
    except GpufleetError as exc:
        cause = exc.__context__
        if isinstance(cause, grpc.RpcError) and cause.code() == (
            grpc.StatusCode.NOT_FOUND
        ):
            message, _, hint = (cause.details() or "").partition(" (hint: ")
            raise KernelSlotNotFoundError(
                message or "no such kernel slot",
                hint=hint.removesuffix(")") or "run 'gpufleet kernels list'",
            ) from None
        raise
    finally:
        client.close()


def _config_text(config: Any) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(dict(config).items())) or "-"


def _gpu_label(fp: pb.KernelFingerprint) -> str:
    if not fp.product:
        return fp.key or "-"
    return f"{fp.product} ({fp.compute_capability}, {fp.mem_total_gib} GiB)"


def _ms(value: float) -> str:
    return f"{value:.4g}" if value else "-"


def _flagged(lines: list[str]) -> list[dict[str, str]]:
    out = []
    for line in lines:
        host_id, _, reason = line.partition(": ")
        out.append({"host_id": host_id, "reason": reason})
    return out


def default_cache_dir() -> Path:
    """The cache to read or tune into when ``--cache-dir`` is not given.

    ``GPUFLEET_KERNEL_CACHE``; else the agent's cache when this host runs an
    agent; else the user's own cache.
    """
    configured = os.environ.get(ENV_CACHE)
    if configured:
        return Path(configured)
    try:
        if (AGENT_CACHE_DIR / "host.json").is_file():
            return AGENT_CACHE_DIR
    except PermissionError:
        # The agent's state directory is root's: reading it then fails
        # with a message that says so, rather than silently using another.
        return AGENT_CACHE_DIR
    return KernelCache().root


def _open_cache(cache_dir: Path | None, *, create: bool = False) -> KernelCache:
    if cache_dir is not None and create:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                "--cache-dir",
                [f"{cache_dir}: cannot create it ({exc})"],
                hint=_CACHE_HINT,
            ) from None
    if cache_dir is not None:
        try:
            exists = cache_dir.is_dir()
        except PermissionError:
            exists = True  # the read that follows names the problem
        if not exists:
            raise ConfigError(
                "--cache-dir", [f"{cache_dir}: no such directory"], hint=_CACHE_HINT
            )
    return KernelCache(cache_dir if cache_dir is not None else default_cache_dir())


_LOCAL_COLUMNS = (
    "SLOT",
    "KERNEL",
    "GPU",
    "TUNING KEY",
    "CONFIG",
    "ORIGIN",
    "VERIFIED",
    "TUNED BY",
    "WINNER MS",
)
_CACHE_HINT = (
    "the agent's cache is kernels.cache_dir in its configuration "
    f"(default {AGENT_CACHE_DIR}); a job's is GPUFLEET_KERNEL_CACHE"
)


# ---------------------------------------------------------------- commands


@click.group("kernels")
def kernels() -> None:
    """Tuned Triton kernel configs shared by hosts of the same hardware."""


@kernels.command("list")
@click.option(
    "--fingerprint", "fingerprint_key", default="", help="Only this GPU kind."
)
@click.option("--kernel", default="", help="Only this kernel.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Most slots to show from the broker (it caps this at 5000).",
)
@click.option(
    "--local", is_flag=True, help="Read this host's kernel cache, not the broker."
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The cache to read with --local (default: GPUFLEET_KERNEL_CACHE, "
    "the agent's, else ~/.cache/gpufleet/kernels).",
)
@admin_options
@click.pass_obj
def list_kernels(
    opts: ClientOptions,
    fingerprint_key: str,
    kernel: str,
    limit: int,
    local: bool,
    cache_dir: Path | None,
) -> None:
    """List kernel slots: the fleet's choices, or with --local this host's cache."""
    if cache_dir is not None and not local:
        raise click.UsageError("--cache-dir only goes with --local")
    if local:
        _list_local(opts, _open_cache(cache_dir), fingerprint_key, kernel)
        return
    request = pb.ListKernelsRequest(
        fingerprint_key=fingerprint_key, kernel=kernel, limit=min(limit, 2**32 - 1)
    )
    resp = _call(opts, "ListKernels", request)
    flagged = _flagged(list(resp.flagged_hosts))
    # A broker of an older release leaves total_slots at 0.
    total = max(resp.total_slots, len(resp.slots))
    if opts.json:
        print_json(
            {
                "slots": [to_dict(v) for v in resp.slots],
                "total_slots": total,
                "flagged_hosts": flagged,
            }
        )
        return
    rows = []
    for view in resp.slots:
        c = view.chosen
        rows.append(
            [
                c.slot_key,
                c.kernel,
                _gpu_label(c.fingerprint),
                c.tuning_key or "-",
                _config_text(c.config),
                str(c.agreeing_hosts),
                view.state,
                c.tuned_by or "-",
                _ms(c.winner_ms),
            ]
        )
    columns = ["SLOT", "KERNEL", "GPU", "TUNING KEY", "CONFIG", "HOSTS", "STATE"]
    print_table(None, [*columns, "TUNED BY", "WINNER MS"], rows)
    if flagged:
        print_table(
            "flagged hosts",
            ["HOST", "REASON"],
            [[f["host_id"], f["reason"]] for f in flagged],
        )
    if total > len(rows):
        click.echo(
            f"showing {len(rows)} of {total} slots (raise --limit, or narrow with "
            f"--fingerprint or --kernel), {len(flagged)} flagged hosts",
            err=True,
        )
    else:
        click.echo(f"{len(rows)} slots, {len(flagged)} flagged hosts", err=True)


def _matches(entry: KernelEntry | None, fingerprint_key: str, kernel: str) -> bool:
    if entry is None:
        return not fingerprint_key and not kernel
    return (not fingerprint_key or entry.fingerprint.key == fingerprint_key) and (
        not kernel or entry.kernel == kernel
    )


def _list_local(
    opts: ClientOptions, cache: KernelCache, fingerprint_key: str, kernel: str
) -> None:
    try:
        stored = [
            s
            for s in cache.entries(fingerprint_key or None)
            if _matches(s.entry, "", kernel)
        ]
        incoming = [
            e for _, e in cache.incoming() if _matches(e, fingerprint_key, kernel)
        ]
        refused = [
            r for r in cache.refused() if _matches(r.entry, fingerprint_key, kernel)
        ]
        host = cache.read_host()
        flagged = _local_flags(cache)
    except OSError as exc:
        raise GpufleetError(
            f"cannot read the kernel cache at {cache.root}: {exc}",
            hint="run as a user that may read it (the agent's is root's), "
            "or pass --cache-dir",
        ) from None
    if opts.json:
        print_json(
            {
                "cache": str(cache.root),
                "host": _host_dict(host),
                "entries": [_stored_dict(s) for s in stored],
                "incoming": [e.to_dict() for e in incoming],
                "refused": [
                    {
                        "entry": r.entry.to_dict() if r.entry else None,
                        "reason": r.reason,
                        "at_s": r.at_s,
                    }
                    for r in refused
                ],
                "flagged_hosts": flagged,
            }
        )
        return
    print_table(
        f"kernel cache {cache.root}",
        [*_LOCAL_COLUMNS],
        [_stored_row(s) for s in stored],
    )
    if incoming:
        print_table(
            "waiting for verification",
            ["SLOT", "KERNEL", "CONFIG", "TUNED BY"],
            [
                [e.slot_key, e.kernel, _config_text(e.config), e.tuned_by or "-"]
                for e in incoming
            ],
        )
    if refused:
        print_table(
            "refused here",
            ["SLOT", "KERNEL", "CONFIG", "TUNED BY", "AT (UTC)", "REASON"],
            [
                [
                    r.entry.slot_key if r.entry else r.path.stem,
                    r.entry.kernel if r.entry else "-",
                    _config_text(r.entry.config) if r.entry else "-",
                    (r.entry.tuned_by if r.entry else "") or "-",
                    when(r.at_s),
                    r.reason,
                ]
                for r in refused
            ],
        )
    if flagged:
        print_table(
            "flagged here",
            ["HOST", "REASON"],
            [[f["host_id"], f["reason"]] for f in flagged],
        )
    if host is None:
        click.echo(
            f"note: {cache.root} has no host.json: no agent writes to this cache",
            err=True,
        )
    click.echo(
        f"{len(stored)} entries, {len(incoming)} waiting, {len(refused)} refused",
        err=True,
    )


def _local_flags(cache: KernelCache) -> list[dict[str, str]]:
    """The peers this host's agent flagged, from its file in the cache root."""
    path = cache.root / FLAGS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError:
        click.echo(f"warning: {path} is not JSON; ignoring it", err=True)
        return []
    if not isinstance(data, dict):
        return []
    return [
        {"host_id": str(h), "reason": str(v.get("reason", ""))}
        for h, v in sorted(data.items())
        if isinstance(v, dict)
    ]


def _host_dict(host: Any) -> dict[str, Any] | None:
    if host is None:
        return None
    fingerprints, default_key = host
    return {
        "default": default_key,
        "fingerprints": {u: fp.to_dict() for u, fp in fingerprints.items()},
    }


def _stored_dict(stored: StoredEntry) -> dict[str, Any]:
    return {
        "entry": stored.entry.to_dict(),
        "origin": stored.origin,
        "verified": stored.verified,
        "stored_at_s": stored.stored_at_s,
    }


def _stored_row(stored: StoredEntry) -> list[str]:
    e, verified = stored.entry, stored.verified
    checked = "-"
    if verified:
        checked = (
            f"{_ms(float(verified.get('entry_ms') or 0))} ms "
            f"(default {_ms(float(verified.get('default_ms') or 0))})"
        )
    return [
        e.slot_key,
        e.kernel,
        e.fingerprint.label,
        e.tuning_key,
        _config_text(e.config),
        stored.origin,
        checked,
        e.tuned_by or "-",
        _ms(e.winner_ms),
    ]


def _show_view(view: pb.KernelSlotView, *, with_reports: bool) -> None:
    c = view.chosen
    click.echo(f"slot {c.slot_key}: {c.kernel} on {_gpu_label(c.fingerprint)}")
    click.echo(f"  fingerprint {c.fingerprint.key or '-'}, tuning key {c.tuning_key}")
    chosen = _config_text(c.config) if c.config else "none"
    click.echo(
        f"  state {view.state}: config {chosen}, tuned by {c.tuned_by or '-'}, "
        f"{c.agreeing_hosts} agreeing host{'' if c.agreeing_hosts == 1 else 's'}, "
        f"pushed to {view.hosts_pushed}"
    )
    if with_reports:
        print_table(
            None,
            ["HOST", "ROLE", "CONFIG", "ENTRY MS", "DEFAULT MS", "AT (UTC)", "REASON"],
            [
                [
                    r.host_id,
                    r.role,
                    _config_text(r.config) if r.config else r.config_hash,
                    _ms(r.entry_ms),
                    _ms(r.default_ms),
                    when(r.at_s),
                    r.reason or "-",
                ]
                for r in view.reports
            ],
        )


@kernels.command("show")
@click.argument("slot_key")
@admin_options
@click.pass_obj
def show(opts: ClientOptions, slot_key: str) -> None:
    """A kernel slot's choice and every report on it."""
    _check_slot(slot_key)
    view = _call(opts, "GetKernel", pb.KernelRequest(slot_key=slot_key))
    if opts.json:
        print_json(to_dict(view))
        return
    _show_view(view, with_reports=True)


@kernels.command("pin")
@click.argument("slot_key")
@click.option(
    "--from-host",
    "from_host_id",
    default="",
    help="Pin the config this host reported (default: the current choice).",
)
@admin_options
@click.pass_obj
def pin(opts: ClientOptions, slot_key: str, from_host_id: str) -> None:
    """Make one config the slot's choice on every host, whatever the votes."""
    _check_slot(slot_key)
    request = pb.PinKernelRequest(slot_key=slot_key, from_host_id=from_host_id)
    view = _call(opts, "PinKernel", request)
    if opts.json:
        print_json(to_dict(view))
        return
    _show_view(view, with_reports=False)


@kernels.command("evict")
@click.argument("slot_key")
@admin_options
@click.pass_obj
def evict(opts: ClientOptions, slot_key: str) -> None:
    """Forget a slot in the catalog and on every host of its hardware."""
    _check_slot(slot_key)
    resp = _call(opts, "EvictKernel", pb.KernelRequest(slot_key=slot_key))
    if opts.json:
        print_json({"slot_key": slot_key, "agents_told": resp.agents_told})
        return
    click.echo(
        f"evicted kernel slot {slot_key}; told {resp.agents_told} connected agents "
        "(the others when they reconnect)"
    )


# ---------------------------------------------------------------- tune


def parse_shape(text: str) -> list[int]:
    """``"512x512x256"`` -> ``[512, 512, 256]``; raises ConfigError."""
    parts = text.lower().split("x")
    if not all(_SHAPE_PART.match(p.strip()) for p in parts):
        raise ConfigError(
            "--shape",
            [
                f"{text!r}: give positive sizes joined by 'x', e.g. 512x512x512 "
                "(M x N x K) for matmul or 1048576 for add"
            ],
        )
    shape = [int(p) for p in parts]
    too_big = [n for n in shape if n > MAX_DIMENSION]
    if too_big:
        raise ConfigError(
            "--shape", [f"{text!r}: sizes must be at most {MAX_DIMENSION}"]
        )
    return shape


@kernels.command("tune")
@click.argument("kernel")
@click.option("--shape", required=True, help="Sizes, e.g. 512x512x512 for matmul.")
@click.option("--dtype", default="float16", show_default=True)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The cache to tune into (default: GPUFLEET_KERNEL_CACHE, the agent's, "
    "else ~/.cache/gpufleet/kernels).",
)
@click.option(
    "--interpret",
    is_flag=True,
    help="Run in Triton's interpreter on the CPU (slow; for trying it out).",
)
@click.option("--force", is_flag=True, help="Tune again even if the slot has an entry.")
@admin_options
@click.pass_obj
def tune(
    opts: ClientOptions,
    kernel: str,
    shape: str,
    dtype: str,
    cache_dir: Path | None,
    interpret: bool,
    force: bool,
) -> None:
    """Tune one kernel for one shape here and store the winner in the cache.

    The agent on this host publishes it to hosts with the same GPU.
    """
    sizes = parse_shape(shape)
    cache = _open_cache(cache_dir, create=True)
    if interpret:
        # Triton reads this when it is first imported, below.
        os.environ["TRITON_INTERPRET"] = "1"
    outcome = _run_tuner(kernel, sizes, dtype, cache, force)
    entry = outcome.entry
    stats = outcome.stats
    document = {
        "kernel": kernel,
        "tuning_key": outcome.tuning_key,
        "tuned": outcome.tuned,
        "cache": str(cache.root),
        "entry": entry.to_dict() if entry is not None else None,
        "stats": {
            "bench_runs": stats.bench_runs,
            "tuned_slots": stats.tuned_slots,
            "cache_hits": stats.cache_hits,
            "skipped": [
                {"config": s.config, "reason": s.reason} for s in stats.skipped
            ],
        },
    }
    if entry is None:
        raise GpufleetError(
            f"tuning {kernel} for {outcome.tuning_key} stored no entry in {cache.root}",
            hint="check that the cache directory is writable",
        )
    if opts.json:
        print_json(document)
        return
    what = "tuned" if outcome.tuned else "already tuned (use --force to tune again)"
    click.echo(f"{kernel} {outcome.tuning_key}: {what}")
    click.echo(f"  config   {_config_text(entry.config)}")
    click.echo(
        f"  time     {_ms(entry.winner_ms)} ms (default {_ms(entry.default_ms)} ms), "
        f"{entry.candidates_tried} candidates in {entry.tune_seconds:.1f} s"
    )
    click.echo(f"  GPU      {entry.fingerprint.label} ({entry.fingerprint.key})")
    click.echo(f"  slot     {entry.slot_key} in {cache.root}")
    for skipped in stats.skipped:
        click.echo(f"  skipped  {_config_text(skipped.config)}: {skipped.reason}")


def _run_tuner(
    kernel: str, shape: list[int], dtype: str, cache: KernelCache, force: bool
) -> Any:
    try:
        # Imported here: torch and Triton are for this command only.
        from gpufleet.kernels import registry
        from gpufleet.kernels.autotune import KernelTuningError, interpreting
    except ImportError as exc:
        raise ConfigError(
            "kernels tune",
            [f"needs torch and Triton, which cannot be imported here: {exc}"],
            hint="install them in this environment: pip install torch triton",
        ) from None
    import torch

    if not interpreting() and not torch.cuda.is_available():
        raise NoGpuLibraryError(
            "no GPU is visible to torch here, so the kernel cannot be tuned",
            hint="run on a GPU host, or pass --interpret to use Triton's "
            "interpreter on the CPU",
        )
    try:
        # Whatever Triton or a kernel module prints belongs on stderr:
        # stdout carries the result alone.
        with contextlib.redirect_stdout(sys.stderr):
            return registry.tune_kernel(kernel, shape, dtype, cache=cache, force=force)
    except registry.UnknownKernelError as exc:
        raise ConfigError("kernels tune", [str(exc)]) from None
    except ValueError as exc:
        raise ConfigError("kernels tune", [str(exc)]) from None
    except KernelTuningError as exc:
        raise GpufleetError(str(exc)) from None
    except OSError as exc:
        raise GpufleetError(
            f"cannot tune into the kernel cache at {cache.root}: {exc}",
            hint="pass --cache-dir with a folder you may write, or run as the "
            "cache's owner (the agent's is root's)",
        ) from None


COMMANDS = [kernels]
