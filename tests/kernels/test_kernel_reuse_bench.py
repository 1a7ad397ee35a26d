"""bench/kernel_reuse.py runs end to end in the interpreter and says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "kernel_reuse.py"


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OUT", None)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@pytest.mark.slow
def test_interpreter_run_reuses_the_shared_entry(tmp_path: Path) -> None:
    """The peer verifies the entry and runs it with no benchmark; the cold one tunes."""
    out = tmp_path / "reuse.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--interpret",
            "--shapes",
            "32x32x32",
            "--out",
            str(out),
        ],
        env=_env(TRITON_INTERPRET=None),
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "INTERPRETER FIGURES" in done.stdout
    assert "not GPU timings" in done.stdout

    report = json.loads(out.read_text())
    assert report["mode"] == "interpreter"
    assert report["problems"] == []
    assert report["fingerprint"]["vendor"] == "cpu"
    assert report["torch"] == torch.__version__
    (shape,) = report["shapes"]
    assert shape["shape"] == [32, 32, 32]
    tune, timing = shape["tune"], shape["timing"]
    assert tune["candidates_tried"] == 3
    assert tune["bench_runs"] > 0
    assert timing["tuned_ms"] > 0
    assert timing["torch_ms"] > 0
    assert timing["max_abs_diff_vs_torch"] < 0.05

    peer, cold = shape["peer"], shape["cold"]
    assert peer["verified"] is True, peer["verdict"]
    assert peer["verify_s"] > 0
    assert peer["bench_runs"] == 0
    assert peer["cache_hits"] == 1
    assert peer["origin"] == "peer"
    assert peer["config"] == tune["config"]
    assert peer["fingerprint_key"] == report["fingerprint"]["key"]
    assert 0 < peer["spawn_to_ready_s"] < peer["spawn_to_first_call_s"]

    assert cold["bench_runs"] > 0
    assert cold["tuned_slots"] == 1
    assert cold["origin"] == "local"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_without_gpu_or_interpreter_exits_2(tmp_path: Path) -> None:
    """No GPU and no --interpret: exit 2 with a message that names --interpret."""
    out = tmp_path / "reuse.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        env=_env(TRITON_INTERPRET=None),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "no GPU is visible" in done.stderr
    assert "--interpret" in done.stderr
    assert not out.exists()
