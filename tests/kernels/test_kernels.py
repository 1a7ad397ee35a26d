"""The kernels against torch, in the Triton interpreter, with small shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpufleet.kernels import elementwise, matmul, norms, softmax
from gpufleet.kernels.candidates import candidates_for
from gpufleet.kernels.registry import lion_reference_step

DTYPES = [torch.float32, torch.float16]
# (atol, rtol) against a float64 reference rounded to the dtype.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


def _randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", candidates_for("matmul", "cpu"), ids=str)
def test_matmul_matches_torch_for_ragged_shapes_with_every_cpu_config(
    dtype: torch.dtype, config: dict[str, int]
) -> None:
    a = _randn(37, 21, dtype=dtype) / 4
    b = _randn(21, 19, dtype=dtype, seed=1) / 4

    got = matmul.launch_matmul(a, b, config)

    expected = (a.double() @ b.double()).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


def test_matmul_tuned_call_handles_strided_inputs() -> None:
    a = _randn(9, 40, dtype=torch.float32)[:, ::2]  # K = 20, stride 2
    b = _randn(13, 20, dtype=torch.float32, seed=1).t()  # column-major

    got = matmul.matmul(a, b)

    torch.testing.assert_close(got, a @ b, atol=1e-5, rtol=1e-5)


def test_matmul_rejects_mismatched_shapes_and_dtypes() -> None:
    a = torch.ones(4, 3)
    with pytest.raises(ValueError, match="inner sizes differ"):
        matmul.matmul(a, torch.ones(4, 3))
    with pytest.raises(TypeError, match="convert one"):
        matmul.matmul(a, torch.ones(3, 2, dtype=torch.float16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 130), (4, 1), (2, 4100)], ids=str)
def test_softmax_matches_torch(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = _randn(*shape, dtype=dtype) * 4

    got = softmax.softmax(x)

    expected = torch.softmax(x.double(), dim=-1).to(dtype)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=TOLERANCE[dtype][1])


def test_softmax_handles_minus_infinity_and_strided_rows() -> None:
    x = torch.tensor([[float("-inf"), 0.0, 1.0, float("-inf")], [5.0, 5.0, 5.0, 5.0]])

    torch.testing.assert_close(softmax.softmax(x), torch.softmax(x, -1))
    strided = _randn(6, 10, dtype=torch.float32)[:, ::3]
    torch.testing.assert_close(softmax.softmax(strided), torch.softmax(strided, -1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 130), (2, 4100)], ids=str)
def test_rms_norm_matches_torch(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = _randn(*shape, dtype=dtype)
    weight = _randn(shape[-1], dtype=dtype, seed=1)

    got = norms.rms_norm(x, weight, eps=1e-6)

    expected = F.rms_norm(x.double(), (shape[-1],), weight.double(), eps=1e-6)
    torch.testing.assert_close(got, expected.to(dtype), atol=1e-5, rtol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 130), (2, 4100)], ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_torch(
    dtype: torch.dtype, shape: tuple[int, ...], with_bias: bool
) -> None:
    # An offset mean checks that the variance is not taken as E[x^2] - mean^2.
    x = _randn(*shape, dtype=dtype) + 3
    weight = _randn(shape[-1], dtype=dtype, seed=1)
    bias = _randn(shape[-1], dtype=dtype, seed=2) if with_bias else None

    got = norms.layer_norm(x, weight, bias, eps=1e-5)

    expected = F.layer_norm(
        x.double(),
        (shape[-1],),
        weight.double(),
        bias.double() if bias is not None else None,
        eps=1e-5,
    )
    torch.testing.assert_close(got, expected.to(dtype), atol=2e-3, rtol=2e-3)


def test_norms_reject_a_weight_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        norms.rms_norm(torch.ones(2, 4), torch.ones(5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_and_add_inplace_match_torch(dtype: torch.dtype) -> None:
    x = _randn(3, 70, dtype=dtype)
    y = _randn(3, 70, dtype=dtype, seed=1)
    expected = x + y

    assert torch.equal(elementwise.add(x, y), expected)
    same = x
    assert elementwise.add_(x, y) is same
    assert torch.equal(x, expected)


def test_add_rejects_broadcasting() -> None:
    with pytest.raises(ValueError, match="broadcasting is not supported"):
        elementwise.add(torch.ones(4), torch.ones(1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lion_step_matches_the_torch_reference(dtype: torch.dtype) -> None:
    param = _randn(300, dtype=dtype)
    grad = _randn(300, dtype=dtype, seed=1)
    exp_avg = _randn(300, dtype=dtype, seed=2) / 10
    args = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1}
    ref_param, ref_avg = param.clone(), exp_avg.clone()

    elementwise.lion_step(param, grad, exp_avg, **args)
    lion_reference_step(ref_param, grad.clone(), ref_avg, **args)

    # float32 differs only by rounding (torch fuses multiply-adds on the CPU).
    tol = (1e-8, 1e-6) if dtype == torch.float32 else (1e-3, 1e-3)
    torch.testing.assert_close(param, ref_param, atol=tol[0], rtol=tol[1])
    torch.testing.assert_close(exp_avg, ref_avg, atol=tol[0], rtol=tol[1])


def test_lion_step_refuses_a_non_contiguous_parameter() -> None:
    param = torch.ones(4, 4).t()
    with pytest.raises(ValueError, match="must be contiguous"):
        elementwise.lion_step(
            param, torch.ones(4, 4), torch.zeros(4, 4), 1e-3, 0.9, 0.99, 0
        )
