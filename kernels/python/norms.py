"""RMS norm and layer norm over the last dimension, for rows of any length.

One program per row; rows longer than ``MAX_BLOCK`` are walked in blocks.
Statistics are computed in fp32 and the result has the input's dtype, like
``torch.nn.functional.rms_norm`` and ``layer_norm``. Not autotuned: the block
is the row length rounded up to a power of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096


@triton.jit
def rms_norm_kernel(
    out_ptr,
    in_ptr,
    weight_ptr,
    n_cols,
    in_row_stride,
    out_row_stride,
    eps,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(axis=0).to(tl.int64)
    in_row = in_ptr + row * in_row_stride
    out_row = out_ptr + row * out_row_stride
    cols = tl.arange(0, BLOCK_N)

    squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        mask = start + cols < n_cols
        x = tl.load(in_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        squares += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / n_cols + eps)

    for start in range(0, n_cols, BLOCK_N):
        mask = start + cols < n_cols
        x = tl.load(in_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        y = x * rstd * w
        tl.store(out_row + start + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_kernel(
    out_ptr,
    in_ptr,
    weight_ptr,
    bias_ptr,
    n_cols,
    in_row_stride,
    out_row_stride,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(axis=0).to(tl.int64)
    in_row = in_ptr + row * in_row_stride
    out_row = out_ptr + row * out_row_stride
    cols = tl.arange(0, BLOCK_N)

    sums = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        mask = start + cols < n_cols
        sums += tl.load(in_row + start + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(sums, axis=0) / n_cols

    # A second pass for the variance: E[(x - mean)^2] loses less precision
    # than E[x^2] - mean^2 when the mean is large.
    squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        mask = start + cols < n_cols
        x = tl.load(in_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, x - mean, 0.0)
        squares += centred * centred
    rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / n_cols + eps)

    for start in range(0, n_cols, BLOCK_N):
        mask = start + cols < n_cols
        x = tl.load(in_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w
        if HAS_BIAS:
            b = tl.load(bias_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            y += b
        tl.store(out_row + start + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(what: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0 or not x.is_floating_point():
        raise TypeError(
            f"{what} takes a floating-point tensor with at least one dimension, "
            f"got {x.dtype} of shape {tuple(x.shape)}"
        )
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(
            f"{what}: weight has shape {tuple(weight.shape)}, expected ({n_cols},) "
            "to match the last dimension of x"
        )
    if weight.device != x.device:
        raise ValueError(f"{what}: x is on {x.device} but weight on {weight.device}")
    rows = x.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch_shape(n_cols: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)
    warps = 8 if block >= 2048 else 4 if block >= 512 else 2 if block >= 128 else 1
    return block, warps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dimension."""
    rows = _rows("rms_norm", x, weight)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.numel():
        block, warps = _launch_shape(rows.shape[1])
        rms_norm_kernel[(rows.shape[0],)](
            out,
            rows,
            weight.contiguous(),
            rows.shape[1],
            rows.stride(0),
            out.stride(0),
            float(eps),
            BLOCK_N=block,
            num_warps=warps,
        )
    return out.reshape(x.shape)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension.

    The variance is the biased one, as in ``torch.nn.functional.layer_norm``;
    ``bias`` may be None.
    """
    rows = _rows("layer_norm", x, weight)
    if bias is not None and bias.shape != weight.shape:
        raise ValueError(
            f"layer_norm: bias has shape {tuple(bias.shape)}, weight has "
            f"{tuple(weight.shape)}"
        )
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.numel():
        block, warps = _launch_shape(rows.shape[1])
        weight = weight.contiguous()
        layer_norm_kernel[(rows.shape[0],)](
            out,
            rows,
            weight,
            bias.contiguous() if bias is not None else weight,
            rows.shape[1],
            rows.stride(0),
            out.stride(0),
            float(eps),
            HAS_BIAS=bias is not None,
            BLOCK_N=block,
            num_warps=warps,
        )
    return out.reshape(x.shape)
