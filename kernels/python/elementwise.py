"""Autotuned elementwise kernels: ``add``, in-place ``add_`` and a Lion step.

The in-place kernels name the tensors they update in ``restore=``, so that
tuning benchmarks run on clones and the caller's tensors change exactly
once per call, tuned or not (an optimizer step applied by every benchmark
launch is the classic autotuning bug). All three tune ``BLOCK_SIZE`` over
``CANDIDATES[name][vendor]``.

Tensors without elements launch nothing and tune nothing. Arguments may
alias (``add_(x, x)``, ``lion_step(p, p, m, ...)``): the kernels read every
element before writing it, and tuning benchmarks run on separate clones of
each tensor that overlaps an updated one, so such a call gives the same
result whether its slot is tuned yet or not.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from gpufleet.kernels.autotune import Config, TunedKernel, tuned


@tuned("add", key=["n_elements"])
@triton.jit
def add_kernel(x, y, out, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    a = tl.load(x + offsets, mask=mask)
    b = tl.load(y + offsets, mask=mask)
    tl.store(out + offsets, a + b, mask=mask)


@tuned("add_", key=["n_elements"], restore=["x"])
@triton.jit
def add_inplace_kernel(x, y, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    a = tl.load(x + offsets, mask=mask)
    b = tl.load(y + offsets, mask=mask)
    tl.store(x + offsets, a + b, mask=mask)


@tuned("lion_step", key=["n_elements"], restore=["param", "exp_avg"])
@triton.jit
def lion_kernel(
    param,
    grad,
    exp_avg,
    n_elements,
    lr,
    decay,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(axis=0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    p = tl.load(param + offsets, mask=mask).to(tl.float32)
    g = tl.load(grad + offsets, mask=mask).to(tl.float32)
    m = tl.load(exp_avg + offsets, mask=mask).to(tl.float32)

    # The order of lion-pytorch's update_fn: decay, signed interpolation,
    # then the moving average with beta2.
    p = p * decay
    u = m * beta1 + g * one_minus_beta1
    sign = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
    p = p - lr * sign
    m = m * beta2 + g * one_minus_beta2

    tl.store(param + offsets, p.to(param.dtype.element_ty), mask=mask)
    tl.store(exp_avg + offsets, m.to(exp_avg.dtype.element_ty), mask=mask)


def _lion_scalars(
    lr: float, beta1: float, beta2: float, weight_decay: float
) -> tuple[float, ...]:
    # 1 - beta and the decay factor are formed in double precision on the
    # host, as torch does for its scalar arguments, so the fp32 update
    # matches lion-pytorch's to the last bit.
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    return (lr, 1.0 - lr * float(weight_decay), beta1, 1.0 - beta1, beta2, 1.0 - beta2)


def _grid(meta: dict[str, Any]) -> tuple[int]:
    return (triton.cdiv(meta["n_elements"], meta["BLOCK_SIZE"]),)


def _check_same(what: str, **tensors: torch.Tensor) -> None:
    first_name, first = next(iter(tensors.items()))
    for name, tensor in tensors.items():
        if tensor.shape != first.shape:
            raise ValueError(
                f"{what}: {name} has shape {tuple(tensor.shape)} but {first_name} "
                f"has {tuple(first.shape)}; broadcasting is not supported"
            )
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise TypeError(
                f"{what}: {name} is {tensor.dtype} on {tensor.device} but "
                f"{first_name} is {first.dtype} on {first.device}"
            )


def _check_inplace(what: str, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(
                f"{what}: {name} must be contiguous to be updated in place; "
                "call .contiguous() and use the result"
            )


def add(
    x: torch.Tensor, y: torch.Tensor, *, kernel: TunedKernel | None = None
) -> torch.Tensor:
    """``x + y`` for tensors of one shape and dtype, as a new tensor."""
    _check_same("add", x=x, y=y)
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    (kernel or add_kernel)[_grid](x, y, out, x.numel())
    return out


def add_(
    x: torch.Tensor, y: torch.Tensor, *, kernel: TunedKernel | None = None
) -> torch.Tensor:
    """``x += y`` in place (``x`` contiguous); returns ``x``.

    ``y`` may share memory with ``x`` (``add_(x, x)`` doubles ``x``); the
    result is the same whether the call tunes its slot or not.
    """
    _check_same("add_", x=x, y=y)
    _check_inplace("add_", x=x)
    if x.numel() == 0:
        return x
    (kernel or add_inplace_kernel)[_grid](x, y.contiguous(), x.numel())
    return x


def lion_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    *,
    kernel: TunedKernel | None = None,
) -> None:
    """One Lion optimizer step, updating ``param`` and ``exp_avg`` in place.

    The same update as lion-pytorch: ``param *= 1 - lr * weight_decay``;
    ``param -= lr * sign(beta1 * exp_avg + (1 - beta1) * grad)``;
    ``exp_avg = beta2 * exp_avg + (1 - beta2) * grad``, computed in fp32.
    Every element is read before it is written, so ``grad`` may be
    ``param`` itself; tuning benchmarks run on clones either way.
    """
    _check_same("lion_step", param=param, grad=grad, exp_avg=exp_avg)
    _check_inplace("lion_step", param=param, exp_avg=exp_avg)
    if param.numel() == 0:
        return
    (kernel or lion_kernel)[_grid](
        param,
        grad.contiguous(),
        exp_avg,
        param.numel(),
        *_lion_scalars(lr, beta1, beta2, weight_decay),
    )


def launch_add(x: torch.Tensor, y: torch.Tensor, config: Config) -> torch.Tensor:
    """``add`` with an explicit config, without tuning or the cache."""
    _check_same("add", x=x, y=y)
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    add_kernel.launch(config, _grid, x, y, out, x.numel())
    return out


def launch_add_(x: torch.Tensor, y: torch.Tensor, config: Config) -> torch.Tensor:
    """``add_`` with an explicit config, without tuning or the cache."""
    _check_same("add_", x=x, y=y)
    _check_inplace("add_", x=x)
    add_inplace_kernel.launch(config, _grid, x, y.contiguous(), x.numel())
    return x


def launch_lion_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    config: Config,
) -> None:
    """``lion_step`` with an explicit config, without tuning or the cache."""
    _check_same("lion_step", param=param, grad=grad, exp_avg=exp_avg)
    _check_inplace("lion_step", param=param, exp_avg=exp_avg)
    lion_kernel.launch(
        config,
        _grid,
        param,
        grad.contiguous(),
        exp_avg,
        param.numel(),
        *_lion_scalars(lr, beta1, beta2, weight_decay),
    )
