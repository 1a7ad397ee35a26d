"""Capture and restore of every random number generator a training step uses.

Keys are stable: ``python``, ``numpy``, ``torch_cpu``, ``torch_cuda`` and, for a
data loader's own generators, ``generator.<name>``. A restore reports what it
could not restore, so a resume never claims to be exact when it is not.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from gpufleet.logs import library_logger

log = library_logger(__name__)

KNOWN_KEYS = ("python", "numpy", "torch_cpu", "torch_cuda")
REQUIRED_KEYS = ("python", "numpy", "torch_cpu")
GENERATOR_PREFIX = "generator."

try:
    import numpy as np
except ImportError:  # numpy is optional for jobs that never touch it
    np = None  # type: ignore[assignment]


@dataclass
class RngRestore:
    """What a restore did: names are prefixed ``rng.`` as in events."""

    restored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.skipped


def capture(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The current state of every generator, as CPU tensors and plain values.

    Plain values keep the checkpoint loadable with ``weights_only=True``.
    """
    state: dict[str, Any] = {"python": random.getstate()}
    if np is not None:
        raw = np.random.get_state(legacy=False)
        state["numpy"] = {
            "bit_generator": raw["bit_generator"],
            "key": [int(v) for v in raw["state"]["key"]],
            "pos": int(raw["state"]["pos"]),
            "has_gauss": int(raw["has_gauss"]),
            "gauss": float(raw["gauss"]),
        }
    state["torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state().cpu()
    for name, gen in (generators or {}).items():
        state[GENERATOR_PREFIX + name] = gen.get_state()
    return state


def _as_cpu_bytes(value: Any) -> torch.Tensor:
    # A map_location that moves storages to a GPU turns these into CUDA
    # tensors; set_rng_state needs a CPU ByteTensor (lanl/hippynn#12,
    # pytorch/ignite#2076), so always bring them back.
    return torch.as_tensor(value).to(device="cpu", dtype=torch.uint8)


def restore(
    state: dict[str, Any],
    generators: dict[str, torch.Generator] | None = None,
    *,
    only: tuple[str, ...] | None = None,
) -> RngRestore:
    """Sets every generator from ``state``; unknown or unusable entries are skipped.

    Args:
        generators: the loader's own generators, matched by name.
        only: restore only these keys (others are neither restored nor skipped).
    """
    result = RngRestore()
    gens = generators or {}
    for key in REQUIRED_KEYS:
        if key not in state and (only is None or key in only):
            result.skipped.append(f"rng.{key}")
            _warn(f"rng.{key}", "missing from the checkpoint")
    for key, value in state.items():
        if only is not None and key not in only:
            continue
        try:
            done = _restore_one(key, value, gens)
        except (TypeError, ValueError, RuntimeError) as exc:
            done = False
            _warn(f"rng.{key}", f"could not be restored ({exc})")
        (result.restored if done else result.skipped).append(f"rng.{key}")
    return result


def _restore_one(key: str, value: Any, gens: dict[str, torch.Generator]) -> bool:
    if key == "python":
        random.setstate(_as_tuple(value))
        return True
    if key == "numpy":
        if np is None:
            _warn("rng.numpy", "numpy is not installed here")
            return False
        np.random.set_state(
            {
                "bit_generator": value["bit_generator"],
                "state": {
                    "key": np.asarray(value["key"], dtype=np.uint32),
                    "pos": value["pos"],
                },
                "has_gauss": value["has_gauss"],
                "gauss": value["gauss"],
            }
        )
        return True
    if key == "torch_cpu":
        torch.set_rng_state(_as_cpu_bytes(value))
        return True
    if key == "torch_cuda":
        if not torch.cuda.is_available():
            _warn("rng.torch_cuda", "CUDA is not available on this host; skipped")
            return False
        # The state goes to the job's current device, whichever GPU saved it.
        device = torch.cuda.current_device()
        torch.cuda.set_rng_state(_as_cpu_bytes(value), device=device)
        return True
    if key.startswith(GENERATOR_PREFIX):
        gen = gens.get(key[len(GENERATOR_PREFIX) :])
        if gen is None:
            return False
        gen.set_state(_as_cpu_bytes(value))
        return True
    _warn(f"rng.{key}", "is not a random state this SDK knows; not restored")
    return False


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples where a round trip may give lists."""
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def _warn(name: str, reason: str) -> None:
    log.warning("checkpoint.rng_skipped", name=name, reason=reason)
    warnings.warn(
        f"random state {name} {reason}: the resumed run is not bit-identical",
        RuntimeWarning,
        stacklevel=4,
    )


def loader_generators(loader: Any) -> dict[str, torch.Generator]:
    """The torch generators a DataLoader and its samplers own, by name."""
    found: dict[str, torch.Generator] = {}
    candidates = {
        "loader": getattr(loader, "generator", None),
        "sampler": getattr(getattr(loader, "sampler", None), "generator", None),
        "batch_sampler": getattr(
            getattr(getattr(loader, "batch_sampler", None), "sampler", None),
            "generator",
            None,
        ),
    }
    seen: set[int] = set()
    for name, gen in candidates.items():
        if isinstance(gen, torch.Generator) and id(gen) not in seen:
            seen.add(id(gen))
            found[name] = gen
    return found
