"""Autotuned matrix multiplication, ``C = A @ B``, for any M, N and K.

The kernel is the grouped-ordering GEMM of the Triton tutorials: programs
walk the output in groups of ``GROUP_M`` block-rows so that neighbouring
programs reuse the same tiles of A and B from L2. Masks make any shape work;
accumulation is in fp32 and the result has the inputs' dtype. Its configs
come from ``CANDIDATES["matmul"][vendor]``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from gpufleet.kernels.autotune import Config, TunedKernel, tuned


@tuned("matmul", key=["M", "N", "K"])
@triton.jit
def matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(
            a_ptrs,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left),
            other=0.0,
        )
        b = tl.load(
            b_ptrs,
            mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N),
            other=0.0,
        )
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c = acc.to(c_ptr.dtype.element_ty)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, c, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _grid(meta: dict[str, Any]) -> tuple[int]:
    return (
        triton.cdiv(meta["M"], meta["BLOCK_M"])
        * triton.cdiv(meta["N"], meta["BLOCK_N"]),
    )


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"matmul takes 2-D tensors, got shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}; reshape batched inputs to 2-D first"
        )
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"matmul: inner sizes differ, a is {tuple(a.shape)} and b is "
            f"{tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"matmul: a is {a.dtype} and b is {b.dtype}; convert one so they match"
        )
    if a.device != b.device:
        raise ValueError(f"matmul: a is on {a.device} and b on {b.device}")


def _args(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[Any, ...]:
    (m, k), n = a.shape, b.shape[1]
    return (a, b, c, m, n, k, *a.stride(), *b.stride(), *c.stride())


def matmul(
    a: torch.Tensor, b: torch.Tensor, *, kernel: TunedKernel | None = None
) -> torch.Tensor:
    """``a @ b`` for 2-D tensors of one dtype, with the tuned config.

    Args:
        a: an (M, K) tensor.
        b: a (K, N) tensor of the same dtype and device.
        kernel: the TunedKernel to run (default: the module's
            ``matmul_kernel``), e.g. one with its own cache.

    Returns:
        A new (M, N) tensor of the inputs' dtype.
    """
    _check(a, b)
    if a.numel() == 0 or b.numel() == 0:
        # Nothing to tune: an empty product, or zeros when K is 0.
        return torch.zeros((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    c = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    (kernel or matmul_kernel)[_grid](*_args(a, b, c))
    return c


def launch_matmul(a: torch.Tensor, b: torch.Tensor, config: Config) -> torch.Tensor:
    """``a @ b`` with an explicit config, without tuning or the cache."""
    _check(a, b)
    c = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    matmul_kernel.launch(config, _grid, *_args(a, b, c))
    return c


def shared_memory_bytes(config: Config, dtype: torch.dtype) -> int:
    """Estimated shared memory of one program: the pipelined A and B tiles."""
    elem = torch.empty((), dtype=dtype).element_size()
    tiles = (
        config["BLOCK_M"] * config["BLOCK_K"] + config["BLOCK_K"] * config["BLOCK_N"]
    )
    return tiles * elem * max(1, config.get("num_stages", 1))
