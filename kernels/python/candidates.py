"""Candidate configs of the autotuned kernels, as plain data.

A config is a dict of named integers: block sizes and the launch knobs
(``num_warps``, ``num_stages`` and, on AMD, ``waves_per_eu``,
``matrix_instr_nonkdim`` and ``kpack``). Nothing here imports Triton or
torch: the broker checks received entries against these lists, and the
kernels turn them into ``triton.Config`` objects.

The first candidate of each list is the kernel's untuned default: what runs
when nothing was tuned, and what a received config is timed against.

A host accepts a config from a peer only when it is one of its own
candidates for that kernel, so these lists are also the whole space of
what a peer can make this host run.
"""

from __future__ import annotations

from typing import Any

Config = dict[str, int]

VENDORS = ("nvidia", "amd", "cpu")


def _mm(
    m: int, n: int, k: int, group: int, warps: int, stages: int, **amd: int
) -> Config:
    return {
        "BLOCK_M": m,
        "BLOCK_N": n,
        "BLOCK_K": k,
        "GROUP_M": group,
        "num_warps": warps,
        "num_stages": stages,
        **amd,
    }


def _amd(
    m: int, n: int, k: int, group: int, warps: int, waves: int, nonk: int, kpack: int
) -> Config:
    return _mm(
        m,
        n,
        k,
        group,
        warps,
        2,  # the AMD backend pipelines in registers; more stages only cost LDS
        waves_per_eu=waves,
        matrix_instr_nonkdim=nonk,
        kpack=kpack,
    )


def _blocks(*sizes: int, warps: int = 4) -> list[Config]:
    return [{"BLOCK_SIZE": size, "num_warps": warps, "num_stages": 1} for size in sizes]


_ELEMENTWISE = {
    "nvidia": _blocks(1024, 256, 512, 2048, 4096),
    "amd": _blocks(1024, 256, 512, 2048, 4096),
    # The interpreter runs one program at a time in numpy: small blocks
    # keep the tests fast and still give the tuner a real choice.
    "cpu": _blocks(64, 128, 256),
}

CANDIDATES: dict[str, dict[str, list[Config]]] = {
    "matmul": {
        "nvidia": [
            _mm(64, 64, 32, 8, 4, 3),
            _mm(128, 256, 64, 8, 8, 3),
            _mm(64, 256, 32, 8, 4, 4),
            _mm(128, 128, 32, 8, 4, 4),
            _mm(128, 64, 32, 8, 4, 4),
            _mm(64, 128, 32, 8, 4, 4),
            _mm(128, 32, 32, 8, 4, 4),
            _mm(64, 32, 32, 8, 2, 5),
            _mm(32, 64, 32, 8, 2, 5),
            # Deep pipeline for Hopper and A100: 163840 bytes of shared memory
            # in fp16, more than an sm_86 card (A10G, RTX 3090) can give.
            _mm(128, 128, 64, 8, 8, 5),
            _mm(64, 64, 64, 8, 4, 3),
        ],
        "amd": [
            _amd(64, 64, 32, 8, 4, 0, 16, 1),
            _amd(128, 256, 16, 4, 4, 4, 16, 1),
            _amd(256, 256, 16, 4, 8, 2, 16, 1),
            _amd(128, 128, 32, 8, 4, 2, 16, 2),
            _amd(64, 128, 64, 8, 4, 0, 16, 1),
            _amd(128, 64, 64, 4, 4, 2, 32, 1),
        ],
        "cpu": [
            _mm(16, 16, 16, 4, 4, 1),
            _mm(32, 32, 16, 4, 4, 1),
            _mm(32, 16, 32, 4, 4, 1),
        ],
    },
    "add": _ELEMENTWISE,
    "add_": _ELEMENTWISE,
    "lion_step": _ELEMENTWISE,
}

# Largest dynamic shared memory one block may use, in bytes, as Triton
# reports it (the opt-in maximum), by NVIDIA compute capability or AMD gfx
# architecture. Only used where the limit cannot be asked of a driver: under
# the interpreter, to judge a config that will run on that hardware.
SHARED_MEMORY_LIMITS: dict[str, int] = {
    "7.0": 98304,  # V100
    "7.5": 65536,  # T4
    "8.0": 166912,  # A100
    "8.6": 101376,  # A10G, RTX 3090, A40
    "8.7": 166912,  # Jetson Orin
    "8.9": 101376,  # L4, L40S, RTX 4090
    "9.0": 232448,  # H100, H200
    "10.0": 232448,  # B200
    "12.0": 101376,  # RTX 5090
    "gfx90a": 65536,  # MI210, MI250X (LDS)
    "gfx942": 65536,  # MI300X
    "gfx950": 163840,  # MI355X
}


def vendor_of(fingerprint_vendor: str) -> str:
    """Which candidate list a fingerprint's vendor uses."""
    if fingerprint_vendor in ("nvidia", "amd"):
        return fingerprint_vendor
    return "cpu"


def candidates_for(kernel: str, vendor: str) -> list[Config]:
    """The candidate list of one kernel on one vendor (copies)."""
    try:
        lists = CANDIDATES[kernel]
    except KeyError:
        raise KeyError(
            f"no autotuned kernel named {kernel!r}; known: {sorted(CANDIDATES)}"
        ) from None
    return [dict(config) for config in lists[vendor_of(vendor)]]


def is_candidate(kernel: str, vendor: str, config: dict[str, Any]) -> bool:
    """Whether ``config`` is exactly one of the local candidates."""
    if kernel not in CANDIDATES:
        return False
    return any(config == known for known in CANDIDATES[kernel][vendor_of(vendor)])
