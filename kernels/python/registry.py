"""The autotuned kernels by name, with what it takes to check a config of them.

The verifier, ``gpufleet kernels tune`` and benchmarks look kernels up here:
each :class:`KernelSpec` can build inputs from a tuning key, run the kernel
with one explicit config, compute the torch reference and estimate a config's
shared memory. The built-in kernels register themselves on first use; more
come from the modules named in ``GPUFLEET_KERNEL_MODULES`` (comma-separated
import names), which call :func:`register` when imported.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gpufleet.kernels.autotune import (
    INTERPRETER_BF16,
    Config,
    TunedKernel,
    TuneStats,
    dtype_name,
    interpreting,
    make_tuning_key,
    parse_tuning_key,
)
from gpufleet.kernels.cache import KernelCache
from gpufleet.kernels.entry import KernelEntry

ENV_MODULES = "GPUFLEET_KERNEL_MODULES"
INPUT_SEED = 20240917

# A verifier builds its own inputs from a received tuning key: these bound
# what a peer can make it allocate. Larger real slots are not verified here.
MAX_SIZE = 1 << 40
MAX_INPUT_ELEMENTS = 1 << 31
# The bytes one set of inputs (and the outputs they make) may take, while
# :func:`input_budget` sets it; None outside, where only the element cap holds.
_input_budget: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "gpufleet_kernel_input_budget", default=None
)

Inputs = dict[str, Any]
# (atol, rtol) by dtype name; "default" for any other dtype.
Tolerances = dict[str, tuple[float, float]]


class UnknownKernelError(KeyError):
    """No kernel of that name is registered."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = list(known)
        fixed = {"softmax", "rms_norm", "layer_norm"}
        why = (
            f"{name!r} is not autotuned: it picks its block size from the row "
            "length, so there is nothing to tune or share"
            if name in fixed
            else f"no kernel named {name!r} is registered"
        )
        super().__init__(
            f"{why} (autotuned kernels: {', '.join(known)}); "
            f"user kernels come from the modules listed in {ENV_MODULES}"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class InputsTooLargeError(ValueError):
    """A tuning key whose inputs are too large to build for verification."""

    def __init__(self, tuning_key: str, detail: str) -> None:
        self.tuning_key = tuning_key
        super().__init__(f"inputs for {tuning_key}: {detail}, too large to build here")


@dataclass(frozen=True)
class KernelSpec:
    """One autotuned kernel and how to check a config of it.

    ``run`` and ``reference`` may write the inputs they are given (in-place
    kernels do), so callers hand each of them its own copy
    (:func:`clone_inputs`). Both return the kernel's outputs: a tensor or a
    tuple of tensors (the updated tensors for an in-place kernel).

    Attributes:
        name: the kernel's name in entries and candidate lists.
        kernel: the TunedKernel.
        make_inputs: ``(tuning_key, device) -> inputs``, deterministic.
        reference: ``inputs -> outputs``, computed with torch.
        run: ``(inputs, config) -> outputs``, one launch with ``config``.
        call: ``(inputs, kernel) -> outputs``, the tuned public function.
        tuning_key_for: ``(shape, dtype_name) -> tuning key``, where
            ``shape`` is what ``gpufleet kernels tune --shape`` gives
            (``[M, N, K]`` for matmul, ``[n]`` for elementwise kernels).
        tolerances: (atol, rtol) by dtype name, plus "default".
        shared_memory: ``(config, tuning_key) -> bytes`` estimate, or None
            where the kernel uses no shared memory worth checking.
    """

    name: str
    kernel: TunedKernel
    make_inputs: Callable[[str, torch.device | str], Inputs]
    reference: Callable[[Inputs], Any]
    run: Callable[[Inputs, Config], Any]
    call: Callable[[Inputs, TunedKernel], Any]
    tuning_key_for: Callable[[Sequence[int], str], str]
    tolerances: Tolerances = field(
        default_factory=lambda: {
            "float16": (1e-2, 1e-2),
            "bfloat16": (5e-2, 2e-2),
            "default": (1e-5, 1e-5),
        }
    )
    shared_memory: Callable[[Config, str], int] | None = None

    @property
    def source_hash(self) -> str:
        return self.kernel.source_hash

    def candidates(self, vendor: str) -> list[Config]:
        """This host's candidate configs on ``vendor``; the first is the default."""
        return self.kernel.candidates(vendor)

    def candidates_hash(self, vendor: str) -> str:
        return self.kernel.candidates_hash(vendor)

    def shared_memory_bytes(self, config: Config, tuning_key: str) -> int | None:
        """Estimated shared memory of one program with ``config``, if known."""
        if self.shared_memory is None:
            return None
        return self.shared_memory(config, tuning_key)

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        """(atol, rtol) for outputs of ``dtype``."""
        return self.tolerances.get(dtype_name(dtype), self.tolerances["default"])


# ---------------------------------------------------------------- registry

_specs: dict[str, KernelSpec] = {}
_loaded_modules: set[str] = set()
_builtins_loaded = False
_registry_lock = threading.RLock()


def register(spec: KernelSpec, *, replace: bool = False) -> KernelSpec:
    """Adds a kernel; registering the same spec again is a no-op.

    Raises:
        ValueError: another spec already has this name and ``replace`` is
            False.
    """
    with _registry_lock:
        known = _specs.get(spec.name)
        if known is not None and known is not spec and not replace:
            raise ValueError(
                f"a kernel named {spec.name!r} is already registered; pick another "
                "name or pass replace=True"
            )
        _specs[spec.name] = spec
    return spec


def load_modules(names: str | None = None) -> list[str]:
    """Imports the kernel modules named in ``names`` or ``GPUFLEET_KERNEL_MODULES``.

    Returns:
        The module names imported by this call.

    Raises:
        ImportError: a named module cannot be imported.
    """
    raw = os.environ.get(ENV_MODULES, "") if names is None else names
    imported = []
    for module in (part.strip() for part in raw.split(",")):
        if not module or module in _loaded_modules:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ImportError(
                f"cannot import kernel module {module!r} named in {ENV_MODULES}: "
                f"{type(exc).__name__}: {exc}. Check the name and that its folder "
                "is on PYTHONPATH"
            ) from exc
        _loaded_modules.add(module)
        imported.append(module)
    return imported


def _load_builtins() -> None:
    global _builtins_loaded
    with _registry_lock:
        if _builtins_loaded:
            return
        for spec in _builtin_specs():
            register(spec)
        _builtins_loaded = True


def get(name: str) -> KernelSpec:
    """The spec of one kernel (built-in or from ``GPUFLEET_KERNEL_MODULES``).

    Raises:
        UnknownKernelError: no kernel has that name.
        ImportError: a module named in ``GPUFLEET_KERNEL_MODULES`` is broken.
    """
    _load_builtins()
    load_modules()
    with _registry_lock:
        spec = _specs.get(name)
        if spec is None:
            raise UnknownKernelError(name, sorted(_specs))
        return spec


def names() -> list[str]:
    """Names of every registered kernel."""
    _load_builtins()
    load_modules()
    with _registry_lock:
        return sorted(_specs)


def specs() -> list[KernelSpec]:
    """Every registered kernel's spec."""
    return [get(name) for name in names()]


# ---------------------------------------------------------------- helpers


def clone_inputs(inputs: Inputs) -> Inputs:
    """A copy of ``inputs`` whose tensors are fresh clones."""
    return {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
    }


def as_outputs(value: Any) -> tuple[torch.Tensor, ...]:
    """A kernel's outputs as a tuple of tensors."""
    if isinstance(value, torch.Tensor):
        return (value,)
    return tuple(value)


def random_tensor(
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    seed: int,
    scale: float = 1.0,
) -> torch.Tensor:
    """A reproducible normal tensor: the same values on every host."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    values = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return (values * scale).to(dtype=dtype, device=device)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name!r} is not a floating-point torch dtype")
    return dtype


def _int_values(tuning_key: str, wanted: Sequence[str]) -> tuple[list[int], list[str]]:
    values, dtypes = parse_tuning_key(tuning_key)
    try:
        numbers = [int(values[name]) for name in wanted]
    except (KeyError, ValueError):
        raise ValueError(
            f"tuning key {tuning_key!r} lacks integer values for {list(wanted)}"
        ) from None
    if any(not 1 <= n <= MAX_SIZE for n in numbers):
        raise ValueError(f"tuning key {tuning_key!r} has sizes outside 1..{MAX_SIZE}")
    return numbers, dtypes


@contextlib.contextmanager
def input_budget(max_bytes: int | None) -> Iterator[None]:
    """Caps the bytes that ``make_inputs`` may build inside the block.

    :func:`check_input_size` enforces it; the verifier sets it, so that a
    received tuning key cannot make it allocate without bound.
    """
    token = _input_budget.set(max_bytes)
    try:
        yield
    finally:
        _input_budget.reset(token)


def check_input_size(
    tuning_key: str, dtype: torch.dtype, *shapes: Sequence[int]
) -> None:
    """Refuses tensors of ``shapes`` that are too large to build.

    ``make_inputs`` of a user kernel should call it, before allocating, with
    the shapes of its inputs and of the outputs a run makes.

    Raises:
        InputsTooLargeError: one tensor has more than ``MAX_INPUT_ELEMENTS``
            elements, or, inside :func:`input_budget`, all of them take more
            bytes than the budget.
    """
    for shape in shapes:
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise InputsTooLargeError(
                tuning_key,
                f"a tensor of shape {list(shape)} has more than "
                f"{MAX_INPUT_ELEMENTS} elements",
            )
    budget = _input_budget.get()
    if budget is None:
        return
    total = sum(math.prod(shape) for shape in shapes) * _element_size(dtype)
    if total > budget:
        raise InputsTooLargeError(
            tuning_key,
            f"{len(shapes)} tensors of {dtype_name(dtype)} take {total} bytes, "
            f"more than the {budget} allowed",
        )


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- built-ins


def _matmul_spec() -> KernelSpec:
    from gpufleet.kernels import matmul as mm

    def make_inputs(tuning_key: str, device: torch.device | str) -> Inputs:
        (m, n, k), dtypes = _int_values(tuning_key, ["M", "N", "K"])
        dtype = _dtype(dtypes[0])
        check_input_size(tuning_key, dtype, (m, k), (k, n), (m, n))
        # Scaled so that outputs are about 1 whatever K: fp16 keeps precision.
        scale = 1.0 / math.sqrt(k)
        return {
            "a": random_tensor((m, k), dtype, device, seed=INPUT_SEED, scale=scale),
            "b": random_tensor((k, n), dtype, device, seed=INPUT_SEED + 1),
        }

    def reference(inputs: Inputs) -> torch.Tensor:
        a, b = inputs["a"], inputs["b"]
        return (a.double() @ b.double()).to(a.dtype)

    def shared_memory(config: Config, tuning_key: str) -> int:
        _, dtypes = parse_tuning_key(tuning_key)
        return mm.shared_memory_bytes(config, _dtype(dtypes[0]))

    def tuning_key_for(shape: Sequence[int], dtype: str) -> str:
        if len(shape) != 3:
            raise ValueError(f"matmul takes a shape MxNxK, got {list(shape)}")
        m, n, k = shape
        return make_tuning_key({"M": m, "N": n, "K": k}, [_dtype(dtype)] * 3)

    return KernelSpec(
        name="matmul",
        kernel=mm.matmul_kernel,
        make_inputs=make_inputs,
        reference=reference,
        run=lambda inputs, config: mm.launch_matmul(inputs["a"], inputs["b"], config),
        call=lambda inputs, kernel: mm.matmul(inputs["a"], inputs["b"], kernel=kernel),
        tuning_key_for=tuning_key_for,
        # fp32 inputs run as TF32 on tensor cores, as torch does with
        # allow_tf32; the scaled inputs keep its error near 1e-3.
        tolerances={
            "float16": (1e-2, 1e-2),
            "bfloat16": (4e-2, 2e-2),
            "default": (1e-2, 1e-2),
        },
        shared_memory=shared_memory,
    )


def _elementwise_key(name: str, tensors: int) -> Callable[[Sequence[int], str], str]:
    def tuning_key_for(shape: Sequence[int], dtype: str) -> str:
        if len(shape) != 1:
            raise ValueError(f"{name} takes a shape N (elements), got {list(shape)}")
        return make_tuning_key({"n_elements": shape[0]}, [_dtype(dtype)] * tensors)

    return tuning_key_for


def _elementwise_specs() -> list[KernelSpec]:
    from gpufleet.kernels import elementwise as ew

    def make_pair(tuning_key: str, device: torch.device | str) -> Inputs:
        (n,), dtypes = _int_values(tuning_key, ["n_elements"])
        dtype = _dtype(dtypes[0])
        # x, y and add's output (add_ writes x).
        check_input_size(tuning_key, dtype, (n,), (n,), (n,))
        return {
            "x": random_tensor((n,), dtype, device, seed=INPUT_SEED),
            "y": random_tensor((n,), dtype, device, seed=INPUT_SEED + 1),
        }

    def make_lion(tuning_key: str, device: torch.device | str) -> Inputs:
        (n,), dtypes = _int_values(tuning_key, ["n_elements"])
        dtype = _dtype(dtypes[0])
        check_input_size(tuning_key, dtype, (n,), (n,), (n,))
        return {
            "param": random_tensor((n,), dtype, device, seed=INPUT_SEED),
            "grad": random_tensor((n,), dtype, device, seed=INPUT_SEED + 1),
            "exp_avg": random_tensor(
                (n,), dtype, device, seed=INPUT_SEED + 2, scale=0.1
            ),
            "lr": 1e-3,
            "beta1": 0.9,
            "beta2": 0.99,
            "weight_decay": 0.01,
        }

    def lion_reference(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        # Copies, so that a later write to the inputs cannot change them.
        param, exp_avg = lion_reference_step(**inputs)
        return param.clone(), exp_avg.clone()

    def lion_run(inputs: Inputs, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
        ew.launch_lion_step(**inputs, config=config)
        return inputs["param"], inputs["exp_avg"]

    def lion_call(
        inputs: Inputs, kernel: TunedKernel
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ew.lion_step(**inputs, kernel=kernel)
        return inputs["param"], inputs["exp_avg"]

    exact = {"float16": (1e-3, 1e-3), "bfloat16": (1e-2, 1e-2), "default": (0, 0)}
    return [
        KernelSpec(
            name="add",
            kernel=ew.add_kernel,
            make_inputs=make_pair,
            reference=lambda inputs: inputs["x"] + inputs["y"],
            run=lambda inputs, config: ew.launch_add(inputs["x"], inputs["y"], config),
            call=lambda inputs, kernel: ew.add(inputs["x"], inputs["y"], kernel=kernel),
            tuning_key_for=_elementwise_key("add", 3),
            tolerances=exact,
        ),
        KernelSpec(
            name="add_",
            kernel=ew.add_inplace_kernel,
            make_inputs=make_pair,
            reference=lambda inputs: inputs["x"].add_(inputs["y"]),
            run=lambda inputs, config: ew.launch_add_(inputs["x"], inputs["y"], config),
            call=lambda inputs, kernel: ew.add_(
                inputs["x"], inputs["y"], kernel=kernel
            ),
            tuning_key_for=_elementwise_key("add_", 2),
            tolerances=exact,
        ),
        KernelSpec(
            name="lion_step",
            kernel=ew.lion_kernel,
            make_inputs=make_lion,
            reference=lion_reference,
            run=lion_run,
            call=lion_call,
            tuning_key_for=_elementwise_key("lion_step", 3),
            tolerances={
                "float16": (2e-3, 2e-3),
                "bfloat16": (2e-2, 2e-2),
                "default": (1e-6, 1e-6),
            },
        ),
    ]


def lion_reference_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lion step in plain torch (lion-pytorch's update_fn), in place.

    Computed in fp32 and written back in the tensors' dtype.
    """
    p, g, m = param.float(), grad.float(), exp_avg.float()
    p.mul_(1.0 - lr * weight_decay)
    update = m.clone().mul_(beta1).add(g, alpha=1.0 - beta1).sign_()
    p.add_(update, alpha=-lr)
    m.mul_(beta2).add_(g, alpha=1.0 - beta2)
    param.copy_(p)
    exp_avg.copy_(m)
    return param, exp_avg


def _builtin_specs() -> list[KernelSpec]:
    return [_matmul_spec(), *_elementwise_specs()]


# ---------------------------------------------------------------- tuning


@dataclass(frozen=True)
class TuneOutcome:
    """What :func:`tune_kernel` did."""

    entry: KernelEntry | None  # the slot's entry in the cache after the call
    tuned: bool  # True when this call benchmarked, False on a cache hit
    stats: TuneStats
    tuning_key: str


def tune_kernel(
    name: str,
    shape: Sequence[int],
    dtype: str = "float16",
    *,
    cache: KernelCache | None = None,
    device: torch.device | str | None = None,
    bench: Callable[..., float] | None = None,
    force: bool = False,
) -> TuneOutcome:
    """Tunes one kernel for one shape into ``cache`` (default: the job's).

    With ``force``, the slot's cached entry is removed first so that the
    kernel is benchmarked again.

    Raises:
        UnknownKernelError: no kernel has that name.
        ValueError: the shape or dtype do not fit the kernel.
        TypeError: bfloat16 under Triton's interpreter, which computes it wrong.
        KernelTuningError: no candidate could run.
    """
    spec = get(name)
    cache = cache if cache is not None else KernelCache()
    kernel = spec.kernel.copy(cache=cache, bench=bench)
    tuning_key = spec.tuning_key_for(list(shape), dtype)
    if interpreting() and _dtype(dtype) == torch.bfloat16:
        raise TypeError(f"cannot tune {name!r} for {tuning_key}: {INTERPRETER_BF16}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    fingerprint = kernel.fingerprint
    slot = kernel.slot_key(tuning_key, fingerprint)
    if force:
        cache.remove(fingerprint.key, slot)
    spec.call(spec.make_inputs(tuning_key, device), kernel)
    stored = cache.lookup(fingerprint.key, slot)
    return TuneOutcome(
        entry=stored.entry if stored is not None else None,
        tuned=kernel.stats.tuned_slots > 0,
        stats=kernel.stats,
        tuning_key=tuning_key,
    )
