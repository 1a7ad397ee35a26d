"""The Checkpointer in one process: save, restore, fallback, events, RNG cases."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import torch
from torch import nn

from gpufleet.job import Checkpointer, EventLog, read_events
from gpufleet.job.storage import LocalStorage
from gpufleet.job.writer import STATE_FILE, write_state

CASES = Path(__file__).resolve().parents[1] / "cases"


def _objects() -> tuple[nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    return model, optimizer, scheduler


def _train_one(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()


def _checkpointer(tmp_path: Path, **kw: object) -> Checkpointer:
    model, optimizer, scheduler = _objects()
    events = EventLog(str(tmp_path / "events.jsonl"), job_id="job-1")
    return Checkpointer(
        model,
        optimizer,
        scheduler,
        url=str(tmp_path / "ck"),
        events=events,
        install_signal=False,
        **kw,
    )  # type: ignore[arg-type]


def _events(tmp_path: Path, name: str) -> list[dict[str, object]]:
    return [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == name]


def test_checkpointer_save_then_restore_round_trips_state(tmp_path: Path) -> None:
    ckpt = _checkpointer(tmp_path, async_save=True)
    _train_one(ckpt.model, ckpt.optimizer)  # type: ignore[arg-type]
    ckpt.step(1, epoch=0, batch=0)
    ckpt.save(wait=True)
    ckpt.wait()
    expected = {k: v.clone() for k, v in ckpt.model.state_dict().items()}  # type: ignore[union-attr]
    fresh = _checkpointer(tmp_path)
    assert fresh.restore() == 1
    for key, value in fresh.model.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(value, expected[key])
    assert fresh.data_position.epoch == 0
    assert fresh.data_position.batch == 1
    saved = _events(tmp_path, "checkpoint.saved")[0]
    assert saved["job_id"] == "job-1"
    assert saved["bytes"] > 0
    restored = _events(tmp_path, "checkpoint.restored")[0]
    assert restored["exact"] is True
    assert restored["skipped"] == []


def test_checkpointer_without_checkpoints_starts_at_zero(tmp_path: Path) -> None:
    ckpt = _checkpointer(tmp_path)
    assert ckpt.restore() == 0
    assert _events(tmp_path, "checkpoint.restored") == []


def test_checkpointer_every_steps_saves_and_keeps_newest(tmp_path: Path) -> None:
    ckpt = _checkpointer(tmp_path, every_steps=2, keep=2, async_save=False)
    saved = [ckpt.step(step) for step in range(1, 9)]
    assert saved == [False, True] * 4
    assert LocalStorage(tmp_path / "ck").list_checkpoints() == ["step_6", "step_8"]


def test_checkpointer_signal_requests_a_save_at_next_step(tmp_path: Path) -> None:
    model, optimizer, _scheduler = _objects()
    events = EventLog(str(tmp_path / "events.jsonl"))
    ckpt = Checkpointer(
        model,
        optimizer,
        url=str(tmp_path / "ck"),
        events=events,
        signal_name="SIGUSR2",
        async_save=False,
    )
    try:
        ckpt.step(1)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert ckpt.step(2) is True
    finally:
        ckpt.close(save=False)
    saved = _events(tmp_path, "checkpoint.saved")
    assert [(e["step"], e["requested"]) for e in saved] == [(2, True)]


def test_checkpointer_close_saves_and_reports_exit(tmp_path: Path) -> None:
    with _checkpointer(tmp_path) as ckpt:
        ckpt.step(3)
    assert [e["step"] for e in _events(tmp_path, "checkpoint.saved")] == [3]
    assert _events(tmp_path, "job.exiting")[0]["reason"] == "finished"


class GatedStorage(LocalStorage):
    """A folder whose data writes wait until the test opens the gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()

    @contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        assert self.gate.wait(5)
        with super().open_write(rel) as handle:
            yield handle


def test_checkpointer_async_save_returns_before_write_and_coalesces(
    tmp_path: Path,
) -> None:
    ckpt = _checkpointer(tmp_path, every_steps=1)
    gated = GatedStorage(tmp_path / "ck")
    ckpt.storage = gated
    assert ckpt.step(1) is True  # snapshot taken, write waits at the gate
    assert ckpt.step(2) is False  # a periodic save never queues behind it
    gated.gate.set()
    ckpt.wait()
    assert ckpt.step(3) is True  # the deferred save happens at the next step
    ckpt.wait()
    assert [e["step"] for e in _events(tmp_path, "checkpoint.saved")] == [1, 3]


def test_checkpointer_async_snapshot_is_not_changed_by_later_steps(
    tmp_path: Path,
) -> None:
    ckpt = _checkpointer(tmp_path)
    gated = GatedStorage(tmp_path / "ck")
    ckpt.storage = gated
    before = {k: v.clone() for k, v in ckpt.model.state_dict().items()}  # type: ignore[union-attr]
    ckpt.step(1)
    ckpt.save()
    _train_one(ckpt.model, ckpt.optimizer)  # type: ignore[arg-type]
    gated.gate.set()
    ckpt.wait()
    fresh = _checkpointer(tmp_path)
    fresh.restore()
    for key, value in fresh.model.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(value, before[key])


# Case 15: disk full during the save, then a cut file at resume ------------


def _case(number: int) -> dict[str, object]:
    path = next(CASES.glob(f"{number}-*.json"))
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _save_at(tmp_path: Path, step: int) -> Checkpointer:
    ckpt = _checkpointer(tmp_path, async_save=False)
    ckpt.step(step)
    ckpt.save()
    return ckpt


def test_restore_skips_truncated_checkpoint_and_names_the_file(tmp_path: Path) -> None:
    case = _case(15)
    assert "step_1000" in str(case["expect"])
    _save_at(tmp_path, 1000)
    _save_at(tmp_path, 2000)
    bad = tmp_path / "ck" / "step_2000" / STATE_FILE
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 60 // 100])
    fresh = _checkpointer(tmp_path)
    assert fresh.restore() == 1000
    [fallback] = _events(tmp_path, "checkpoint.fallback")
    assert fallback["bad_url"] == str(tmp_path / "ck" / "step_2000")
    assert fallback["used_url"] == str(tmp_path / "ck" / "step_1000")
    assert str(bad) in str(fallback["error"])
    assert "truncated" in str(fallback["error"])
    assert "checksum mismatch" in str(fallback["error"])
    assert _events(tmp_path, "checkpoint.restored")[0]["step"] == 1000


def test_restore_skips_checkpoint_without_manifest(tmp_path: Path) -> None:
    _save_at(tmp_path, 1000)
    _save_at(tmp_path, 2000)
    (tmp_path / "ck" / "step_2000" / "manifest.json").unlink()
    fresh = _checkpointer(tmp_path)
    assert fresh.restore() == 1000
    [fallback] = _events(tmp_path, "checkpoint.fallback")
    assert "incomplete" in str(fallback["error"])


def test_restore_skips_flipped_byte_as_checksum_mismatch(tmp_path: Path) -> None:
    _save_at(tmp_path, 1000)
    _save_at(tmp_path, 2000)
    bad = tmp_path / "ck" / "step_2000" / STATE_FILE
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    fresh = _checkpointer(tmp_path)
    assert fresh.restore() == 1000
    assert "checksum mismatch" in str(_events(tmp_path, "checkpoint.fallback")[0])


def test_restore_from_bad_resume_url_falls_back_to_older(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save_at(tmp_path, 1000)
    _save_at(tmp_path, 2000)
    _save_at(tmp_path, 3000)
    (tmp_path / "ck" / "step_2000" / STATE_FILE).write_bytes(b"")
    monkeypatch.setenv("GPUFLEET_RESUME_FROM", str(tmp_path / "ck" / "step_2000"))
    fresh = _checkpointer(tmp_path)
    assert fresh.restore() == 1000


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_save_on_full_disk_reports_path_and_keeps_previous(tmp_path: Path) -> None:
    """A real ENOSPC from /dev/full: the event names the file, step_1000 stays."""
    ckpt = _save_at(tmp_path, 1000)
    good = tmp_path / "ck" / "step_1000"
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    target = tmp_path / "ck" / "step_2000" / STATE_FILE
    target.parent.mkdir()
    ckpt.storage.remove_tree = lambda rel: None  # type: ignore[method-assign]
    target.symlink_to("/dev/full")
    ckpt.step(2000)
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        ckpt.save()
    [failed] = _events(tmp_path, "checkpoint.failed")
    assert failed["step"] == 2000
    assert str(target) in str(failed["error"])
    assert "No space left on device" in str(failed["error"])
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert not (tmp_path / "ck" / "step_2000" / "manifest.json").exists()
    assert _checkpointer(tmp_path).restore() == 1000


# Cases 16 and 17: random state ------------------------------------------


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _write_with_rng(
    tmp_path: Path, edit: object
) -> list[tuple[float, float, list[float]]]:
    """Saves a checkpoint whose rng entry ``edit`` changes; returns next draws."""
    ckpt = _checkpointer(tmp_path)
    ckpt.step(5)
    state = ckpt.capture_state()
    after = _draws()
    edit(state["rng"])  # type: ignore[operator]
    write_state(ckpt.storage, "step_5", 5, state)
    return [after]


def test_restore_with_cuda_entry_on_cpu_host_warns_once_and_restores_rest(
    tmp_path: Path,
) -> None:
    """Case 16 B: the CUDA entry is skipped with one warning naming it."""
    assert _case(16)["resumed_on_variants"]["B"]["cuda_available"] is False  # type: ignore[index]
    expected = _write_with_rng(
        tmp_path,
        lambda rng: rng.__setitem__("torch_cuda", torch.zeros(16, dtype=torch.uint8)),
    )
    fresh = _checkpointer(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fresh.restore() == 5
    cuda_warnings = [w for w in caught if "rng.torch_cuda" in str(w.message)]
    assert len(cuda_warnings) == 1
    assert [_draws()] == expected
    assert fresh.last_restore is not None
    assert fresh.last_restore.skipped == ["rng.torch_cuda"]
    assert fresh.last_restore.exact is False


def test_restore_moves_cpu_rng_state_to_cpu_whatever_map_location(
    tmp_path: Path,
) -> None:
    """Case 16 A (CPU part): the CPU state reaches set_rng_state as a ByteTensor."""
    expected = _write_with_rng(tmp_path, lambda rng: None)
    model, optimizer, scheduler = _objects()
    fresh = Checkpointer(
        model,
        optimizer,
        scheduler,
        url=str(tmp_path / "ck"),
        install_signal=False,
        map_location=lambda storage, location: storage,
    )
    fresh.restore()
    assert [_draws()] == expected
    assert fresh.last_restore is not None
    assert fresh.last_restore.exact


def test_restore_with_misnamed_rng_key_reports_not_exact(tmp_path: Path) -> None:
    """Case 17: an RNG entry under a key the loader does not read is reported."""
    assert "misnamed_key" in _case(17)["runs"]  # type: ignore[operator]

    def rename(rng: dict[str, object]) -> None:
        rng["cpu"] = rng.pop("torch_cpu")

    _write_with_rng(tmp_path, rename)
    fresh = _checkpointer(tmp_path)
    with pytest.warns(RuntimeWarning, match="not bit-identical"):
        fresh.restore()
    [restored] = _events(tmp_path, "checkpoint.restored")
    assert restored["exact"] is False
    assert set(restored["skipped"]) == {"rng.cpu", "rng.torch_cpu"}  # type: ignore[arg-type]
