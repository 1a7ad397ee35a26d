"""What a shared tuned matmul config is worth to a peer with the same GPU.

For each matmul shape, in one run:

1. tunes ``matmul`` into an empty kernel cache (a temporary folder that
   ``GPUFLEET_KERNEL_CACHE`` names) and records the autotune wall seconds and
   how many candidates were benchmarked;
2. times the tuned kernel (``matmul()`` through its TunedKernel), the untuned
   default config (the first candidate) and ``torch.matmul`` side by side on
   the same inputs (``triton.testing.do_bench``, median) and reports TFLOP/s;
3. starts a fresh Python process that receives the tuned entry as a peer
   does: it keeps the entry as incoming in a second empty cache, runs
   ``verify_entry`` on it, stores it as a peer entry when accepted, then calls
   ``matmul()``; it reports the verification seconds, the seconds from its
   spawn to the first call returning and the benchmark launches it made
   (0 when the shared entry was used). A third fresh process with an empty
   cache makes the same first call, which has to tune;
4. prints two plain-text tables and writes every figure, the GPU, the torch
   and Triton versions and the hardware fingerprint to ``--out`` as JSON
   (default ``$OUT/kernel_reuse.json`` when ``OUT`` is set).

Each process gets its own empty Triton compile cache (``TRITON_CACHE_DIR``),
so every process compiles as it would on a host seeing the kernel for the
first time; ``--reuse-triton-cache`` keeps the user's cache instead.

    python bench/kernel_reuse.py [--shapes 1024x1024x1024,...] [--dtype float16]
        [--out PATH]
    python bench/kernel_reuse.py --interpret     # on a CPU: interpreter figures

``--interpret`` runs Triton's interpreter on the CPU with tiny shapes; its
figures only show that the flow works and are no GPU timings. Exit codes: 0
done, 1 a process failed or the peer did not run on the shared entry (the
JSON is still written), 2 usage error or no GPU (and no ``--interpret``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

KERNEL = "matmul"
GPU_SHAPES = "1024x1024x1024,4096x4096x4096,8192x8192x4096"
INTERPRETER_SHAPES = "64x64x64,96x64x32"
DTYPES = ("float16", "bfloat16", "float32")
# Inputs are built whole on the device; past this many elements per operand
# a run is more a memory test than a matmul benchmark (and the verifier
# refuses to build inputs that large anyway).
MAX_ELEMENTS = 1 << 31
CHILD_TIMEOUT_S = 600.0
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
INTERPRETER_NOTE = (
    "INTERPRETER FIGURES: Triton's interpreter on the CPU (numpy); these are "
    "not GPU timings and say nothing about GPU speed, only that tuning, "
    "sharing, verification and reuse work end to end."
)

Shape = tuple[int, int, int]


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


# ---------------------------------------------------------------- arguments


def parse_shapes(text: str) -> list[Shape]:
    """``"1024x1024x1024,96x64x32"`` -> ``[(1024, 1024, 1024), (96, 64, 32)]``."""
    shapes: list[Shape] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        sizes = part.lower().split("x")
        try:
            m, n, k = (int(s) for s in sizes)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"shape {part!r} is not MxNxK with three integers, e.g. 4096x4096x4096"
            ) from None
        if min(m, n, k) < 1:
            raise argparse.ArgumentTypeError(f"shape {part!r} has a size below 1")
        if max(m * k, k * n, m * n) > MAX_ELEMENTS:
            raise argparse.ArgumentTypeError(
                f"shape {part!r} has an operand over {MAX_ELEMENTS} elements; "
                "pick smaller sizes"
            )
        shapes.append((m, n, k))
    if not shapes:
        raise argparse.ArgumentTypeError(f"no shape in {text!r}")
    return shapes


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/kernel_reuse.py",
        description="Time tuning a Triton matmul, the tuned config against the "
        "default and torch, and a fresh process that reuses the shared config.",
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        help=f"comma-separated MxNxK (default {GPU_SHAPES}; with --interpret "
        f"{INTERPRETER_SHAPES})",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float16")
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="run Triton's interpreter on the CPU (TRITON_INTERPRET=1): a smoke "
        "run whose figures are no GPU timings",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write the figures here as JSON (default $OUT/kernel_reuse.json "
        "when OUT is set)",
    )
    parser.add_argument(
        "--reuse-triton-cache",
        action="store_true",
        help="let every process use the user's Triton compile cache instead of "
        "an empty one of its own (compiles then count only once)",
    )
    parser.add_argument(
        "--child-timeout",
        type=float,
        default=CHILD_TIMEOUT_S,
        metavar="S",
        help=f"seconds each fresh process may take ({CHILD_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        help="gpufleet log level on stderr (warning)",
    )
    # The fresh processes are this script again, in one of these roles.
    hidden = argparse.SUPPRESS
    parser.add_argument("--role", choices=("peer", "cold"), help=hidden)
    parser.add_argument("--shape", type=parse_shapes, help=hidden)
    parser.add_argument("--entry", type=Path, help=hidden)
    parser.add_argument("--cache", type=Path, help=hidden)
    parser.add_argument("--spawned-at", type=float, help=hidden)
    return parser


# ---------------------------------------------------------------- runtime


def _interpret_env_set() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


def _runtime_problem(interpret: bool) -> str | None:
    """Why the benchmark cannot run here, or None."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        return (
            f"torch and Triton are needed and cannot be imported here ({exc}); "
            "install them (pip install torch triton) or use the python that has them"
        )
    if interpret:
        return None
    if not torch.cuda.is_available():
        return (
            "no GPU is visible to torch here (torch.cuda.is_available() is False), "
            "so there is nothing to time. Run this on a GPU host (NVIDIA, or AMD "
            "with ROCm torch), or pass --interpret for a CPU smoke run through "
            "Triton's interpreter"
        )
    return None


def _bench_fn() -> Callable[[Callable[[], Any], str], float]:
    """``bench(fn, role) -> ms``: do_bench on a GPU, a timer in the interpreter."""
    from gpufleet.kernels.autotune import (
        Launch,
        gpu_bench,
        interpreter_bench,
        interpreting,
    )

    chosen = interpreter_bench if interpreting() else gpu_bench

    def bench(fn: Callable[[], Any], role: str) -> float:
        return chosen(Launch(fn, {}, KERNEL, role=role))

    return bench


def _device() -> str:
    import torch

    from gpufleet.kernels.autotune import interpreting

    return "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"


def _sync() -> None:
    import torch

    if _device() == "cuda":
        torch.cuda.synchronize()


def _tflops(shape: Shape, ms: float | None) -> float | None:
    if not ms or ms <= 0:
        return None
    m, n, k = shape
    return 2.0 * m * n * k / (ms * 1e-3) / 1e12


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# ---------------------------------------------------------------- the tuner


def tune_and_time(shape: Shape, dtype: str, cache_root: Path) -> dict[str, Any]:
    """Tunes one shape into ``cache_root`` and times tuned, default and torch."""
    import torch

    from gpufleet.kernels import matmul as mm
    from gpufleet.kernels import registry
    from gpufleet.kernels.cache import KernelCache

    cache = KernelCache(cache_root)
    spec = registry.get(KERNEL)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        outcome = registry.tune_kernel(KERNEL, list(shape), dtype, cache=cache)
    _sync()
    tune_wall_s = time.perf_counter() - started
    entry = outcome.entry
    if entry is None or not outcome.tuned:
        raise BenchError(
            f"tuning {shape_text(shape)} left no entry in the empty cache {cache_root} "
            f"(tuned={outcome.tuned}); the tuner's log on stderr says why"
        )
    vendor = entry.fingerprint.vendor
    default = spec.candidates(vendor)[0]
    inputs = spec.make_inputs(outcome.tuning_key, _device())
    a, b = inputs["a"], inputs["b"]
    if dtype == "float32":
        # tl.dot runs fp32 as TF32; let torch do the same for a fair figure.
        torch.backends.cuda.matmul.allow_tf32 = True

    # The tuned kernel as a job calls it: matmul() through a TunedKernel that
    # finds the winner in the cache, then in its memory.
    kernel = spec.kernel.copy(cache=cache)
    bench = _bench_fn()
    tuned_ms = bench(lambda: mm.matmul(a, b, kernel=kernel), "tuned")
    default_ms = bench(lambda: mm.launch_matmul(a, b, default), "default")
    torch_ms = bench(lambda: torch.matmul(a, b), "torch")
    got = mm.matmul(a, b, kernel=kernel).float()
    want = torch.matmul(a, b).float()
    _sync()
    tuned_tf, default_tf, torch_tf = (
        _tflops(shape, ms) for ms in (tuned_ms, default_ms, torch_ms)
    )
    return {
        "shape": list(shape),
        "tuning_key": outcome.tuning_key,
        "slot_key": entry.slot_key,
        "entry": entry.to_dict(),
        "tune": {
            "wall_s": tune_wall_s,
            "benchmark_s": entry.tune_seconds,
            "candidates_tried": entry.candidates_tried,
            "candidates_skipped": [
                {"config": s.config, "reason": s.reason} for s in outcome.stats.skipped
            ],
            "bench_runs": outcome.stats.bench_runs,
            "config": entry.config,
            "winner_ms": entry.winner_ms,
            "default_ms": entry.default_ms,
        },
        "timing": {
            "tuned_ms": tuned_ms,
            "default_ms": default_ms,
            "torch_ms": torch_ms,
            "tuned_tflops": tuned_tf,
            "default_tflops": default_tf,
            "torch_tflops": torch_tf,
            # Throughput ratios: above 1 means the tuned kernel is faster.
            "tuned_vs_torch": _ratio(tuned_tf, torch_tf),
            "tuned_vs_default": _ratio(tuned_tf, default_tf),
            "tuned_config": entry.config,
            "default_config": default,
            "tuned_call_bench_runs": kernel.stats.bench_runs,
            "max_abs_diff_vs_torch": float((got - want).abs().max().item()),
            "torch_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        },
    }


# ---------------------------------------------------------------- fresh processes


def spawn(
    role: str,
    shape: Shape,
    args: argparse.Namespace,
    work: Path,
    index: int,
    entry_path: Path | None = None,
) -> dict[str, Any]:
    """Runs this script as a fresh ``role`` process; returns its JSON line."""
    cache = work / f"cache-{role}-{index}"
    env = dict(os.environ)
    env["GPUFLEET_KERNEL_CACHE"] = str(cache)
    env.pop("GPUFLEET_KERNEL_FINGERPRINT", None)
    env["PYTHONUNBUFFERED"] = "1"
    if not args.reuse_triton_cache:
        env["TRITON_CACHE_DIR"] = str(work / f"triton-{role}-{index}")
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--role",
        role,
        "--shape",
        shape_text(shape),
        "--dtype",
        args.dtype,
        "--cache",
        str(cache),
        "--log-level",
        args.log_level,
    ]
    if entry_path is not None:
        command += ["--entry", str(entry_path)]
    if args.interpret:
        command.append("--interpret")
    command += ["--spawned-at", repr(time.time())]
    try:
        done = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.child_timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"the {role} process for {shape_text(shape)} ran past "
            f"{args.child_timeout:.0f} s; raise --child-timeout or use smaller shapes"
        ) from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-6:])
        raise BenchError(
            f"the {role} process for {shape_text(shape)} exited {done.returncode} "
            f"without figures; its stderr ended: {tail or '(empty)'}"
        )
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except ValueError:
        raise BenchError(
            f"the {role} process for {shape_text(shape)} printed {lines[-1][:200]!r} "
            "instead of a JSON line"
        ) from None
    return result


def child_main(args: argparse.Namespace) -> int:
    """A fresh process: a peer that receives the entry, or a cold job."""
    spawned_at = float(args.spawned_at or time.time())
    (shape,) = args.shape
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = _child(args.role, shape, args.dtype, args.cache, args.entry)
    result["spawn_to_first_call_s"] = result.pop("first_call_done_at") - spawned_at
    result["spawn_to_ready_s"] = result.pop("ready_at") - spawned_at
    print(json.dumps(result, sort_keys=True), file=stdout, flush=True)
    return EXIT_OK


def _child(
    role: str, shape: Shape, dtype: str, cache_root: Path, entry_path: Path | None
) -> dict[str, Any]:
    import torch

    from gpufleet.kernels import matmul as mm
    from gpufleet.kernels import registry
    from gpufleet.kernels.autotune import local_fingerprint
    from gpufleet.kernels.cache import KernelCache
    from gpufleet.kernels.entry import KernelEntry
    from gpufleet.kernels.verify import verify_entry

    ready_at = time.time()
    cache = KernelCache(cache_root)
    result: dict[str, Any] = {"role": role, "shape": list(shape), "ready_at": ready_at}
    if role == "peer":
        if entry_path is None:
            raise BenchError("the peer role needs --entry")
        # As the agent does: the pushed entry waits in incoming/ until the
        # verifier accepts it; then jobs find it among the usable entries.
        entry = KernelEntry.from_json(entry_path.read_bytes())
        cache.put_incoming(entry)
        local_fp = local_fingerprint(cache)
        started = time.perf_counter()
        verdict = verify_entry(entry, local_fp=local_fp)
        _sync()
        result["verify_s"] = time.perf_counter() - started
        result["verified"] = verdict.accepted
        result["verdict"] = verdict.to_dict()
        result["fingerprint_key"] = local_fp.key
        if verdict.accepted:
            cache.store(entry, "peer", verified=verdict.to_dict())
            cache.drop_incoming(entry)
        else:
            cache.refuse(entry, verdict.reason)

    device = _device()
    dt = getattr(torch, dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    m, n, k = shape
    a = torch.randn((m, k), device=device, dtype=dt, generator=generator)
    b = torch.randn((k, n), device=device, dtype=dt, generator=generator)
    kernel = mm.matmul_kernel
    kernel.reset()
    started = time.perf_counter()
    mm.matmul(a, b)
    _sync()
    result["first_call_s"] = time.perf_counter() - started
    result["first_call_done_at"] = time.time()
    stats = kernel.stats
    result["bench_runs"] = stats.bench_runs
    result["cache_hits"] = stats.cache_hits
    result["tuned_slots"] = stats.tuned_slots
    fingerprint = kernel.fingerprint
    tuning_key = registry.get(KERNEL).tuning_key_for(list(shape), dtype)
    stored = cache.lookup(fingerprint.key, kernel.slot_key(tuning_key, fingerprint))
    result["fingerprint_key"] = fingerprint.key
    result["config"] = stored.entry.config if stored is not None else None
    result["origin"] = stored.origin if stored is not None else None
    if stored is not None and stored.origin == "local":
        result["tune_s"] = stored.entry.tune_seconds
        result["candidates_tried"] = stored.entry.candidates_tried
    return result


# ---------------------------------------------------------------- the run


def environment(interpret: bool) -> dict[str, Any]:
    """The GPU, library versions and fingerprint this run measured."""
    import torch
    import triton

    from gpufleet.kernels.autotune import local_fingerprint

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    fingerprint = local_fingerprint()
    return {
        "mode": "interpreter" if interpret else "gpu",
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "python": platform.python_version(),
        "host": platform.node(),
        "fingerprint": fingerprint.to_dict(),
    }


def run(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[str]]:
    """Every step for every shape; returns the report and what went wrong."""
    tuner_cache = work / "cache-tuner"
    os.environ["GPUFLEET_KERNEL_CACHE"] = str(tuner_cache)
    os.environ.pop("GPUFLEET_KERNEL_FINGERPRINT", None)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "kernel_reuse",
        "kernel": KERNEL,
        "dtype": args.dtype,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "fresh_triton_cache_per_process": not args.reuse_triton_cache,
        **environment(args.interpret),
    }
    if args.interpret:
        report["note"] = INTERPRETER_NOTE
    problems: list[str] = []
    results = []
    for index, shape in enumerate(args.shapes):
        name = shape_text(shape)
        print(f"kernel_reuse: {name}: tuning and timing", file=sys.stderr, flush=True)
        try:
            result = tune_and_time(shape, args.dtype, tuner_cache)
        except Exception as exc:
            problems.append(f"{name}: tuning failed: {exc}")
            results.append({"shape": list(shape), "error": str(exc)})
            continue
        entry_path = work / f"shared-{index}.json"
        entry_path.write_text(json.dumps(result["entry"], sort_keys=True))
        for role in ("peer", "cold"):
            print(f"kernel_reuse: {name}: {role} process", file=sys.stderr, flush=True)
            try:
                result[role] = spawn(
                    role,
                    shape,
                    args,
                    work,
                    index,
                    entry_path if role == "peer" else None,
                )
            except BenchError as exc:
                problems.append(f"{name}: {exc}")
                result[role] = {"error": str(exc)}
        problems.extend(_expectations(name, result))
        results.append(result)
    report["shapes"] = results
    report["total_s"] = time.perf_counter() - started
    report["problems"] = problems
    return report, problems


def _expectations(name: str, result: dict[str, Any]) -> list[str]:
    """What must hold for the peer to have run on the shared entry."""
    found = []
    peer, cold = result.get("peer", {}), result.get("cold", {})
    if "error" not in peer:
        if not peer.get("verified"):
            reason = peer.get("verdict", {}).get("reason")
            found.append(f"{name}: the peer refused the shared entry ({reason})")
        elif peer.get("bench_runs") != 0 or peer.get("cache_hits") != 1:
            found.append(
                f"{name}: the peer made {peer.get('bench_runs')} benchmark launches "
                f"and {peer.get('cache_hits')} cache hits; expected 0 and 1"
            )
        elif peer.get("config") != result["tune"]["config"]:
            found.append(f"{name}: the peer ran {peer.get('config')}, not the entry")
    if "error" not in cold and cold.get("tuned_slots") != 1:
        found.append(
            f"{name}: the cold process tuned {cold.get('tuned_slots')} slots, "
            "expected 1 (its cache was empty)"
        )
    return found


# ---------------------------------------------------------------- output


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 10 ** (digits - 1):
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def compact_config(config: dict[str, int] | None) -> str:
    """``{"BLOCK_M": 128, ..., "num_warps": 8}`` -> ``128x256x64 g8 w8 s3``."""
    if not config:
        return "-"
    blocks = "x".join(
        str(config.get(k, "?")) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    )
    knobs = [
        f"{short}{config[name]}"
        for name, short in (("GROUP_M", "g"), ("num_warps", "w"), ("num_stages", "s"))
        if name in config
    ]
    extra = [
        f"{name}={value}"
        for name, value in sorted(config.items())
        if name
        not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    ]
    return " ".join([blocks, *knobs, *extra])


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain text, the first column left-aligned and the others right-aligned."""
    widths = [
        max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))
    ]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def render(report: dict[str, Any]) -> str:
    """The printed summary: a speed table and a reuse table."""
    interpret = report["mode"] == "interpreter"
    where = (
        f"Triton interpreter on {report['cpu'] or 'the CPU'}"
        if interpret
        else report["gpu"]
    )
    fp = report["fingerprint"]
    out = [
        f"kernel_reuse: {report['kernel']} {report['dtype']} on {where}; "
        f"torch {report['torch']}, triton {report['triton']}, "
        f"fingerprint {fp['key']} ({fp['product']}, {fp['compute_capability']})",
    ]
    if interpret:
        out.append(INTERPRETER_NOTE)
    shapes = [s for s in report["shapes"] if "error" not in s]
    unit = "TFLOP/s" + (" (interp.)" if interpret else "")
    speed_rows = []
    for s in shapes:
        t, tune = s["timing"], s["tune"]
        speed_rows.append(
            [
                shape_text(s["shape"]),
                _fmt(tune["wall_s"]),
                str(tune["candidates_tried"]),
                compact_config(tune["config"]),
                _fmt(t["tuned_tflops"]),
                _fmt(t["default_tflops"]),
                _fmt(t["torch_tflops"]),
                _fmt(t["tuned_vs_torch"], 2),
                _fmt(t["tuned_vs_default"], 2),
            ]
        )
    out += [
        "",
        "Tuning and speed (median; ratios are throughput, above 1 = tuned faster):",
        table(
            [
                "shape MxNxK",
                "tune s",
                "tried",
                "tuned config",
                f"tuned {unit}",
                "default",
                "torch",
                "tuned/torch",
                "tuned/default",
            ],
            speed_rows,
        ),
    ]
    reuse_rows = []
    for s in shapes:
        peer, cold = s.get("peer", {}), s.get("cold", {})
        reuse_rows.append(
            [
                shape_text(s["shape"]),
                _fmt(peer.get("verified")) if "error" not in peer else "FAILED",
                _fmt(peer.get("verify_s")),
                _fmt(peer.get("spawn_to_first_call_s")),
                _fmt(peer.get("bench_runs")),
                _fmt(cold.get("spawn_to_first_call_s"))
                if "error" not in cold
                else "FAILED",
                _fmt(cold.get("bench_runs")),
                _fmt(
                    cold["spawn_to_first_call_s"] - peer["spawn_to_first_call_s"]
                    if "spawn_to_first_call_s" in cold
                    and "spawn_to_first_call_s" in peer
                    else None
                ),
            ]
        )
    out += [
        "",
        "Fresh processes, seconds from spawn to the first matmul() returning "
        "(peer: verification included):",
        table(
            [
                "shape MxNxK",
                "peer verified",
                "verify s",
                "peer s",
                "peer bench_runs",
                "cold s",
                "cold bench_runs",
                "saved s",
            ],
            reuse_rows,
        ),
    ]
    for s in report["shapes"]:
        if "error" in s:
            out.append(f"{shape_text(s['shape'])}: {s['error']}")
    if interpret:
        out += ["", "(interpreter figures, not GPU timings)"]
    out.append(f"total {report['total_s']:.1f} s")
    return "\n".join(out)


def _default_out() -> Path | None:
    folder = os.environ.get("OUT")
    return Path(folder) / "kernel_reuse.json" if folder else None


def _stop_on_sigterm() -> None:
    """Turns SIGTERM (``timeout``, a scheduler) into SystemExit.

    subprocess.run then kills the fresh process it waits for, and the
    temporary folders are removed, instead of leaving both behind.
    """

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """The command (see the module doc)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.interpret and _interpret_env_set():
        print(
            "kernel_reuse: TRITON_INTERPRET is set in the environment, so this is "
            "an interpreter run (as with --interpret)",
            file=sys.stderr,
        )
        args.interpret = True
    if args.interpret:
        # Triton reads this when its JIT decorators run: before any import.
        os.environ["TRITON_INTERPRET"] = "1"
    if args.role is not None:
        if args.shape is None or args.cache is None or len(args.shape) != 1:
            parser.error("--role needs --shape MxNxK (one) and --cache DIR")
        _configure_logs(args.log_level)
        return child_main(args)
    _stop_on_sigterm()
    if args.shapes is None:
        args.shapes = parse_shapes(INTERPRETER_SHAPES if args.interpret else GPU_SHAPES)
    args.shapes = list(dict.fromkeys(args.shapes))  # each shape once, in order
    out_path = args.out or _default_out()

    with tempfile.TemporaryDirectory(prefix="gpufleet-kernel-reuse-") as tmp:
        work = Path(tmp)
        if not args.reuse_triton_cache:
            os.environ["TRITON_CACHE_DIR"] = str(work / "triton-tuner")
        problem = _runtime_problem(args.interpret)
        if problem is not None:
            print(f"kernel_reuse: {problem}", file=sys.stderr)
            return EXIT_USAGE
        _configure_logs(args.log_level)
        report, problems = run(args, work)

    print(render(report), flush=True)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        print(f"figures written to {out_path}")
    for line in problems:
        print(f"kernel_reuse: PROBLEM: {line}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def _configure_logs(level: str) -> None:
    from gpufleet.logs import configure

    configure(level)


if __name__ == "__main__":
    sys.exit(main())
