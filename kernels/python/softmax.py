"""Row softmax over the last dimension, for rows of any length.

One program per row. Rows up to ``MAX_BLOCK`` columns are read once into
registers; longer rows are walked in blocks with an online maximum and sum
(one pass to reduce, one to write). Computation is in fp32; the result has
the input's dtype. Not autotuned: the block is the row length rounded up to
a power of two, and the warps follow from it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096


@triton.jit
def softmax_kernel(
    out_ptr,
    in_ptr,
    n_cols,
    in_row_stride,
    out_row_stride,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(axis=0).to(tl.int64)
    in_row = in_ptr + row * in_row_stride
    out_row = out_ptr + row * out_row_stride
    cols = tl.arange(0, BLOCK_N)

    row_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        mask = start + cols < n_cols
        x = tl.load(in_row + start + cols, mask=mask, other=float("-inf"))
        x = x.to(tl.float32)
        new_max = tl.maximum(row_max, x)
        # Lanes that have seen only -inf subtract 0 instead of -inf, so their
        # sum stays 0 instead of becoming NaN (-inf - -inf).
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - safe_max) + tl.exp(x - safe_max)
        row_max = new_max

    # Some element of the row is finite unless the whole row is -inf, which
    # gives NaN as in torch.
    final_max = tl.max(row_max, axis=0)
    lane_scale = tl.exp(row_max - final_max)
    total = tl.sum(row_sum * lane_scale, axis=0)

    for start in range(0, n_cols, BLOCK_N):
        mask = start + cols < n_cols
        x = tl.load(in_row + start + cols, mask=mask, other=float("-inf"))
        y = tl.exp(x.to(tl.float32) - final_max) / total
        tl.store(out_row + start + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_shape(n_cols: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)
    warps = 8 if block >= 2048 else 4 if block >= 512 else 2 if block >= 128 else 1
    return block, warps


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of ``x`` (any leading shape)."""
    if x.dim() == 0:
        raise ValueError("softmax needs at least one dimension, got a scalar")
    if not x.is_floating_point():
        raise TypeError(f"softmax takes a floating-point tensor, got {x.dtype}")
    n_cols = x.shape[-1]
    rows = x.reshape(-1, n_cols) if n_cols else x.reshape(0, 0)
    if rows.numel() == 0:
        return torch.empty_like(x)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], n_cols), dtype=x.dtype, device=x.device)
    block, warps = _launch_shape(n_cols)
    softmax_kernel[(rows.shape[0],)](
        out, rows, n_cols, rows.stride(0), out.stride(0), BLOCK_N=block, num_warps=warps
    )
    return out.reshape(x.shape)
