"""The job-side autotuner: picks a kernel config once per slot and shares it.

A :class:`TunedKernel` wraps a ``@triton.jit`` kernel. On each call it finds
the config for the call's *tuning key* (the key arguments' values and the
tensor dtypes): first in process memory, then in the host's
:class:`~gpufleet.kernels.cache.KernelCache` (filled by this host or, after
verification, by a peer with the same hardware fingerprint), and only then by
benchmarking every local candidate. Benchmarks run on clones of the arguments
the kernel writes (``restore=``), so the caller's tensors change exactly once.

This runs inside training jobs, the verifier and ``gpufleet kernels tune``;
it imports torch and Triton, so the agent and the broker never import it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import socket
import statistics
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

from gpufleet.kernels.cache import (
    CacheLockTimeout,
    KernelCache,
    StoredEntry,
)
from gpufleet.kernels.candidates import candidates_for, vendor_of
from gpufleet.kernels.device import ENV_INTERPRET as ENV_INTERPRET
from gpufleet.kernels.device import cpu_fingerprint as cpu_fingerprint
from gpufleet.kernels.device import cuda_fingerprint as cuda_fingerprint
from gpufleet.kernels.device import interpreting, local_fingerprint
from gpufleet.kernels.entry import (
    EntryRejected,
    KernelEntry,
    candidates_hash,
    slot_key,
    source_hash,
)
from gpufleet.kernels.fingerprint import HardwareFingerprint
from gpufleet.logs import library_logger

log = library_logger(__name__)

# Launch options that Triton takes beside the kernel's own constexpr
# arguments; every other config name must be a parameter of the kernel.
LAUNCH_OPTIONS = frozenset(
    {
        "num_warps",
        "num_stages",
        "num_ctas",
        "waves_per_eu",
        "matrix_instr_nonkdim",
        "kpack",
    }
)
# The interpreter runs programs one after another in numpy, so its timings
# only rank configs coarsely; three runs and the median are enough for that.
INTERPRETER_BENCH_RUNS = 3
_REASON_CHARS = 300
# Triton 3.9's interpreter returns NaN for a bf16 add and errors of 1e10 for a
# bf16 matmul: a tune there would store, and share, a wrong winner.
INTERPRETER_BF16 = (
    "Triton's interpreter cannot compute bfloat16 correctly; use float16/float32 "
    "or run on a GPU"
)
# What Triton says when a kernel is launched with no GPU and no interpreter.
_NO_DRIVER = "active drivers"
NO_DRIVER_HINT = (
    "no GPU driver is active; on a CPU set TRITON_INTERPRET=1 before importing "
    "gpufleet.kernels"
)

Config = dict[str, int]
Grid = tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]]


class KernelTuningError(RuntimeError):
    """No candidate config of a kernel could run for one tuning key."""

    def __init__(self, kernel: str, tuning_key: str, skipped: list[SkippedConfig]):
        self.kernel = kernel
        self.tuning_key = tuning_key
        self.skipped = skipped
        if skipped and all(_NO_DRIVER in s.reason for s in skipped):
            # Not the arguments' fault: nothing can run any config here.
            super().__init__(
                f"cannot run kernel {kernel!r} for {tuning_key}: {NO_DRIVER_HINT} "
                f"(Triton: {skipped[0].reason})"
            )
            return
        reasons = "; ".join(f"{s.config}: {s.reason}" for s in skipped[:4])
        super().__init__(
            f"cannot run kernel {kernel!r} for {tuning_key}: every one of its "
            f"{len(skipped)} candidate configs failed ({reasons}). Check the "
            "arguments' shapes, dtypes and devices."
        )


class NoGpuDriverError(RuntimeError):
    """Triton found no GPU driver and the interpreter is off."""

    def __init__(self, kernel: str, detail: str) -> None:
        self.kernel = kernel
        super().__init__(f"cannot run kernel {kernel!r}: {NO_DRIVER_HINT} ({detail})")


@dataclass(frozen=True)
class SkippedConfig:
    """A candidate that failed to compile or run while tuning, and why."""

    config: Config
    reason: str


@dataclass
class TuneStats:
    """Counters of one :class:`TunedKernel` since it was made or reset."""

    bench_runs: int = 0  # kernel launches made by benchmarks
    tuned_slots: int = 0  # slots tuned (benchmarked) by this process
    cache_hits: int = 0  # slots found in the host's kernel cache
    memory_hits: int = 0  # calls served from this process's memory
    skipped: list[SkippedConfig] = field(default_factory=list)


class Launch:
    """One benchmarkable launch: call it to run the kernel once.

    A benchmark function receives this object; ``config`` tells which config
    it runs, ``kernel`` which kernel, ``role`` why it is timed, and ``runs``
    how often it was called.
    """

    def __init__(
        self,
        run: Callable[[], None],
        config: Config,
        kernel: str,
        *,
        role: str = "candidate",
    ) -> None:
        self._run = run
        self.config = dict(config)
        self.kernel = kernel
        self.role = role  # "candidate" when tuning; "entry" or "default" verifying
        self.runs = 0

    def __call__(self) -> None:
        self.runs += 1
        self._run()


BenchFn = Callable[[Launch], float]


def interpreter_bench(launch: Launch) -> float:
    """Median wall time of a few runs in ms; for the interpreter."""
    times = []
    for _ in range(INTERPRETER_BENCH_RUNS):
        start = time.perf_counter()
        launch()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def gpu_bench(launch: Launch) -> float:
    """Triton's ``do_bench`` median in ms; for a real GPU."""
    return float(triton.testing.do_bench(launch, return_mode="median"))


_global_bench: BenchFn | None = None


def set_bench(fn: BenchFn | None) -> None:
    """Sets the benchmark function of every TunedKernel without its own.

    ``fn(launch) -> ms`` must call ``launch()`` at least once; None restores
    the default (``do_bench`` on a GPU, a timer under the interpreter).
    """
    global _global_bench
    _global_bench = fn


def default_bench() -> BenchFn:
    """The benchmark function used when none was set."""
    if _global_bench is not None:
        return _global_bench
    return interpreter_bench if interpreting() else gpu_bench


# ---------------------------------------------------------------- tuning key


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``float16``."""
    return str(dtype).removeprefix("torch.")


def _key_part(name: str, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{name}=" + "x".join(str(d) for d in value.shape)
    if isinstance(value, bool):
        return f"{name}={int(value)}"
    if isinstance(value, int | str):
        return f"{name}={value}"
    if isinstance(value, float):
        return f"{name}={value!r}"
    if isinstance(value, torch.dtype):
        return f"{name}={dtype_name(value)}"
    raise TypeError(
        f"tuning key argument {name!r} is a {type(value).__name__}; key arguments "
        "must be ints, floats, strings, dtypes or tensors"
    )


def make_tuning_key(values: dict[str, Any], dtypes: Iterable[torch.dtype]) -> str:
    """The canonical tuning key, e.g. ``M=64,N=64,K=32,dtypes=float16:float16``."""
    parts = [_key_part(name, value) for name, value in values.items()]
    parts.append("dtypes=" + ":".join(dtype_name(d) for d in dtypes))
    return ",".join(parts)


def parse_tuning_key(tuning_key: str) -> tuple[dict[str, str], list[str]]:
    """Splits a tuning key into its key values (as text) and its dtype names.

    Raises:
        ValueError: the key is not of the form ``name=value,...,dtypes=a:b``.
    """
    values: dict[str, str] = {}
    dtypes: list[str] | None = None
    for part in tuning_key.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise ValueError(f"tuning key {tuning_key!r}: {part!r} is not name=value")
        if name == "dtypes":
            dtypes = value.split(":") if value else []
        else:
            values[name] = value
    if dtypes is None:
        raise ValueError(f"tuning key {tuning_key!r} has no dtypes= part")
    return values, dtypes


# ---------------------------------------------------------------- the tuner


def _reason(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:_REASON_CHARS]


def _pre_launch_errors() -> tuple[type[BaseException], ...]:
    """Errors Triton raises before a kernel touches memory (compile, resources)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return (CompilationError, OutOfResources)


class TunedKernel:
    """A Triton kernel that runs with the tuned config of each call's slot.

    Call it like ``triton.autotune``: ``kernel[grid](*args, **kwargs)``, where
    ``grid`` is a tuple or a function of the launch's META dict (the named
    arguments and the config). Pass ``bench=fn`` to that call to benchmark
    with ``fn`` instead of the kernel's or the global benchmark function.

    Args:
        fn: the ``@triton.jit`` kernel.
        name: the kernel's name in caches, entries and candidate lists.
        key: names of the arguments whose values decide the best config.
        restore: names of the arguments the kernel writes and also reads;
            benchmarks run on clones of them. Any other tensor argument whose
            memory overlaps a restored one (``add_(x, x)``) is cloned for the
            benchmarks too, so they never write or read the caller's tensors
            there; the real launch then runs on the caller's tensors as
            given, aliasing included. Such calls therefore behave the same
            whether the slot is tuned or not. Tensors without elements, and
            views of one buffer whose bytes do not overlap, are independent.
        cache: the kernel cache; None uses ``GPUFLEET_KERNEL_CACHE`` (read at
            each lookup), else ``~/.cache/gpufleet/kernels``.
        fingerprint: the hardware fingerprint; None uses
            :func:`local_fingerprint`.
        bench: the benchmark function; None uses :func:`default_bench`.
        candidates: the candidate list, or one list per vendor ("nvidia",
            "amd", "cpu"); None uses the vendor's list in
            :mod:`gpufleet.kernels.candidates` for ``name``. The first
            candidate is the untuned default.
        lock_timeout_s: how long to wait for another process tuning the
            same slot before tuning anyway.
    """

    def __init__(
        self,
        fn: Any,
        *,
        name: str,
        key: Sequence[str],
        restore: Sequence[str] = (),
        cache: KernelCache | None = None,
        fingerprint: HardwareFingerprint | None = None,
        bench: BenchFn | None = None,
        candidates: Sequence[Config] | dict[str, Sequence[Config]] | None = None,
        lock_timeout_s: float = 600.0,
    ) -> None:
        self.fn = fn
        self.name = name
        self.key = list(key)
        self.restore = list(restore)
        self.arg_names: list[str] = list(fn.arg_names)
        self._arg_set = frozenset(self.arg_names)
        unknown = [n for n in [*self.key, *self.restore] if n not in self.arg_names]
        if unknown:
            raise ValueError(
                f"kernel {name!r}: key/restore names {unknown} are not arguments "
                f"of the kernel (it has {self.arg_names})"
            )
        if "bench" in self.arg_names:
            raise ValueError(
                f"kernel {name!r} has an argument named 'bench', which TunedKernel "
                "reserves for the per-call benchmark function; rename it"
            )
        self._cache = cache
        self._fingerprint = fingerprint
        self._bench = bench
        self._candidates = candidates
        self.lock_timeout_s = lock_timeout_s
        self.source = textwrap.dedent(inspect.getsource(fn.fn))
        self.source_hash = source_hash(self.source)
        self.stats = TuneStats()
        # (fingerprint, raw tuning key) -> config, and vendor -> list hash.
        self._memory: dict[tuple[HardwareFingerprint, tuple[Any, ...]], Config] = {}
        self._hashes: dict[str, str] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"TunedKernel({self.name!r}, key={self.key}, restore={self.restore})"

    # ------------------------------------------------------------ settings

    def copy(self, **overrides: Any) -> TunedKernel:
        """A new TunedKernel of the same kernel, empty memory and stats."""
        settings: dict[str, Any] = {
            "name": self.name,
            "key": self.key,
            "restore": self.restore,
            "cache": self._cache,
            "fingerprint": self._fingerprint,
            "bench": self._bench,
            "candidates": self._candidates,
            "lock_timeout_s": self.lock_timeout_s,
        }
        settings.update(overrides)
        return TunedKernel(self.fn, **settings)

    def reset(self) -> None:
        """Forgets the configs held in memory and zeroes the stats."""
        with self._lock:
            self._memory.clear()
            self.stats = TuneStats()

    def set_bench(self, fn: BenchFn | None) -> None:
        """Sets this kernel's benchmark function (None: the default)."""
        self._bench = fn

    @property
    def cache(self) -> KernelCache:
        return self._cache if self._cache is not None else KernelCache()

    @property
    def fingerprint(self) -> HardwareFingerprint:
        if self._fingerprint is not None:
            return self._fingerprint
        return local_fingerprint(self._cache)

    def candidates(self, vendor: str | None = None) -> list[Config]:
        """The candidate configs on ``vendor`` (default: this host's)."""
        if vendor is None:
            vendor = self.fingerprint.vendor
        if self._candidates is None:
            return candidates_for(self.name, vendor_of(vendor))
        if isinstance(self._candidates, dict):
            try:
                listed = self._candidates[vendor_of(vendor)]
            except KeyError:
                raise KeyError(
                    f"kernel {self.name!r} has no candidates for vendor "
                    f"{vendor_of(vendor)!r}; it has {sorted(self._candidates)}"
                ) from None
            return [dict(c) for c in listed]
        return [dict(c) for c in self._candidates]

    def candidates_hash(self, vendor: str | None = None) -> str:
        """The hash of the candidate list on ``vendor`` (default: this host's)."""
        if vendor is None:
            vendor = self.fingerprint.vendor
        known = self._hashes.get(vendor)
        if known is None:
            known = self._hashes[vendor] = candidates_hash(self.candidates(vendor))
        return known

    def default_config(self, vendor: str | None = None) -> Config:
        """What runs untuned: the first candidate."""
        return self.candidates(vendor)[0]

    def slot_key(self, tuning_key: str, fingerprint: HardwareFingerprint) -> str:
        """The slot of one tuning key on one fingerprint."""
        return slot_key(
            fingerprint.key,
            self.name,
            self.source_hash,
            tuning_key,
            self.candidates_hash(fingerprint.vendor),
        )

    # ------------------------------------------------------------ calling

    def __getitem__(self, grid: Grid) -> Callable[..., None]:
        def launcher(*args: Any, **kwargs: Any) -> None:
            self.run(*args, grid=grid, **kwargs)

        return launcher

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Maps positional and keyword arguments to the kernel's names."""
        if len(args) > len(self.arg_names):
            raise TypeError(
                f"kernel {self.name!r} takes {len(self.arg_names)} arguments, "
                f"got {len(args)}"
            )
        bound = dict(zip(self.arg_names, args, strict=False))
        for name, value in kwargs.items():
            if name in bound:
                raise TypeError(f"kernel {self.name!r} got {name!r} twice")
            bound[name] = value
        return bound

    def tuning_key(self, *args: Any, **kwargs: Any) -> str:
        """The tuning key of a call with these arguments."""
        return self._tuning_key(self.bind(args, kwargs))

    def _tuning_key(self, bound: dict[str, Any]) -> str:
        missing = [name for name in self.key if name not in bound]
        if missing:
            raise TypeError(f"kernel {self.name!r} call lacks key arguments {missing}")
        dtypes = [v.dtype for v in bound.values() if isinstance(v, torch.Tensor)]
        return make_tuning_key({name: bound[name] for name in self.key}, dtypes)

    def _raw_key(self, bound: dict[str, Any]) -> tuple[Any, ...]:
        """What the tuning key is made of, cheaper to build than its text."""
        parts: list[Any] = []
        for name in self.key:
            value = bound.get(name)
            parts.append(value.shape if isinstance(value, torch.Tensor) else value)
        parts.extend(v.dtype for v in bound.values() if isinstance(v, torch.Tensor))
        return tuple(parts)

    def run(
        self, *args: Any, grid: Grid, bench: BenchFn | None = None, **kwargs: Any
    ) -> None:
        """Runs the kernel once with the config of this call's slot.

        Tunes the slot first when neither memory nor the cache holds it.
        """
        bound = self.bind(args, kwargs)
        fingerprint = self.fingerprint
        memo = (fingerprint, self._raw_key(bound))
        config = self._memory.get(memo)
        if config is not None:
            # The hot path: no key text, no hashing, no file access.
            self.stats.memory_hits += 1
            self._launch(config, grid, args, kwargs, bound)
            return
        # Checked before the memo is filled, so the hot path never needs to.
        self._check_dtypes(bound.values())
        tuning_key = self._tuning_key(bound)
        slot = self.slot_key(tuning_key, fingerprint)
        with self._lock:
            config, origin = self._config_of(memo, slot, fingerprint, tuning_key)
            if config is None:
                config = self._tune_slot(
                    slot, fingerprint, tuning_key, bound, grid, bench
                )
                origin = "tuned"
            self._memory[memo] = config
        try:
            self.launch(config, grid, *args, **kwargs)
        except _pre_launch_errors() as exc:
            if origin == "tuned":
                raise
            # A cached config that cannot compile here fails before the kernel
            # touches memory, so tuning again and rerunning is safe.
            log.warning(
                "kernels.cached_config_failed",
                kernel=self.name,
                slot_key=slot,
                config=config,
                error=_reason(exc),
            )
            with self._lock:
                self._memory.pop(memo, None)
                config = self._tune_slot(
                    slot, fingerprint, tuning_key, bound, grid, bench, use_cache=False
                )
                self._memory[memo] = config
            self.launch(config, grid, *args, **kwargs)

    def launch(self, config: Config, grid: Grid, *args: Any, **kwargs: Any) -> None:
        """Runs the kernel once with an explicit config, without tuning.

        Raises:
            TypeError: a bfloat16 tensor under Triton's interpreter, or
                config names the kernel does not take.
            NoGpuDriverError: no GPU driver and no interpreter.
        """
        self._check_dtypes([*args, *kwargs.values()])
        bound = self.bind(args, kwargs) if callable(grid) else None
        self._launch(config, grid, args, kwargs, bound)

    def _check_dtypes(self, values: Iterable[Any]) -> None:
        bf16 = any(
            isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 for v in values
        )
        if bf16 and interpreting():
            raise TypeError(f"kernel {self.name!r}: {INTERPRETER_BF16}")

    def _launch(
        self,
        config: Config,
        grid: Grid,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        bound: dict[str, Any] | None,
    ) -> None:
        clash = [name for name in config if name in kwargs]
        if clash:
            raise TypeError(
                f"kernel {self.name!r}: {clash} are tuned config names; do not pass "
                "them to the call"
            )
        unknown = [
            name
            for name in config
            if name not in self._arg_set and name not in LAUNCH_OPTIONS
        ]
        if unknown:
            raise TypeError(
                f"kernel {self.name!r}: config names {unknown} are neither kernel "
                f"arguments nor launch options"
            )
        if callable(grid):
            meta = {**(bound if bound is not None else self.bind(args, kwargs))}
            meta.update(config)
            grid = tuple(grid(meta))
        try:
            self.fn[grid](*args, **kwargs, **config)
        except RuntimeError as exc:
            if _NO_DRIVER in str(exc) and not isinstance(exc, NoGpuDriverError):
                raise NoGpuDriverError(self.name, _reason(exc)) from exc
            raise

    # ------------------------------------------------------------ lookup

    def _config_of(
        self,
        memo: tuple[HardwareFingerprint, tuple[Any, ...]],
        slot: str,
        fingerprint: HardwareFingerprint,
        tuning_key: str,
    ) -> tuple[Config | None, str]:
        # Checked again under the lock: another thread may have tuned it.
        config = self._memory.get(memo)
        if config is not None:
            self.stats.memory_hits += 1
            return config, "memory"
        stored = self._lookup(slot, fingerprint)
        if stored is None:
            return None, ""
        self.stats.cache_hits += 1
        log.debug(
            "kernels.cache_hit",
            kernel=self.name,
            tuning_key=tuning_key,
            origin=stored.origin,
            config=stored.entry.config,
        )
        return dict(stored.entry.config), "cache"

    def _lookup(
        self, slot: str, fingerprint: HardwareFingerprint
    ) -> StoredEntry | None:
        """The usable cached entry of a slot; never raises."""
        try:
            stored = self.cache.lookup(fingerprint.key, slot)
        except Exception as exc:
            log.warning(
                "kernels.cache_unreadable", kernel=self.name, error=_reason(exc)
            )
            return None
        if stored is None:
            return None
        entry = stored.entry
        usable = (
            entry.kernel == self.name
            and entry.slot_key == slot
            and entry.config in self.candidates(fingerprint.vendor)
        )
        if not usable:
            log.warning(
                "kernels.cache_entry_ignored",
                kernel=self.name,
                slot_key=slot,
                path=str(stored.path),
                reason="not one of this host's candidates for this slot",
            )
            return None
        return stored

    # ------------------------------------------------------------ tuning

    def _tune_slot(
        self,
        slot: str,
        fingerprint: HardwareFingerprint,
        tuning_key: str,
        bound: dict[str, Any],
        grid: Grid,
        bench: BenchFn | None,
        *,
        use_cache: bool = True,
    ) -> Config:
        """Tunes one slot under the host-wide slot lock and stores the winner."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(
                    self.cache.slot_lock(slot, timeout_s=self.lock_timeout_s)
                )
            except (CacheLockTimeout, OSError, ValueError) as exc:
                log.warning(
                    "kernels.tune_unlocked",
                    kernel=self.name,
                    slot_key=slot,
                    error=_reason(exc),
                )
            if use_cache:
                # Another process may have tuned the slot while we waited.
                stored = self._lookup(slot, fingerprint)
                if stored is not None:
                    self.stats.cache_hits += 1
                    return dict(stored.entry.config)
            entry = self.tune(tuning_key, bound, grid, fingerprint, bench=bench)
            self._store(entry)
            return dict(entry.config)

    def tune(
        self,
        tuning_key: str,
        bound: dict[str, Any],
        grid: Grid,
        fingerprint: HardwareFingerprint,
        *,
        bench: BenchFn | None = None,
    ) -> KernelEntry:
        """Benchmarks every candidate on clones; returns the winner's entry.

        Candidates that fail to compile or run are skipped and recorded in
        ``stats.skipped``.

        Raises:
            KernelTuningError: every candidate failed.
        """
        bench = bench or self._bench or default_bench()
        candidates = self.candidates(fingerprint.vendor)
        started = time.monotonic()
        timings: list[tuple[float, Config]] = []
        default_ms = 0.0
        skipped: list[SkippedConfig] = []
        for index, config in enumerate(candidates):
            ms = self._bench_one(config, bound, grid, bench, skipped)
            if ms is None:
                continue
            timings.append((ms, config))
            if index == 0:
                default_ms = ms
        self.stats.skipped.extend(skipped)
        if not timings:
            raise KernelTuningError(self.name, tuning_key, skipped)
        winner_ms, winner = min(timings, key=lambda t: t[0])
        self.stats.tuned_slots += 1
        entry = KernelEntry(
            kernel=self.name,
            source_hash=self.source_hash,
            candidates_hash=candidates_hash(candidates),
            fingerprint=fingerprint,
            tuning_key=tuning_key,
            config=dict(winner),
            winner_ms=winner_ms,
            default_ms=default_ms,
            tuned_by=socket.gethostname()[:256],
            tuned_at_s=time.time(),
            tune_seconds=time.monotonic() - started,
            candidates_tried=len(candidates),
        )
        log.info(
            "kernels.tuned",
            kernel=self.name,
            tuning_key=tuning_key,
            config=entry.config,
            winner_ms=round(winner_ms, 4),
            default_ms=round(default_ms, 4),
            skipped=len(skipped),
        )
        return entry

    def _bench_one(
        self,
        config: Config,
        bound: dict[str, Any],
        grid: Grid,
        bench: BenchFn,
        skipped: list[SkippedConfig],
    ) -> float | None:
        # Fresh clones per candidate: every candidate starts from the caller's
        # values, and the caller's tensors are never written by a benchmark.
        args = self._clone_restored(bound)
        launch = Launch(lambda: self.launch(config, grid, **args), config, self.name)
        try:
            ms = float(bench(launch))
        except Exception as exc:
            skipped.append(SkippedConfig(dict(config), _reason(exc)))
            log.info(
                "kernels.candidate_failed",
                kernel=self.name,
                config=config,
                error=_reason(exc),
            )
            return None
        finally:
            self.stats.bench_runs += launch.runs
        if launch.runs == 0 or not math.isfinite(ms) or ms < 0:
            skipped.append(
                SkippedConfig(
                    dict(config),
                    f"the benchmark returned {ms!r} after {launch.runs} launches",
                )
            )
            return None
        return ms

    def _clone_restored(self, bound: dict[str, Any]) -> dict[str, Any]:
        """The arguments of one benchmark: restored tensors, and every tensor
        whose bytes overlap one of them, replaced by clones."""
        args = dict(bound)
        spans = {
            name: _byte_span(value)
            for name, value in bound.items()
            if isinstance(value, torch.Tensor)
        }
        restored = [name for name in self.restore if name in spans]
        for name, value in bound.items():
            if name not in spans:
                continue
            if name in self.restore or any(
                _overlap(spans[name], spans[other])
                for other in restored
                if other != name
            ):
                args[name] = value.clone()
        return args

    def _store(self, entry: KernelEntry) -> None:
        """Stores a local winner; a cache that cannot be written only logs."""
        try:
            self.cache.store(entry, "local")
        except (OSError, ValueError, EntryRejected) as exc:
            log.warning(
                "kernels.cache_store_failed",
                kernel=self.name,
                slot_key=entry.slot_key,
                error=_reason(exc),
                hint="the winner is kept in memory; check GPUFLEET_KERNEL_CACHE",
            )


_Span = tuple[torch.device, int, int] | None


def _byte_span(tensor: torch.Tensor) -> _Span:
    """The bytes a tensor's elements occupy: (device, first, past the last)."""
    if tensor.numel() == 0:
        return None
    last = sum(
        (size - 1) * stride
        for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    start = tensor.data_ptr()
    return tensor.device, start, start + (last + 1) * tensor.element_size()


def _overlap(a: _Span, b: _Span) -> bool:
    return (
        a is not None and b is not None and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]
    )


def tuned(
    name: str,
    key: Sequence[str],
    restore: Sequence[str] = (),
    **options: Any,
) -> Callable[[Any], TunedKernel]:
    """Decorator: wraps a ``@triton.jit`` kernel in a :class:`TunedKernel`.

    Example::

        @tuned("add", key=["n_elements"])
        @triton.jit
        def add_kernel(x, y, out, n_elements, BLOCK_SIZE: tl.constexpr): ...

        add_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_SIZE"]),)](x, y, out, n)
    """

    def wrap(fn: Any) -> TunedKernel:
        return TunedKernel(fn, name=name, key=key, restore=restore, **options)

    return wrap
