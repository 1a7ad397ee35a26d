"""A training job's use of a shared kernel, run as its own process.

Runs under the Triton interpreter with the environment an agent gives its
jobs (GPUFLEET_KERNEL_CACHE, GPUFLEET_KERNEL_FINGERPRINT). Calls matmul on
fixed inputs and prints one JSON line: how many benchmark launches the call
took, the config the slot holds, and the result's checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch

from gpufleet.kernels import matmul as mm

SHAPE = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))


def main() -> None:
    m, n, k = SHAPE
    generator = torch.Generator().manual_seed(7)
    a = torch.randn(m, k, generator=generator)
    b = torch.randn(k, n, generator=generator)
    out = mm.matmul(a, b)
    kernel = mm.matmul_kernel
    fingerprint = kernel.fingerprint
    slot = kernel.slot_key(kernel.tuning_key(*mm._args(a, b, out)), fingerprint)
    stored = kernel.cache.lookup(fingerprint.key, slot)
    print(
        json.dumps(
            {
                "bench_runs": kernel.stats.bench_runs,
                "cache_hits": kernel.stats.cache_hits,
                "slot_key": slot,
                "fingerprint": fingerprint.key,
                "origin": stored.origin if stored else None,
                "config": stored.entry.config if stored else None,
                "max_error": float((out - a @ b).abs().max()),
                "checksum": hashlib.sha256(out.numpy().tobytes()).hexdigest(),
            }
        )
    )


if __name__ == "__main__":
    main()
