"""A tiny job run twice as separate processes by test_repeatability.

It runs case 19's Lion step, the in-place add and a matmul with whatever the
kernel cache holds, and prints one JSON line: the results' bytes and how many
benchmark launches each kernel made.
"""

from __future__ import annotations

import json

import torch

from gpufleet.kernels import elementwise, matmul


def main() -> None:
    param, grad, exp_avg = torch.ones(5), torch.full((5,), 0.001), torch.zeros(5)
    elementwise.lion_step(param, grad, exp_avg, 0.001, 0.9, 0.99, 0.0)
    x = torch.ones(1024)
    elementwise.add_(x, torch.ones(1024))
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(19, 23, generator=generator)
    b = torch.randn(23, 17, generator=generator)
    c = matmul.matmul(a, b)
    kernels = [
        elementwise.lion_kernel,
        elementwise.add_inplace_kernel,
        matmul.matmul_kernel,
    ]
    print(
        json.dumps(
            {
                "param": param.numpy().tobytes().hex(),
                "exp_avg": exp_avg.numpy().tobytes().hex(),
                "x": x.numpy().tobytes().hex(),
                "c": c.numpy().tobytes().hex(),
                "bench_runs": [k.stats.bench_runs for k in kernels],
                "cache_hits": [k.stats.cache_hits for k in kernels],
            }
        )
    )


if __name__ == "__main__":
    main()
