"""The autotuner: clones for in-place kernels, the cache, failures (case 19)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import triton

from gpufleet.kernels import autotune, device, elementwise, matmul
from gpufleet.kernels.autotune import (
    KernelTuningError,
    Launch,
    TunedKernel,
    cpu_fingerprint,
    local_fingerprint,
    make_tuning_key,
    parse_tuning_key,
)
from gpufleet.kernels.cache import KernelCache
from gpufleet.kernels.candidates import candidates_for
from gpufleet.kernels.fingerprint import HardwareFingerprint
from gpufleet.kernels.registry import lion_reference_step

CASE_19 = Path("/work/shared/cases/19-autotune-inplace-kernel-mutates.json")
LION = {"lr": 0.001, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0}


def lion_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Case 19's inputs: five ones, gradients 0.001, a zero moving average."""
    return torch.ones(5), torch.full((5,), 0.001), torch.zeros(5)


def assert_one_lion_step(param: torch.Tensor, exp_avg: torch.Tensor) -> None:
    """Case 19's expected values after exactly one step (fp32 rounding only)."""
    torch.testing.assert_close(param, torch.full((5,), 0.999), atol=0, rtol=1e-6)
    torch.testing.assert_close(exp_avg, torch.full((5,), 1e-05), atol=0, rtol=1e-6)


def counting_bench(calls: list[dict[str, int]]) -> autotune.BenchFn:
    """A deterministic benchmark: one launch, bigger blocks are 'faster'."""

    def bench(launch: Launch) -> float:
        calls.append(launch.config)
        launch()
        return 1000.0 / sum(v for k, v in launch.config.items() if k.startswith("B"))

    return bench


def test_case_19_numbers_match_this_test() -> None:
    if not CASE_19.exists():
        pytest.skip(f"{CASE_19} is not on this machine")
    case = json.loads(CASE_19.read_text())
    inputs, expected = case["inputs"], case["expected_after_one_call"]
    assert inputs["param"] == [1.0] * 5
    assert inputs["grad"] == [0.001] * 5
    assert (inputs["lr"], inputs["beta1"], inputs["beta2"]) == (0.001, 0.9, 0.99)
    assert expected["param"] == [0.999] * 5
    assert expected["exp_avg"] == [1e-05] * 5


def test_lion_step_tunes_on_clones_and_updates_the_caller_once() -> None:
    param, grad, exp_avg = lion_inputs()

    elementwise.lion_step(param, grad, exp_avg, **LION)

    stats = elementwise.lion_kernel.stats
    assert stats.tuned_slots == 1
    # Three cpu candidates, timed with several launches each, all on clones.
    assert stats.bench_runs >= 3 * autotune.INTERPRETER_BENCH_RUNS
    assert_one_lion_step(param, exp_avg)
    assert torch.equal(grad, torch.full((5,), 0.001))
    ref_param, _, ref_avg = lion_inputs()
    lion_reference_step(ref_param, torch.full((5,), 0.001), ref_avg, **LION)
    assert torch.equal(param, ref_param)


def test_add_inplace_tunes_during_the_first_call_and_adds_once() -> None:
    x, y = torch.ones(1024), torch.ones(1024)

    elementwise.add_(x, y)

    assert elementwise.add_inplace_kernel.stats.tuned_slots == 1
    assert elementwise.add_inplace_kernel.stats.bench_runs > 0
    assert torch.equal(x, torch.full((1024,), 2.0))
    assert torch.equal(y, torch.ones(1024))


def test_second_instance_runs_the_stored_entry_without_benchmarks(
    cache_dir: Path,
) -> None:
    param, grad, exp_avg = lion_inputs()
    elementwise.lion_step(param, grad, exp_avg, **LION)
    tuned = elementwise.lion_kernel.stats

    fresh = elementwise.lion_kernel.copy(cache=KernelCache(cache_dir))
    param, grad, exp_avg = lion_inputs()
    elementwise.lion_step(param, grad, exp_avg, **LION, kernel=fresh)

    assert tuned.bench_runs > 0
    assert fresh.stats.bench_runs == 0
    assert fresh.stats.tuned_slots == 0
    assert fresh.stats.cache_hits == 1
    assert_one_lion_step(param, exp_avg)


def test_second_call_in_a_process_is_served_from_memory() -> None:
    x, y = torch.ones(64), torch.ones(64)
    elementwise.add(x, y)
    runs = elementwise.add_kernel.stats.bench_runs

    elementwise.add(x, y)

    assert elementwise.add_kernel.stats.bench_runs == runs
    assert elementwise.add_kernel.stats.memory_hits == 1


def test_stored_entry_describes_the_slot(cache_dir: Path) -> None:
    calls: list[dict[str, int]] = []
    autotune.set_bench(counting_bench(calls))

    elementwise.add(torch.ones(100), torch.ones(100))

    [stored] = KernelCache(cache_dir).entries()
    entry = stored.entry
    assert stored.origin == "local"
    assert entry.kernel == "add"
    assert entry.tuning_key == "n_elements=100,dtypes=float32:float32:float32"
    assert entry.fingerprint == cpu_fingerprint()
    assert entry.config == {"BLOCK_SIZE": 256, "num_warps": 4, "num_stages": 1}
    assert entry.candidates_tried == len(calls) == 3
    assert entry.default_ms == pytest.approx(1000.0 / 64)
    assert entry.winner_ms == pytest.approx(1000.0 / 256)
    assert entry.source_hash == elementwise.add_kernel.source_hash


def test_per_call_bench_overrides_the_global_one() -> None:
    global_calls: list[dict[str, int]] = []
    call_calls: list[dict[str, int]] = []
    autotune.set_bench(counting_bench(global_calls))
    x, y, out = torch.ones(10), torch.ones(10), torch.empty(10)
    kernel = elementwise.add_kernel.copy()

    kernel[lambda meta: (triton.cdiv(10, meta["BLOCK_SIZE"]),)](
        x, y, out, 10, bench=counting_bench(call_calls)
    )

    assert len(call_calls) == 3
    assert not global_calls
    assert kernel.stats.bench_runs == 3
    assert torch.equal(out, torch.full((10,), 2.0))


def test_failing_candidate_is_skipped_with_a_reason(cache_dir: Path) -> None:
    good = {"BLOCK_SIZE": 64, "num_warps": 4, "num_stages": 1}
    # Not a power of two: tl.arange refuses it, as a compiler would.
    bad = {"BLOCK_SIZE": 48, "num_warps": 4, "num_stages": 1}
    kernel = elementwise.add_inplace_kernel.copy(candidates=[bad, good])
    x, y = torch.ones(100), torch.ones(100)

    elementwise.add_(x, y, kernel=kernel)

    assert torch.equal(x, torch.full((100,), 2.0))
    [skipped] = kernel.stats.skipped
    assert skipped.config == bad
    assert "power of 2" in skipped.reason
    [stored] = KernelCache(cache_dir).entries()
    assert stored.entry.config == good
    assert stored.entry.default_ms == 0.0  # the default failed, so no time


def test_every_candidate_failing_raises_with_the_reasons() -> None:
    bad = [{"BLOCK_SIZE": 48, "num_warps": 4}, {"BLOCK_SIZE": 96, "num_warps": 4}]
    kernel = elementwise.add_inplace_kernel.copy(candidates=bad)
    x = torch.ones(10)

    with pytest.raises(KernelTuningError, match="every one of its 2") as info:
        elementwise.add_(x, torch.ones(10), kernel=kernel)

    assert len(info.value.skipped) == 2
    assert torch.equal(x, torch.ones(10))


def test_corrupt_cache_file_makes_the_kernel_tune_again(cache_dir: Path) -> None:
    elementwise.add_(torch.ones(32), torch.ones(32))
    [stored] = KernelCache(cache_dir).entries()
    stored.path.write_text('{"entry": {"kernel": "add_", "config": ')

    fresh = elementwise.add_inplace_kernel.copy(cache=KernelCache(cache_dir))
    x = torch.ones(32)
    elementwise.add_(x, torch.ones(32), kernel=fresh)

    assert torch.equal(x, torch.full((32,), 2.0))
    assert fresh.stats.tuned_slots == 1
    assert fresh.stats.bench_runs > 0
    assert KernelCache(cache_dir).lookup(stored.entry.fingerprint.key, stored.path.stem)


def test_cached_config_that_is_no_longer_a_candidate_is_ignored(
    cache_dir: Path,
) -> None:
    elementwise.add_(torch.ones(32), torch.ones(32))
    [stored] = KernelCache(cache_dir).entries()
    data = json.loads(stored.path.read_text())
    data["entry"]["config"] = {"BLOCK_SIZE": 32, "num_warps": 4, "num_stages": 1}
    stored.path.write_text(json.dumps(data))

    fresh = elementwise.add_inplace_kernel.copy(cache=KernelCache(cache_dir))
    x = torch.ones(32)
    elementwise.add_(x, torch.ones(32), kernel=fresh)

    assert fresh.stats.cache_hits == 0
    assert fresh.stats.tuned_slots == 1
    assert torch.equal(x, torch.full((32,), 2.0))


def test_unwritable_cache_still_runs_the_kernel(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    kernel = elementwise.add_inplace_kernel.copy(cache=KernelCache(blocker))
    x = torch.ones(16)

    elementwise.add_(x, torch.ones(16), kernel=kernel)

    assert torch.equal(x, torch.full((16,), 2.0))
    assert kernel.stats.tuned_slots == 1


def test_tuner_waiting_on_the_slot_lock_uses_the_winner_stored_meanwhile(
    cache_dir: Path,
) -> None:
    # Another process tunes the slot first: its winner lands while we wait.
    class WatchedCache(KernelCache):
        looked_up = threading.Event()

        def lookup(self, fingerprint_key: str, slot: str) -> Any:
            found = super().lookup(fingerprint_key, slot)
            self.looked_up.set()
            return found

    other = elementwise.add_inplace_kernel.copy(
        cache=KernelCache(cache_dir / "elsewhere")
    )
    elementwise.add_(torch.ones(8), torch.ones(8), kernel=other)
    [winner] = KernelCache(cache_dir / "elsewhere").entries()
    waiting = elementwise.add_inplace_kernel.copy(cache=WatchedCache(cache_dir))
    x = torch.ones(8)
    caller = threading.Thread(
        target=elementwise.add_, args=(x, torch.ones(8)), kwargs={"kernel": waiting}
    )

    with KernelCache(cache_dir).slot_lock(winner.entry.slot_key):
        caller.start()
        assert WatchedCache.looked_up.wait(timeout=30)
        KernelCache(cache_dir).store(winner.entry, "local")
    caller.join(timeout=30)

    assert waiting.stats.bench_runs == 0
    assert waiting.stats.cache_hits == 1
    assert torch.equal(x, torch.full((8,), 2.0))


def test_slot_lock_held_too_long_means_tuning_anyway(cache_dir: Path) -> None:
    kernel = elementwise.add_inplace_kernel.copy(lock_timeout_s=0.2)
    x = torch.ones(8)
    slot = kernel.slot_key(kernel.tuning_key(x, x, 8), kernel.fingerprint)

    with KernelCache(cache_dir).slot_lock(slot):
        elementwise.add_(x, torch.ones(8), kernel=kernel)

    assert kernel.stats.tuned_slots == 1
    assert torch.equal(x, torch.full((8,), 2.0))


Aliased = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _same_tensor() -> Aliased:
    """add_(x, x): x doubles."""
    x = torch.arange(8.0)
    return x, x, x, torch.arange(8.0) * 2


def _disjoint_views() -> Aliased:
    """Two halves of one buffer: only the first half changes."""
    buf = torch.arange(800.0)
    expected = buf.clone()
    expected[:400] += buf[400:]
    return buf[:400], buf[400:], buf, expected


def _empty() -> Aliased:
    x = torch.empty(0)
    return x, torch.empty(0), x, torch.empty(0)


@pytest.mark.parametrize("make", [_same_tensor, _disjoint_views, _empty])
def test_inplace_add_of_aliased_arguments_is_the_same_cold_and_warm(
    make: Any,
) -> None:
    kernel = elementwise.add_inplace_kernel.copy()
    for _ in ("cold", "warm"):
        x, y, changed, expected = make()

        elementwise.add_(x, y, kernel=kernel)

        assert torch.equal(changed, expected)
    if x.numel():
        assert kernel.stats.tuned_slots == 1
        assert kernel.stats.memory_hits == 1


def test_empty_tensors_do_not_share_memory_with_a_restored_argument() -> None:
    kernel = elementwise.add_inplace_kernel.copy()
    x, y = torch.empty(0), torch.empty(0)

    kernel[lambda meta: (1,)](x, y, 0)

    assert kernel.stats.tuned_slots == 1


def test_lion_step_with_the_gradient_aliasing_the_parameter_steps_once() -> None:
    kernel = elementwise.lion_kernel.copy()
    for _ in ("cold", "warm"):
        param, exp_avg = torch.linspace(-1, 1, 8), torch.full((8,), 0.01)
        ref_param, ref_avg = param.clone(), exp_avg.clone()
        lion_reference_step(ref_param, param.clone(), ref_avg, **LION)

        elementwise.lion_step(param, param, exp_avg, **LION, kernel=kernel)

        assert torch.equal(param, ref_param)
        assert torch.equal(exp_avg, ref_avg)
    assert kernel.stats.tuned_slots == 1


def test_benchmarks_never_write_a_tensor_overlapping_a_restored_one() -> None:
    # y is a view inside x: a benchmark on a clone of x alone would still
    # read y's live memory, and a write through x would change it.
    seen: list[int] = []
    buf = torch.arange(16.0)
    x, y = buf[:8], buf[4:12]

    def bench(launch: Launch) -> float:
        launch()
        seen.append(int(torch.equal(buf, torch.arange(16.0))))
        return 1.0

    kernel = elementwise.add_inplace_kernel.copy(bench=bench)
    expected = x.clone() + y.clone()

    elementwise.add_(x, y, kernel=kernel)

    assert seen == [1, 1, 1], "the caller's buffer changed during benchmarks"
    assert torch.equal(buf[:8], expected)


def test_tuning_key_is_canonical_and_parses_back() -> None:
    a, b = torch.ones(3, 5, dtype=torch.float16), torch.ones(5, 4, dtype=torch.float16)
    c = torch.empty(3, 4, dtype=torch.float16)
    key = matmul.matmul_kernel.tuning_key(a, b, c, 3, 4, 5, 5, 1, 4, 1, 4, 1)

    assert key == "M=3,N=4,K=5,dtypes=float16:float16:float16"
    assert key == make_tuning_key({"M": 3, "N": 4, "K": 5}, [torch.float16] * 3)
    assert parse_tuning_key(key) == (
        {"M": "3", "N": "4", "K": "5"},
        ["float16", "float16", "float16"],
    )
    with pytest.raises(ValueError, match="no dtypes"):
        parse_tuning_key("M=3")


def test_kernel_refuses_key_names_that_are_not_arguments() -> None:
    with pytest.raises(ValueError, match="not arguments of the kernel"):
        TunedKernel(elementwise.add_kernel.fn, name="add", key=["n"])


def test_local_fingerprint_follows_the_agent_host_file_on_a_gpu(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a10g = HardwareFingerprint("nvidia", "NVIDIA A10G", "8.6", 22, "535", "12.2")
    KernelCache(cache_dir).write_host({"GPU-1": a10g}, a10g.key)
    # A job on a real GPU: Triton compiles, torch sees device 0.
    monkeypatch.setattr(device, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    monkeypatch.setenv("GPUFLEET_KERNEL_FINGERPRINT", a10g.key)
    assert local_fingerprint() == a10g


def test_interpreter_ignores_a_real_gpu_fingerprint_named_by_the_agent(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What the interpreter measures must never be filed as the GPU's."""
    a10g = HardwareFingerprint("nvidia", "NVIDIA A10G", "8.6", 22, "535", "12.2")
    KernelCache(cache_dir).write_host({"GPU-1": a10g}, a10g.key)

    assert local_fingerprint() == cpu_fingerprint()
    monkeypatch.setenv("GPUFLEET_KERNEL_FINGERPRINT", a10g.key)
    with caplog.at_level("WARNING", logger="gpufleet.kernels.device"):
        assert local_fingerprint() == cpu_fingerprint()
    assert "kernels.fingerprint_not_interpreted" in caplog.text
    assert a10g.key in caplog.text
    monkeypatch.setenv("GPUFLEET_KERNEL_FINGERPRINT", "0123456789abcdef")
    assert local_fingerprint() == cpu_fingerprint()

    elementwise.add(torch.ones(16), torch.ones(16))
    monkeypatch.setenv("GPUFLEET_KERNEL_FINGERPRINT", a10g.key)
    elementwise.add(torch.ones(32), torch.ones(32))
    assert KernelCache(cache_dir).entries(a10g.key) == []
    assert len(KernelCache(cache_dir).entries(cpu_fingerprint().key)) == 2


def test_interpreter_keeps_a_replayed_gpu_named_by_the_agent(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replay = HardwareFingerprint("replay", "NVIDIA A10G (replay)", "", 24, "")
    a10g = HardwareFingerprint("nvidia", "NVIDIA A10G", "8.6", 22, "535", "12.2")
    KernelCache(cache_dir).write_host({"GPU-r": replay, "GPU-1": a10g}, replay.key)

    monkeypatch.setenv("GPUFLEET_KERNEL_FINGERPRINT", replay.key)
    assert local_fingerprint() == replay


@pytest.mark.parametrize(
    "fingerprint",
    [
        HardwareFingerprint("nvidia", "NVIDIA H100 80GB HBM3", "9.0", 80, "550"),
        HardwareFingerprint("amd", "AMD Instinct MI300X", "gfx942", 192, "6"),
    ],
    ids=["nvidia", "amd"],
)
def test_matmul_tunes_over_the_candidate_list_of_its_vendor(
    fingerprint: HardwareFingerprint, cache_dir: Path
) -> None:
    calls: list[dict[str, int]] = []
    kernel = matmul.matmul_kernel.copy(
        fingerprint=fingerprint, bench=counting_bench(calls)
    )
    a, b = torch.randn(9, 20), torch.randn(20, 7)

    c = matmul.matmul(a, b, kernel=kernel)

    assert calls == candidates_for("matmul", fingerprint.vendor)
    torch.testing.assert_close(c, a @ b, atol=1e-5, rtol=1e-5)
    [stored] = KernelCache(cache_dir).entries(fingerprint.key)
    assert stored.entry.fingerprint == fingerprint
    assert stored.entry.config in calls


def test_interpreter_on_a_replay_host_uses_the_agents_fingerprint(
    tmp_path: Path,
) -> None:
    """A rehearsal fleet shares under the replayed GPU; a real GPU host never
    takes interpreter timings for its GPU's."""
    from gpufleet.kernels.autotune import cpu_fingerprint, local_fingerprint
    from gpufleet.kernels.cache import KernelCache
    from gpufleet.kernels.fingerprint import HardwareFingerprint

    replay = HardwareFingerprint("replay", "NVIDIA A10G (replay)", "", 24, "")
    cache = KernelCache(tmp_path / "replay")
    cache.write_host({"GPU-r": replay}, replay.key)
    assert local_fingerprint(cache) == replay

    real = HardwareFingerprint("nvidia", "NVIDIA A10G", "8.6", 24, "550")
    cache = KernelCache(tmp_path / "real")
    cache.write_host({"GPU-n": real}, real.key)
    assert local_fingerprint(cache) == cpu_fingerprint()


def test_bfloat16_is_refused_under_the_interpreter_at_call_time(
    cache_dir: Path,
) -> None:
    x = torch.ones(64, dtype=torch.bfloat16)
    a = torch.ones(8, 8, dtype=torch.bfloat16)

    with pytest.raises(TypeError, match="interpreter cannot compute bfloat16"):
        elementwise.add(x, x)
    with pytest.raises(TypeError, match="use float16/float32 or run on a GPU"):
        elementwise.add_(x, x)
    with pytest.raises(TypeError, match="interpreter cannot compute bfloat16"):
        matmul.matmul(a, a)
    with pytest.raises(TypeError, match="interpreter cannot compute bfloat16"):
        elementwise.launch_add(x, x, candidates_for("add", "cpu")[0])

    assert torch.equal(x, torch.ones(64, dtype=torch.bfloat16))
    assert elementwise.add_kernel.stats.bench_runs == 0
    assert KernelCache(cache_dir).entries() == []


def test_every_candidate_failing_for_lack_of_a_driver_names_the_fix() -> None:
    def no_driver(launch: Launch) -> float:
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    kernel = elementwise.add_kernel.copy(bench=no_driver)

    with pytest.raises(KernelTuningError) as info:
        elementwise.add(torch.ones(4), torch.ones(4), kernel=kernel)

    message = str(info.value)
    assert "no GPU driver is active; on a CPU set TRITON_INTERPRET=1" in message
    assert "Check the arguments' shapes" not in message


NO_INTERPRETER_JOB = """
import json, sys, torch
from gpufleet.kernels import elementwise
errors = {}
for n in (16, 32):
    try:
        elementwise.add(torch.ones(n), torch.ones(n))
    except Exception as exc:
        errors[n] = f"{type(exc).__name__}: {exc}"
print(json.dumps(errors))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_without_gpu_or_interpreter_the_error_says_to_set_triton_interpret(
    cache_dir: Path,
) -> None:
    # n=16 is in the cache (a launch without tuning), n=32 is not (a tune).
    elementwise.add(torch.ones(16), torch.ones(16))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    done = subprocess.run(
        [sys.executable, "-c", NO_INTERPRETER_JOB],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    errors = json.loads(done.stdout.splitlines()[-1])
    assert set(errors) == {"16", "32"}
    for error in errors.values():
        assert "no GPU driver is active; on a CPU set TRITON_INTERPRET=1" in error
        assert "Check the arguments' shapes" not in error
