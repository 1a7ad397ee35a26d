"""The kernel registry: specs of the built-in kernels, user modules, tune_kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpufleet.kernels import registry
from gpufleet.kernels.autotune import Launch
from gpufleet.kernels.cache import KernelCache
from gpufleet.kernels.candidates import candidates_for

SHAPES = {"matmul": [20, 12, 24], "add": [100], "add_": [100], "lion_step": [100]}


def one_launch(launch: Launch) -> float:
    launch()
    return float(launch.config.get("BLOCK_SIZE", launch.config.get("BLOCK_M", 1)))


def test_builtin_kernels_are_registered() -> None:
    assert set(SHAPES) <= set(registry.names())


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_spec_runs_its_default_config_within_tolerance_of_the_reference(
    name: str, dtype: str
) -> None:
    spec = registry.get(name)
    tuning_key = spec.tuning_key_for(SHAPES[name], dtype)
    inputs = spec.make_inputs(tuning_key, "cpu")

    got = registry.as_outputs(
        spec.run(registry.clone_inputs(inputs), spec.candidates("cpu")[0])
    )
    expected = registry.as_outputs(spec.reference(registry.clone_inputs(inputs)))

    for out, ref in zip(got, expected, strict=True):
        atol, rtol = spec.tolerance(ref.dtype)
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_make_inputs_is_reproducible(name: str) -> None:
    spec = registry.get(name)
    key = spec.tuning_key_for(SHAPES[name], "float32")

    first, second = spec.make_inputs(key, "cpu"), spec.make_inputs(key, "cpu")

    for field, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[field])


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_tuned_call_uses_the_tuning_key_that_tuning_key_for_names(
    name: str, cache_dir: Path
) -> None:
    spec = registry.get(name)
    key = spec.tuning_key_for(SHAPES[name], "float32")

    spec.call(spec.make_inputs(key, "cpu"), spec.kernel.copy(bench=one_launch))

    [stored] = KernelCache(cache_dir).entries()
    assert stored.entry.tuning_key == key


def test_matmul_shared_memory_estimate_of_the_deep_pipeline_config() -> None:
    spec = registry.get("matmul")
    deep = {
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "BLOCK_K": 64,
        "GROUP_M": 8,
        "num_warps": 8,
        "num_stages": 5,
    }
    assert deep in candidates_for("matmul", "nvidia")

    fp16 = spec.tuning_key_for([256, 256, 256], "float16")
    fp32 = spec.tuning_key_for([256, 256, 256], "float32")

    assert spec.shared_memory_bytes(deep, fp16) == 163840
    assert spec.shared_memory_bytes(deep, fp32) == 327680
    assert registry.get("add").shared_memory_bytes(deep, fp16) is None


def test_unknown_kernel_names_the_known_ones() -> None:
    with pytest.raises(registry.UnknownKernelError, match="kernels: add, add_"):
        registry.get("conv9d")
    with pytest.raises(registry.UnknownKernelError, match="'softmax' is not autotuned"):
        registry.get("softmax")


def test_user_modules_register_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUFLEET_KERNEL_MODULES", " tests.kernels.buggy_kernels ,")

    spec = registry.get("rowsum_buggy")

    assert spec.kernel.name == "rowsum_buggy"
    assert "rowsum_buggy" in registry.names()


def test_broken_user_module_is_reported_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUFLEET_KERNEL_MODULES", "tests.kernels.no_such_module")

    with pytest.raises(ImportError, match=r"tests\.kernels\.no_such_module"):
        registry.get("matmul")


def test_registering_another_spec_under_a_taken_name_is_refused() -> None:
    spec = registry.get("add")
    registry.register(spec)  # the same spec again: fine

    clone = registry.KernelSpec(**{**spec.__dict__})
    with pytest.raises(ValueError, match="already registered"):
        registry.register(clone)


def test_tune_kernel_tunes_once_then_hits_the_cache(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path / "tuned")

    first = registry.tune_kernel(
        "matmul", [20, 12, 24], "float32", cache=cache, bench=one_launch
    )
    second = registry.tune_kernel("matmul", [20, 12, 24], "float32", cache=cache)
    forced = registry.tune_kernel(
        "matmul", [20, 12, 24], "float32", cache=cache, bench=one_launch, force=True
    )

    assert first.tuned
    assert first.entry is not None
    assert first.entry.tuning_key == "M=20,N=12,K=24,dtypes=float32:float32:float32"
    # one_launch calls the smallest BLOCK_M fastest: the first cpu candidate.
    assert first.entry.config == candidates_for("matmul", "cpu")[0]
    assert not second.tuned
    assert second.stats.bench_runs == 0
    assert second.entry == first.entry
    assert forced.tuned
    assert forced.stats.bench_runs == 3


def test_tune_kernel_rejects_a_shape_of_the_wrong_rank(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MxNxK"):
        registry.tune_kernel("matmul", [20, 12], cache=KernelCache(tmp_path))


def test_tune_kernel_refuses_bfloat16_under_the_interpreter(tmp_path: Path) -> None:
    cache = KernelCache(tmp_path / "bf16")

    with pytest.raises(TypeError, match="interpreter cannot compute bfloat16"):
        registry.tune_kernel("add", [64], "bfloat16", cache=cache, bench=one_launch)
    assert cache.entries() == []
