"""Checks a kernel entry received from a peer before this host uses it.

A received config is data; it is accepted only if every check passes, in
this order: the kernel is known here, its source and candidate list hash as
here, the config is well formed and one of this host's own candidates, the
entry's fingerprint is this host's, the config fits this GPU's shared memory,
its output on fresh inputs matches the torch reference, and it is not slower
than the local default by more than the slack. Verification never touches a
job's tensors: it makes its own inputs from the tuning key, at most
``GPUFLEET_KERNEL_VERIFY_MAX_BYTES`` (1 GiB) of them. A larger slot, and a
bfloat16 one under Triton's interpreter, get a ``verify-failed`` verdict,
which does not blame the sender.

The agent runs it as a subprocess, one at a time::

    python -m gpufleet.kernels.verify ENTRY.json [--bench module:function]
        [--slack 0.25] [--fingerprint-key K] [--cache DIR]

which prints one JSON line ``{"accepted", "reason", "entry_ms", "default_ms"}``
on stdout and exits 0 whenever it reached a verdict (accepted or not), 2 on a
usage error (bad arguments, unreadable file, unknown fingerprint key), and 1
if the verifier itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpufleet.kernels.autotune import (
    INTERPRETER_BF16,
    BenchFn,
    Config,
    Launch,
    cuda_fingerprint,
    default_bench,
    interpreting,
    local_fingerprint,
    parse_tuning_key,
)
from gpufleet.kernels.cache import KernelCache
from gpufleet.kernels.candidates import SHARED_MEMORY_LIMITS, vendor_of
from gpufleet.kernels.entry import EntryRejected, KernelEntry, check_config
from gpufleet.kernels.fingerprint import HardwareFingerprint
from gpufleet.kernels.registry import (
    InputsTooLargeError,
    KernelSpec,
    UnknownKernelError,
    as_outputs,
    clone_inputs,
    get,
    input_budget,
)
from gpufleet.logs import library_logger

log = library_logger(__name__)

EXIT_VERDICT = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_SLACK = 0.25
_DETAIL_CHARS = 400
# The inputs of one verification, outputs included; its peak is about six
# times that (the reference's, the entry's and the default's copies). A slot
# larger than this is not verified here, and the sender is not blamed.
ENV_MAX_BYTES = "GPUFLEET_KERNEL_VERIFY_MAX_BYTES"
DEFAULT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one entry.

    ``reason`` is empty when accepted, else ``"cause: detail"`` with a
    kebab-case cause from :class:`~gpufleet.kernels.entry.EntryRejected`.
    """

    accepted: bool
    reason: str = ""
    entry_ms: float | None = None
    default_ms: float | None = None

    @property
    def cause(self) -> str:
        return self.reason.split(":", 1)[0] if self.reason else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "entry_ms": self.entry_ms,
            "default_ms": self.default_ms,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _text(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:_DETAIL_CHARS]


def max_input_bytes() -> int:
    """The byte budget of one verification's inputs and outputs.

    ``GPUFLEET_KERNEL_VERIFY_MAX_BYTES`` (a positive integer), else 1 GiB; a
    bad value is logged and the default used.
    """
    raw = os.environ.get(ENV_MAX_BYTES, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        log.warning(
            "kernels.verify_max_bytes_invalid",
            value=raw[:64],
            default=DEFAULT_MAX_BYTES,
            hint=f"set {ENV_MAX_BYTES} to a positive number of bytes",
        )
        return DEFAULT_MAX_BYTES
    return value


def _out_of_resources() -> type[BaseException]:
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def verify_entry(
    entry: KernelEntry,
    *,
    local_fp: HardwareFingerprint,
    do_bench: BenchFn | None = None,
    slack: float = DEFAULT_SLACK,
    device: torch.device | str | None = None,
) -> Verdict:
    """Verifies one received entry on this host; never raises.

    Args:
        entry: the received entry.
        local_fp: this host's fingerprint for the GPU the entry is for.
        do_bench: ``fn(launch) -> ms``; default: ``do_bench`` on a GPU, a
            timer under the interpreter. ``launch.role`` is "entry" or
            "default".
        slack: how much slower than the local default the entry may be.
        device: where to run; default: the GPU matching ``local_fp``, or the
            CPU under the interpreter.
    """
    timings: dict[str, float] = {}
    try:
        _verify(entry, local_fp, do_bench, slack, device, timings)
    except EntryRejected as exc:
        verdict = Verdict(False, str(exc), timings.get("entry"), timings.get("default"))
    except Exception as exc:
        log.warning("kernels.verify_failed", kernel=entry.kernel, error=_text(exc))
        verdict = Verdict(
            False,
            f"verify-failed: {_text(exc)}",
            timings.get("entry"),
            timings.get("default"),
        )
    else:
        verdict = Verdict(True, "", timings.get("entry"), timings.get("default"))
    log.info(
        "kernels.verified",
        kernel=entry.kernel,
        slot_key=entry.slot_key,
        config=entry.config,
        accepted=verdict.accepted,
        reason=verdict.reason,
    )
    return verdict


def _verify(
    entry: KernelEntry,
    local_fp: HardwareFingerprint,
    do_bench: BenchFn | None,
    slack: float,
    device: torch.device | str | None,
    timings: dict[str, float],
) -> None:
    """Raises EntryRejected at the first check that fails."""
    try:
        spec = get(entry.kernel)
    except UnknownKernelError as exc:
        raise EntryRejected("unknown-kernel", str(exc)) from None
    vendor = vendor_of(local_fp.vendor)
    _check_identity(entry, spec, vendor)
    _check_fingerprint(entry, local_fp)
    _check_computable(entry)
    if device is None:
        device = _device_for(local_fp)
    inputs = _make_inputs(entry, spec, device)
    _check_resources(entry, spec, local_fp, inputs)
    _check_output(entry, spec, inputs)
    _check_speed(entry, spec, vendor, inputs, do_bench, slack, timings)


def _check_identity(entry: KernelEntry, spec: KernelSpec, vendor: str) -> None:
    if entry.source_hash != spec.source_hash:
        raise EntryRejected(
            "source-mismatch",
            f"kernel {entry.kernel!r} source hash {entry.source_hash} differs from "
            f"this host's {spec.source_hash}; the hosts run different gpufleet "
            "versions",
        )
    local_hash = spec.candidates_hash(vendor)
    if entry.candidates_hash != local_hash:
        raise EntryRejected(
            "candidates-mismatch",
            f"candidate list hash {entry.candidates_hash} differs from this host's "
            f"{local_hash} for {entry.kernel!r} on {vendor}",
        )
    check_config(entry.config)
    if entry.config not in spec.candidates(vendor):
        raise EntryRejected(
            "not-a-candidate",
            f"config {entry.config} is not one of this host's "
            f"{len(spec.candidates(vendor))} {vendor} candidates for {entry.kernel!r}",
        )


def _check_fingerprint(entry: KernelEntry, local_fp: HardwareFingerprint) -> None:
    if entry.fingerprint.key != local_fp.key:
        raise EntryRejected(
            "wrong-fingerprint",
            f"entry is for {entry.fingerprint.label} ({entry.fingerprint.key}), "
            f"this GPU is {local_fp.label} ({local_fp.key})",
        )


def _check_computable(entry: KernelEntry) -> None:
    """Refuses, without blaming the sender, what this host cannot compute."""
    try:
        _, dtypes = parse_tuning_key(entry.tuning_key)
    except ValueError:
        return  # building the inputs names the problem
    if interpreting() and "bfloat16" in dtypes:
        raise EntryRejected(
            "verify-failed",
            f"{INTERPRETER_BF16}; this host verifies in the interpreter, so it "
            f"cannot check {entry.tuning_key}",
        )


def _make_inputs(
    entry: KernelEntry, spec: KernelSpec, device: torch.device | str
) -> dict[str, Any]:
    limit = max_input_bytes()
    try:
        with input_budget(limit):
            inputs = spec.make_inputs(entry.tuning_key, device)
    except InputsTooLargeError as exc:
        # Not the sender's fault: a real slot this host cannot afford to check.
        raise EntryRejected("verify-failed", str(exc)) from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise EntryRejected(
            "bad-schema",
            f"tuning key {entry.tuning_key!r} does not fit kernel "
            f"{entry.kernel!r}: {_text(exc)}",
        ) from None
    # A user kernel's make_inputs may not check its size: refuse before the
    # copies that the checks make.
    built = sum(v.nbytes for v in inputs.values() if isinstance(v, torch.Tensor))
    if built > limit:
        raise EntryRejected(
            "verify-failed",
            f"inputs for {entry.tuning_key} take {built} bytes, more than the "
            f"{limit} allowed ({ENV_MAX_BYTES}), too large to verify here",
        )
    return inputs


def _check_resources(
    entry: KernelEntry,
    spec: KernelSpec,
    local_fp: HardwareFingerprint,
    inputs: dict[str, Any],
) -> None:
    if interpreting():
        # The interpreter has no shared memory: judge the config by the
        # estimate against the limit of the hardware it is meant for.
        limit = SHARED_MEMORY_LIMITS.get(local_fp.compute_capability)
        needed = spec.shared_memory_bytes(entry.config, entry.tuning_key)
        if limit is not None and needed is not None and needed > limit:
            raise EntryRejected(
                "out-of-resources",
                f"needs {needed} bytes of shared memory, this GPU allows {limit}",
            )
        return
    # On a GPU, compiling and launching once is the real check: Triton
    # raises OutOfResources before the kernel runs.
    try:
        spec.run(clone_inputs(inputs), entry.config)
        torch.cuda.synchronize()
    except _out_of_resources() as exc:
        required = getattr(exc, "required", "?")
        limit = getattr(exc, "limit", "?")
        resource = getattr(exc, "name", "shared memory")
        raise EntryRejected(
            "out-of-resources",
            f"needs {required} bytes of {resource}, this GPU allows {limit}",
        ) from None


def _check_output(entry: KernelEntry, spec: KernelSpec, inputs: dict[str, Any]) -> None:
    expected = as_outputs(spec.reference(clone_inputs(inputs)))
    try:
        got = as_outputs(spec.run(clone_inputs(inputs), entry.config))
    except _out_of_resources() as exc:
        raise EntryRejected("out-of-resources", _text(exc)) from None
    except Exception as exc:
        raise EntryRejected(
            "verify-failed", f"config {entry.config} failed to run: {_text(exc)}"
        ) from None
    if len(got) != len(expected):
        raise EntryRejected(
            "wrong-result", f"{len(got)} outputs, the reference has {len(expected)}"
        )
    for index, (out, ref) in enumerate(zip(got, expected, strict=True)):
        atol, rtol = spec.tolerance(ref.dtype)
        if out.shape != ref.shape or out.dtype != ref.dtype:
            raise EntryRejected(
                "wrong-result",
                f"output {index} is {out.dtype}{list(out.shape)}, the reference "
                f"{ref.dtype}{list(ref.shape)}",
            )
        if not torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol):
            error = (out.float() - ref.float()).abs()
            bad = int((error > atol + rtol * ref.float().abs()).sum())
            raise EntryRejected(
                "wrong-result",
                f"output {index} differs from the torch reference in {bad} of "
                f"{out.numel()} values (max abs error {error.max().item():.3g}, "
                f"atol {atol}, rtol {rtol}) for {entry.tuning_key}",
            )


def _check_speed(
    entry: KernelEntry,
    spec: KernelSpec,
    vendor: str,
    inputs: dict[str, Any],
    do_bench: BenchFn | None,
    slack: float,
    timings: dict[str, float],
) -> None:
    bench = do_bench or default_bench()
    default = spec.candidates(vendor)[0]
    timings["entry"] = _time(bench, spec, entry.config, inputs, "entry")
    timings["default"] = _time(bench, spec, default, inputs, "default")
    if entry.config == default:
        return  # the same config: any difference is noise
    if timings["entry"] > timings["default"] * (1.0 + slack):
        raise EntryRejected(
            "slower-than-default",
            f"config takes {timings['entry']:.4g} ms, the local default "
            f"{timings['default']:.4g} ms (slack {slack:.0%})",
        )


def _time(
    bench: BenchFn,
    spec: KernelSpec,
    config: Config,
    inputs: dict[str, Any],
    role: str,
) -> float:
    own = clone_inputs(inputs)
    launch = Launch(lambda: spec.run(own, config), config, spec.name, role=role)
    ms = float(bench(launch))
    if launch.runs == 0 or not ms >= 0 or ms == float("inf"):
        raise RuntimeError(
            f"the benchmark function returned {ms!r} for the {role} config after "
            f"{launch.runs} launches; it must call the launch and return ms"
        )
    return ms


def _device_for(local_fp: HardwareFingerprint) -> torch.device | str:
    if interpreting():
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(
            "no GPU is visible to torch and TRITON_INTERPRET is not set, so the "
            "kernel cannot run here"
        )
    wanted = (local_fp.product, local_fp.compute_capability, local_fp.mem_total_gib)
    for index in range(torch.cuda.device_count()):
        fp = cuda_fingerprint(index)
        if (fp.product, fp.compute_capability, fp.mem_total_gib) == wanted:
            return torch.device("cuda", index)
    return torch.device("cuda", torch.cuda.current_device())


# ---------------------------------------------------------------- command line


class UsageError(Exception):
    """A bad argument or input file: exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gpufleet.kernels.verify",
        description="Verify a received kernel entry; prints one JSON verdict line.",
    )
    parser.add_argument("entry", type=Path, help="the entry JSON file")
    parser.add_argument(
        "--bench",
        metavar="MODULE:FUNCTION",
        help="benchmark function fn(launch) -> ms (default: do_bench or a timer)",
    )
    parser.add_argument(
        "--slack",
        type=float,
        default=DEFAULT_SLACK,
        help="how much slower than the local default the entry may be (0.25)",
    )
    parser.add_argument(
        "--fingerprint-key",
        metavar="K",
        help="this GPU's fingerprint key in the cache's host.json "
        "(default: GPUFLEET_KERNEL_FINGERPRINT, else computed)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="the kernel cache holding host.json (default: GPUFLEET_KERNEL_CACHE)",
    )
    return parser


def load_bench(target: str) -> BenchFn:
    """Imports ``module:function``."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--bench {target!r} must be module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"--bench {target!r} cannot be loaded: {_text(exc)}") from None
    if not callable(fn):
        raise UsageError(f"--bench {target!r} is not callable")
    return fn  # type: ignore[no-any-return]


def read_entry(path: Path) -> KernelEntry:
    """Reads an entry file: a bare entry or a cache record ``{"entry": ...}``.

    Raises:
        UsageError: the file cannot be read.
        EntryRejected: it is not a well-formed entry (bad-schema and others).
    """
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read entry file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EntryRejected("bad-schema", f"{path} is not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("entry"), dict):
        data = data["entry"]
    try:
        return KernelEntry.from_dict(data)
    except EntryRejected:
        raise
    except Exception as exc:
        raise EntryRejected("bad-schema", f"{path}: {_text(exc)}") from None


def _local_fp(args: argparse.Namespace) -> HardwareFingerprint:
    cache = KernelCache(args.cache) if args.cache is not None else KernelCache()
    if args.fingerprint_key:
        found = cache.fingerprint(args.fingerprint_key)
        if found is None:
            raise UsageError(
                f"fingerprint key {args.fingerprint_key} is not in "
                f"{cache.root / 'host.json'}; the agent writes it at start"
            )
        return found
    return local_fingerprint(cache)


def run_cli(args: argparse.Namespace) -> tuple[Verdict, int]:
    """Runs the command; returns the verdict and the exit code."""
    try:
        bench = load_bench(args.bench) if args.bench else None
        if not 0 <= args.slack <= 100:
            raise UsageError(f"--slack {args.slack} must be within 0..100")
        try:
            entry = read_entry(args.entry)
        except EntryRejected as exc:
            return Verdict(False, str(exc)), EXIT_VERDICT
        local_fp = _local_fp(args)
    except UsageError as exc:
        return Verdict(False, f"verify-failed: {exc}"), EXIT_USAGE
    verdict = verify_entry(entry, local_fp=local_fp, do_bench=bench, slack=args.slack)
    return verdict, EXIT_VERDICT


def main(argv: Sequence[str] | None = None) -> int:
    """The command; prints exactly one JSON line on stdout (see the module doc)."""
    from gpufleet.logs import configure

    configure("warning")
    args = _parser().parse_args(argv)
    stdout = sys.stdout
    # Whatever a kernel module prints goes to stderr: stdout carries only
    # the verdict line that the agent parses.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            verdict, code = run_cli(args)
        except Exception as exc:
            log.exception("kernels.verifier_crashed")
            verdict, code = Verdict(False, f"verify-failed: {_text(exc)}"), EXIT_FAILED
    if code == EXIT_USAGE:
        print(
            f"error: {verdict.reason.removeprefix('verify-failed: ')}", file=sys.stderr
        )
    print(verdict.to_json(), file=stdout, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
