"""A real training process killed and resumed gives the uninterrupted losses.

Case 17: the trainer is stopped abruptly (``os._exit``) right after a
checkpoint at an epoch boundary (step 5) or mid-epoch (step 7) and resumed in
a new process; all 15 losses must equal the reference run's bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet.job import read_events

TRAINER = Path(__file__).with_name("trainer.py")
CASE = (
    Path(__file__).resolve().parents[1] / "cases" / "17-rng-restore-epoch-boundary.json"
)


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "GPUFLEET_JOB_ID": "job-17",
        "GPUFLEET_CHECKPOINT_URL": str(tmp_path / "ck"),
        "GPUFLEET_EVENTS_PATH": str(tmp_path / "events.jsonl"),
    }
    return subprocess.run(
        [sys.executable, str(TRAINER), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _losses(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("step=")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    done = _run(tmp_path_factory.mktemp("reference"))
    assert done.returncode == 0, done.stderr
    losses = _losses(done.stdout)
    assert len(losses) == json.loads(CASE.read_text())["setup"]["epochs"] * 5
    return losses


@pytest.mark.parametrize("stop_after", [5, 7], ids=["epoch-boundary", "mid-epoch"])
def test_trainer_resumed_after_kill_gives_bit_identical_losses(
    tmp_path: Path, reference: list[str], stop_after: int
) -> None:
    first = _run(
        tmp_path, "--save-at", str(stop_after), "--kill-after", str(stop_after)
    )
    assert first.returncode == 137, first.stderr
    second = _run(tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"resumed step={stop_after} exact=True" in second.stdout
    assert _losses(first.stdout) + _losses(second.stdout) == reference
    kinds = [
        e["event"]
        for e in read_events(tmp_path / "events.jsonl")
        if e["event"] != "step.progress"
    ]
    assert kinds == [
        "checkpoint.saved",
        "checkpoint.restored",
        "checkpoint.saved",
        "job.exiting",
    ]


def test_trainer_killed_without_checkpoint_resumes_from_last_one(
    tmp_path: Path, reference: list[str]
) -> None:
    first = _run(tmp_path, "--every-steps", "4", "--kill-after", "6")
    assert first.returncode == 137
    second = _run(tmp_path)
    assert "resumed step=4 exact=True" in second.stdout
    assert _losses(first.stdout)[:4] + _losses(second.stdout) == reference


def test_trainer_checkpoint_signal_saves_and_resume_matches(
    tmp_path: Path, reference: list[str]
) -> None:
    """The agent's SIGUSR1 makes the job save at its next step."""
    env = {
        **os.environ,
        "GPUFLEET_CHECKPOINT_URL": str(tmp_path / "ck"),
        "GPUFLEET_EVENTS_PATH": str(tmp_path / "events.jsonl"),
    }
    proc = subprocess.Popen(
        [sys.executable, str(TRAINER), "--step-delay-s", "0.05", "--kill-after", "12"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first: list[str] = []
    for line in proc.stdout:
        first.append(line.rstrip("\n"))
        if line.startswith("step=3 "):
            proc.send_signal(signal.SIGUSR1)
    proc.wait(timeout=30)
    saved = [
        e
        for e in read_events(tmp_path / "events.jsonl")
        if e["event"] == "checkpoint.saved"
    ]
    assert saved
    assert saved[0]["requested"] is True
    step = int(saved[0]["step"])  # type: ignore[arg-type]
    second = _run(tmp_path)
    assert f"resumed step={step} exact=True" in second.stdout
    assert first[:step] + _losses(second.stdout) == reference
