"""The verifier of received entries, in-process and as a command (case 21)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpufleet.kernels import registry, verify
from gpufleet.kernels.autotune import cpu_fingerprint
from gpufleet.kernels.cache import KernelCache
from gpufleet.kernels.candidates import candidates_for
from gpufleet.kernels.entry import KernelEntry
from gpufleet.kernels.fingerprint import HardwareFingerprint
from tests.kernels import fake_bench

REPO = Path(__file__).resolve().parents[2]
A10G = HardwareFingerprint(
    "nvidia", "NVIDIA A10G", "8.6", 22, "535", "12.2", "3.1.0", 80
)
A100 = HardwareFingerprint(
    "nvidia", "NVIDIA A100-SXM4-80GB", "8.0", 80, "535", "12.2", "3.1.0", 108
)
DEEP_PIPELINE = {
    "BLOCK_M": 128,
    "BLOCK_N": 128,
    "BLOCK_K": 64,
    "GROUP_M": 8,
    "num_warps": 8,
    "num_stages": 5,
}


def make_entry(
    kernel: str,
    fingerprint: HardwareFingerprint,
    shape: list[int],
    dtype: str = "float32",
    config: dict[str, int] | None = None,
    **fields: Any,
) -> KernelEntry:
    """An entry as an honest peer with ``fingerprint`` would send it."""
    spec = registry.get(kernel)
    vendor = fingerprint.vendor
    return KernelEntry(
        kernel=kernel,
        source_hash=spec.source_hash,
        candidates_hash=spec.candidates_hash(vendor),
        fingerprint=fingerprint,
        tuning_key=spec.tuning_key_for(shape, dtype),
        config=config if config is not None else spec.candidates(vendor)[1],
        winner_ms=1.0,
        default_ms=1.5,
        tuned_by="peer-host",
        tuned_at_s=1_700_000_000.0,
        tune_seconds=3.0,
        candidates_tried=3,
        **fields,
    )


def cpu_entry(**changes: Any) -> KernelEntry:
    entry = make_entry("add", cpu_fingerprint(), [200])
    return dataclasses.replace(entry, **changes)


def test_entry_from_a_same_hardware_peer_is_accepted_with_timings() -> None:
    verdict = verify.verify_entry(
        cpu_entry(), local_fp=cpu_fingerprint(), do_bench=fake_bench.equal
    )

    assert verdict.accepted, verdict.reason
    assert verdict.reason == ""
    assert verdict.entry_ms == verdict.default_ms == 1.0


def test_case_21_deep_pipeline_refused_on_an_a10g_naming_both_numbers() -> None:
    # Receiver B: the entry's fingerprint was forged to the A10G's.
    entry = make_entry("matmul", A10G, [256, 256, 256], "float16", DEEP_PIPELINE)

    verdict = verify.verify_entry(entry, local_fp=A10G, do_bench=fake_bench.equal)

    assert not verdict.accepted
    assert verdict.reason == (
        "out-of-resources: needs 163840 bytes of shared memory, this GPU allows 101376"
    )


def test_case_21_honest_a100_entry_is_refused_for_its_fingerprint() -> None:
    # Receiver A: the entry says where it was tuned.
    entry = make_entry("matmul", A100, [256, 256, 256], "float16", DEEP_PIPELINE)

    verdict = verify.verify_entry(entry, local_fp=A10G, do_bench=fake_bench.equal)

    assert verdict.cause == "wrong-fingerprint"
    assert A100.key in verdict.reason
    assert A10G.key in verdict.reason


def test_nvidia_entry_that_fits_is_run_and_accepted_under_the_interpreter() -> None:
    fits = candidates_for("matmul", "nvidia")[-1]
    entry = make_entry("matmul", A10G, [40, 24, 72], "float16", fits)

    verdict = verify.verify_entry(entry, local_fp=A10G, do_bench=fake_bench.equal)

    assert verdict.accepted, verdict.reason


def test_config_that_gives_a_wrong_result_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUFLEET_KERNEL_MODULES", "tests.kernels.buggy_kernels")
    from tests.kernels import buggy_kernels

    narrow = make_entry(
        "rowsum_buggy",
        cpu_fingerprint(),
        [buggy_kernels.N_COLS],
        config=buggy_kernels.NARROW,
    )
    wide = dataclasses.replace(narrow, config=buggy_kernels.WIDE)

    refused = verify.verify_entry(
        narrow, local_fp=cpu_fingerprint(), do_bench=fake_bench.equal
    )
    accepted = verify.verify_entry(
        wide, local_fp=cpu_fingerprint(), do_bench=fake_bench.equal
    )

    assert refused.cause == "wrong-result"
    assert "4 of 4 values" in refused.reason
    assert accepted.accepted, accepted.reason


@pytest.mark.parametrize(
    ("changes", "cause"),
    [
        ({"kernel": "conv9d"}, "unknown-kernel"),
        ({"source_hash": "0" * 16}, "source-mismatch"),
        ({"candidates_hash": "0" * 16}, "candidates-mismatch"),
        ({"config": {"BLOCK_SIZE": 3, "num_warps": 4}}, "out-of-bounds"),
        (
            {"config": {"BLOCK_SIZE": 32, "num_warps": 4, "num_stages": 1}},
            "not-a-candidate",
        ),
        ({"fingerprint": A10G}, "wrong-fingerprint"),
        ({"tuning_key": "n_elements=ten,dtypes=float32"}, "bad-schema"),
        ({"tuning_key": "n_elements=64,dtypes=int32:int32:int32"}, "bad-schema"),
        ({"tuning_key": "n_elements=4294967296,dtypes=float32"}, "verify-failed"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_entry_failing_a_check_is_refused_with_its_cause(
    changes: dict[str, Any], cause: str
) -> None:
    entry = cpu_entry(**changes)

    verdict = verify.verify_entry(
        entry, local_fp=cpu_fingerprint(), do_bench=fake_bench.equal
    )

    assert not verdict.accepted
    assert verdict.cause == cause, verdict.reason


def test_slower_than_default_is_refused_beyond_the_slack() -> None:
    verdict = verify.verify_entry(
        cpu_entry(), local_fp=cpu_fingerprint(), do_bench=fake_bench.entry_slow
    )
    lenient = verify.verify_entry(
        cpu_entry(),
        local_fp=cpu_fingerprint(),
        do_bench=fake_bench.entry_slow,
        slack=1.5,
    )

    assert verdict.cause == "slower-than-default"
    assert (verdict.entry_ms, verdict.default_ms) == (2.0, 1.0)
    assert "2 ms, the local default 1 ms (slack 25%)" in verdict.reason
    assert lenient.accepted


def test_entry_with_the_default_config_is_never_slower_than_itself() -> None:
    default = candidates_for("add", "cpu")[0]

    verdict = verify.verify_entry(
        cpu_entry(config=default),
        local_fp=cpu_fingerprint(),
        do_bench=fake_bench.entry_slow,
    )

    assert verdict.accepted, verdict.reason


def test_inplace_kernel_is_checked_on_separate_copies_of_the_inputs() -> None:
    # Reference and kernel each update their own copy: sharing one would
    # apply the step twice and look like a wrong result.
    entry = make_entry("lion_step", cpu_fingerprint(), [64])

    verdict = verify.verify_entry(
        entry, local_fp=cpu_fingerprint(), do_bench=fake_bench.equal
    )

    assert verdict.accepted, verdict.reason


# ---------------------------------------------------------------- command line


def run_main(
    capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, dict[str, Any], str]:
    code = verify.main(list(argv))
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1, out
    return code, json.loads(lines[0]), err


def test_cli_prints_one_json_line_for_an_accepted_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "entry.json"
    path.write_text(cpu_entry().to_json())

    code, verdict, _ = run_main(
        capsys, str(path), "--bench", "tests.kernels.fake_bench:equal"
    )

    assert code == 0
    assert verdict == {
        "accepted": True,
        "reason": "",
        "entry_ms": 1.0,
        "default_ms": 1.0,
    }


def test_cli_reads_a_cache_record_and_the_host_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = KernelCache(tmp_path / "agent-cache")
    cache.write_host({"GPU-a10g": A10G}, A10G.key)
    entry = make_entry("matmul", A10G, [256, 256, 256], "float16", DEEP_PIPELINE)
    path = cache.put_incoming(entry)

    code, verdict, _ = run_main(
        capsys,
        str(path),
        "--cache",
        str(cache.root),
        "--fingerprint-key",
        A10G.key,
        "--bench",
        "tests.kernels.fake_bench:equal",
    )

    assert code == 0
    assert verdict["accepted"] is False
    assert verdict["reason"] == (
        "out-of-resources: needs 163840 bytes of shared memory, this GPU allows 101376"
    )


def test_cli_slack_and_bench_options_reach_the_time_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "entry.json"
    path.write_text(cpu_entry().to_json())
    bench = "tests.kernels.fake_bench:entry_slow"

    _, strict, _ = run_main(capsys, str(path), "--bench", bench)
    _, lenient, _ = run_main(capsys, str(path), "--bench", bench, "--slack", "1.5")

    assert strict["reason"].startswith("slower-than-default: ")
    assert lenient["accepted"] is True


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ("{not json", "is not JSON"),
        ('{"kernel": 5}', "fingerprint"),
        ("[1, 2]", "JSON object"),
        ('{"entry": {"kernel": "add", "config": {"BLOCK_SIZE": "64"}}}', ""),
    ],
    ids=["not-json", "wrong-types", "not-an-object", "wrapped-garbage"],
)
def test_cli_malformed_entry_file_gets_a_bad_schema_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, detail: str
) -> None:
    path = tmp_path / "entry.json"
    path.write_text(content)

    code, verdict, err = run_main(capsys, str(path))

    assert code == 0
    assert verdict["accepted"] is False
    assert verdict["reason"].startswith("bad-schema: ")
    assert detail in verdict["reason"]
    assert "Traceback" not in err


def test_cli_tampered_slot_key_gets_a_bad_schema_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = cpu_entry().to_dict()
    data["slot_key"] = "f" * 24
    path = tmp_path / "entry.json"
    path.write_text(json.dumps(data))

    code, verdict, _ = run_main(capsys, str(path))

    assert code == 0
    assert verdict["reason"].startswith("bad-schema: slot_key")


@pytest.mark.parametrize(
    "argv",
    [
        ["{missing}"],
        ["{entry}", "--bench", "tests.kernels.fake_bench:nothing_here"],
        ["{entry}", "--bench", "no-colon"],
        ["{entry}", "--fingerprint-key", "0123456789abcdef"],
        ["{entry}", "--slack", "-1"],
    ],
    ids=["missing-file", "unknown-bench", "bad-bench", "unknown-key", "bad-slack"],
)
def test_cli_usage_errors_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    entry = tmp_path / "entry.json"
    entry.write_text(cpu_entry().to_json())
    paths = {"missing": tmp_path / "nope.json", "entry": entry}

    code, verdict, err = run_main(capsys, *(a.format(**paths) for a in argv))

    assert code == 2
    assert verdict["accepted"] is False
    assert verdict["reason"].startswith("verify-failed: ")
    assert err.startswith("error: ") or "\nerror: " in err


def test_cli_without_arguments_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        verify.main([])
    assert info.value.code == 2


def _subprocess_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GPUFLEET_") and k != "PYTHONPATH"
    }
    return {
        **env,
        "TRITON_INTERPRET": "1",
        "GPUFLEET_KERNEL_CACHE": str(cache_dir),
        "PYTHONPATH": str(REPO),
        **extra,
    }


@pytest.mark.slow
def test_module_command_finds_a_wrong_result_in_a_user_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUFLEET_KERNEL_MODULES", "tests.kernels.buggy_kernels")
    from tests.kernels import buggy_kernels

    entry = make_entry(
        "rowsum_buggy",
        cpu_fingerprint(),
        [buggy_kernels.N_COLS],
        config=buggy_kernels.NARROW,
    )
    path = tmp_path / "entry.json"
    path.write_text(entry.to_json())

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpufleet.kernels.verify",
            str(path),
            "--bench",
            "tests.kernels.fake_bench:equal",
        ],
        cwd=REPO,
        env=_subprocess_env(
            tmp_path / "cache", GPUFLEET_KERNEL_MODULES="tests.kernels.buggy_kernels"
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    verdict = json.loads(line)
    assert verdict["accepted"] is False
    assert verdict["reason"].startswith("wrong-result: "), verdict


# ---------------------------------------------------------------- size and dtype


def test_inputs_over_the_byte_budget_are_verify_failed_not_blamed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # add n=1000 fp32 builds x, y and the output: 12000 bytes.
    monkeypatch.setenv("GPUFLEET_KERNEL_VERIFY_MAX_BYTES", "8000")
    entry = make_entry("add", cpu_fingerprint(), [1000])

    refused = verify.verify_entry(
        entry, local_fp=cpu_fingerprint(), do_bench=fake_bench.equal
    )
    monkeypatch.setenv("GPUFLEET_KERNEL_VERIFY_MAX_BYTES", "12000")
    fits = verify.verify_entry(
        entry, local_fp=cpu_fingerprint(), do_bench=fake_bench.equal
    )

    assert refused.cause == "verify-failed"
    assert "12000 bytes, more than the 8000 allowed" in refused.reason
    assert fits.accepted, fits.reason


@pytest.mark.timeout(60)
def test_default_byte_budget_refuses_a_huge_matmul_at_once() -> None:
    # Each tensor is under the element cap; together they take 3 GiB.
    entry = make_entry("matmul", cpu_fingerprint(), [16384, 16384, 16384])

    verdict = verify.verify_entry(
        entry, local_fp=cpu_fingerprint(), do_bench=fake_bench.equal
    )

    assert verdict.cause == "verify-failed"
    assert f"more than the {1 << 30} allowed" in verdict.reason


def test_user_kernel_inputs_are_measured_after_they_are_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # buggy_kernels' make_inputs does not check its size: 4 x 48 fp32 = 768 B.
    monkeypatch.setenv("GPUFLEET_KERNEL_MODULES", "tests.kernels.buggy_kernels")
    monkeypatch.setenv("GPUFLEET_KERNEL_VERIFY_MAX_BYTES", "512")
    from tests.kernels import buggy_kernels

    entry = make_entry(
        "rowsum_buggy",
        cpu_fingerprint(),
        [buggy_kernels.N_COLS],
        config=buggy_kernels.WIDE,
    )
    verdict = verify.verify_entry(
        entry, local_fp=cpu_fingerprint(), do_bench=fake_bench.equal
    )

    assert verdict.cause == "verify-failed"
    assert "768 bytes, more than the 512 allowed" in verdict.reason


@pytest.mark.parametrize("raw", ["", "lots", "-5", "0"])
def test_byte_budget_setting_falls_back_to_one_gib(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUFLEET_KERNEL_VERIFY_MAX_BYTES", raw)

    assert verify.max_input_bytes() == 1 << 30


def test_bfloat16_entry_under_the_interpreter_is_verify_failed() -> None:
    entry = make_entry("add", cpu_fingerprint(), [200], "bfloat16")

    verdict = verify.verify_entry(
        entry, local_fp=cpu_fingerprint(), do_bench=fake_bench.equal
    )

    assert verdict.cause == "verify-failed"
    assert "interpreter cannot compute bfloat16" in verdict.reason
