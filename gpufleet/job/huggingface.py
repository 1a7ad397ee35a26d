"""Hugging Face Trainer adapter: a ``TrainerCallback`` that saves on gpufleet's signal.

The Trainer writes ``checkpoint-<N>`` folders (model, optimizer, scheduler,
RNG and data position); gpufleet asks for a save via ``control.should_save``
and seals each folder with a manifest once written. Importing this module
without ``transformers`` raises ``AdapterUnavailableError``.
"""

from __future__ import annotations

import time
from typing import Any

from gpufleet.job.errors import AdapterUnavailableError
from gpufleet.job.trigger import SaveTrigger

try:
    from transformers import (
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
except ImportError:
    raise AdapterUnavailableError("gpufleet.job.huggingface", "transformers") from None


class GpufleetTrainerCallback(TrainerCallback):  # type: ignore[misc]
    """Makes the Trainer save when the agent asks, and seals every save.

    ``folder`` must be the Trainer's ``output_dir``. Pass
    ``resume_from_checkpoint=callback.resume_path()`` to ``trainer.train``.
    """

    def __init__(self, folder: str, **trigger: Any) -> None:
        self.trigger = SaveTrigger(folder, **trigger)
        self._requested = False
        self._started = time.monotonic()

    def resume_path(self) -> str | None:
        """The newest verified ``checkpoint-<N>`` folder, or None."""
        folder = self.trigger.resume_path()
        return str(folder) if folder else None

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> TrainerControl:
        due, requested = self.trigger.due(state.global_step)
        if due:
            control.should_save = True
            self._requested = requested
            self._started = time.monotonic()
        return control

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> TrainerControl:
        if state.is_world_process_zero:
            name = f"checkpoint-{state.global_step}"
            self.trigger.sealed(name, state.global_step, self._requested, self._started)
        self._requested = False
        return control

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> TrainerControl:
        self.trigger.events.emit(
            "job.exiting", step=state.global_step, reason="finished"
        )
        self.trigger.request.uninstall()
        return control
