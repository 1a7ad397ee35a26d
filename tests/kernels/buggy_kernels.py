"""A user kernel with a bug that only some configs expose, for verifier tests.

Registered through ``GPUFLEET_KERNEL_MODULES=tests.kernels.buggy_kernels``.
The row sum reads only the first ``BLOCK_N`` columns of each row, so it is
right when the block covers the row and wrong when it does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from gpufleet.kernels.autotune import Config, TunedKernel, make_tuning_key, tuned
from gpufleet.kernels.registry import KernelSpec, random_tensor, register

WIDE = {"BLOCK_N": 64, "num_warps": 1, "num_stages": 1}
NARROW = {"BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
N_COLS = 48


@tuned(
    "rowsum_buggy",
    key=["n_cols"],
    candidates={vendor: [WIDE, NARROW] for vendor in ("nvidia", "amd", "cpu")},
)
@triton.jit
def rowsum_kernel(x_ptr, out_ptr, n_cols, BLOCK_N: tl.constexpr):
    row = tl.program_id(axis=0)
    cols = tl.arange(0, BLOCK_N)
    values = tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0)
    tl.store(out_ptr + row, tl.sum(values, axis=0))


def _run(inputs: dict[str, Any], config: Config) -> torch.Tensor:
    x = inputs["x"]
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    rowsum_kernel.launch(config, (x.shape[0],), x, out, x.shape[1])
    return out


def _call(inputs: dict[str, Any], kernel: TunedKernel) -> torch.Tensor:
    x = inputs["x"]
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    kernel[(x.shape[0],)](x, out, x.shape[1])
    return out


def _make_inputs(tuning_key: str, device: torch.device | str) -> dict[str, Any]:
    n_cols = int(tuning_key.split(",")[0].removeprefix("n_cols="))
    return {"x": random_tensor((4, n_cols), torch.float32, device, seed=7)}


def _tuning_key_for(shape: Sequence[int], dtype: str) -> str:
    return make_tuning_key({"n_cols": shape[0]}, [getattr(torch, dtype)] * 2)


SPEC = register(
    KernelSpec(
        name="rowsum_buggy",
        kernel=rowsum_kernel,
        make_inputs=_make_inputs,
        reference=lambda inputs: inputs["x"].sum(dim=1),
        run=_run,
        call=_call,
        tuning_key_for=_tuning_key_for,
    )
)
