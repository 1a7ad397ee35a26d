"""Case 19, repeatability: two fresh processes with one cache agree bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpufleet.kernels import elementwise, matmul

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_fresh_processes_run_the_cached_entries_with_identical_results(
    cache_dir: Path,
) -> None:
    # Tune every slot the job uses, so both processes start with entries.
    elementwise.lion_step(
        torch.ones(5), torch.full((5,), 0.001), torch.zeros(5), 0.001, 0.9, 0.99, 0.0
    )
    elementwise.add_(torch.ones(1024), torch.ones(1024))
    matmul.matmul(torch.ones(19, 23), torch.ones(23, 17))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")},
        "TRITON_INTERPRET": "1",
        "GPUFLEET_KERNEL_CACHE": str(cache_dir),
        "PYTHONPATH": str(REPO),
    }
    command = [sys.executable, "-m", "tests.kernels.repeat_job"]

    jobs = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [job.communicate(timeout=120) for job in jobs]

    results = []
    for job, (out, err) in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    first, second = results
    assert first == second
    assert first["bench_runs"] == [0, 0, 0]
    assert first["cache_hits"] == [1, 1, 1]
    param = torch.frombuffer(bytearray.fromhex(first["param"]), dtype=torch.float32)
    exp_avg = torch.frombuffer(bytearray.fromhex(first["exp_avg"]), dtype=torch.float32)
    x = torch.frombuffer(bytearray.fromhex(first["x"]), dtype=torch.float32)
    torch.testing.assert_close(param, torch.full((5,), 0.999), atol=0, rtol=1e-6)
    torch.testing.assert_close(exp_avg, torch.full((5,), 1e-05), atol=0, rtol=1e-6)
    assert torch.equal(x, torch.full((1024,), 2.0))
