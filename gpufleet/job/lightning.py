"""PyTorch Lightning adapter: a ``Callback`` that saves on gpufleet's signal.

Lightning writes the checkpoint (it knows its loop state); gpufleet decides
when, seals it with a manifest and picks what to resume from. Importing this
module without Lightning raises ``AdapterUnavailableError``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gpufleet.job.errors import AdapterUnavailableError
from gpufleet.job.storage import checkpoint_name
from gpufleet.job.trigger import SaveTrigger

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
    except ImportError:
        raise AdapterUnavailableError("gpufleet.job.lightning", "lightning") from None

CHECKPOINT_FILE = "lightning.ckpt"


class GpufleetCallback(Callback):  # type: ignore[misc]
    """Saves a Lightning checkpoint when the agent asks, every N steps, and at end.

    Pass ``ckpt_path=callback.resume_path()`` to ``trainer.fit`` to resume.
    """

    def __init__(self, folder: str | None = None, **trigger: Any) -> None:
        super().__init__()
        self.trigger = SaveTrigger(folder, **trigger)

    def resume_path(self) -> str | None:
        """The Lightning checkpoint file to resume from, or None."""
        folder = self.trigger.resume_path()
        return str(folder / CHECKPOINT_FILE) if folder else None

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        due, requested = self.trigger.due(trainer.global_step)
        if due:
            self._save(trainer, requested)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, True)
        self.trigger.events.emit(
            "job.exiting", step=trainer.global_step, reason="finished"
        )
        self.trigger.request.uninstall()

    def _save(self, trainer: Trainer, requested: bool) -> None:
        name = checkpoint_name(trainer.global_step)
        path: Path = self.trigger.folder(name) / CHECKPOINT_FILE
        if (self.trigger.folder(name) / "manifest.json").exists():
            return
        started = time.monotonic()
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            self.trigger.sealed(name, trainer.global_step, requested, started)
