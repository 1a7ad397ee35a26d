"""The Lightning and Hugging Face adapters seal their framework's saves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gpufleet.job import EventLog, read_events


def _events(tmp_path: Path) -> list[dict[str, Any]]:
    return read_events(tmp_path / "events.jsonl")


def test_lightning_callback_saves_sealed_checkpoints_and_resumes(
    tmp_path: Path,
) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gpufleet.job.lightning import GpufleetCallback

    class Tiny(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4
    )

    def trainer(max_steps: int, callback: GpufleetCallback) -> Any:
        return pl.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
        )

    def callback() -> GpufleetCallback:
        return GpufleetCallback(
            str(tmp_path / "ck"),
            every_steps=2,
            install_signal=False,
            events=EventLog(str(tmp_path / "events.jsonl")),
        )

    first = callback()
    trainer(4, first).fit(Tiny(), data)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_2", "step_4"]
    manifest = json.loads((tmp_path / "ck" / "step_4" / "manifest.json").read_text())
    assert "lightning.ckpt" in manifest["files"]
    second = callback()
    resume = second.resume_path()
    assert resume == str(tmp_path / "ck" / "step_4" / "lightning.ckpt")
    resumed = trainer(6, second)
    resumed.fit(Tiny(), data, ckpt_path=resume)
    assert resumed.global_step == 6
    saved = [e["step"] for e in _events(tmp_path) if e["event"] == "checkpoint.saved"]
    assert saved == [2, 4, 6]


def test_huggingface_callback_requests_save_and_seals_it(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gpufleet.job.huggingface import GpufleetTrainerCallback

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
            return {"loss": (self.layer(x).squeeze(-1) - labels).pow(2).mean()}

    rows = [{"x": torch.randn(4), "labels": torch.tensor(0.5)} for _ in range(16)]
    callback = GpufleetTrainerCallback(
        str(tmp_path / "out"),
        install_signal=False,
        events=EventLog(str(tmp_path / "events.jsonl")),
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
    )
    callback.trigger.request.request()  # as the agent's signal would
    transformers.Trainer(
        model=Tiny(), args=args, train_dataset=rows, callbacks=[callback]
    ).train()
    manifest = tmp_path / "out" / "checkpoint-1" / "manifest.json"
    assert manifest.exists()
    files = json.loads(manifest.read_text())["files"]
    assert any(name.startswith("optimizer") for name in files)
    saved = [e for e in _events(tmp_path) if e["event"] == "checkpoint.saved"]
    assert [(e["step"], e["requested"]) for e in saved] == [(1, True)]
    assert callback.resume_path() == str(tmp_path / "out" / "checkpoint-1")
