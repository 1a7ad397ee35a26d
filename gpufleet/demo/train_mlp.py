"""A small deterministic PyTorch training job: the migration demo's workload.

Owns the demo's (and the tests') training script: an MLP trained on seeded
random data with the job SDK's ``Checkpointer``, as a user would write it.
It prints ``step=N loss=HEX`` per step, with the loss as ``float.hex()`` so
that runs compare bit for bit. Checkpoint location and resume point come from
the GPUFLEET_* environment the agent sets.

The defaults are case 17's setup: 20 samples, batch 4 (5 steps per epoch),
15 steps, an MLP with dropout p=0.1, AdamW, seed 1234. ``--samples``,
``--width`` and ``--depth`` make longer runs and larger states (the
preemption benchmark trains a ~1 GiB model with ``--optimizer sgd``).

    python -m gpufleet.demo.train_mlp [--steps 15] [--step-delay-s 0.05]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

SEED = 1234
INPUTS = 8


@dataclass(frozen=True)
class Shape:
    """The data and model sizes of one run."""

    samples: int = 20
    batch: int = 4
    width: int = 16
    depth: int = 1
    optimizer: str = "adamw"

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.samples // self.batch)

    def state_bytes(self) -> int:
        """Bytes of float32 parameters (plus AdamW's two moments)."""
        params = INPUTS * self.width + self.width
        params += (self.depth - 1) * (self.width * self.width + self.width)
        params += self.width + 1
        moments = 2 if self.optimizer == "adamw" else 0
        return 4 * params * (1 + moments)


def build(shape: Shape) -> tuple[Any, Any, Any, Any]:
    """Model, optimizer, LR scheduler and loader, all seeded."""
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    data = torch.randn(shape.samples, INPUTS)
    target = (data.sum(dim=1, keepdim=True) > 0).float()
    layers: list[nn.Module] = [
        nn.Linear(INPUTS, shape.width),
        nn.ReLU(),
        nn.Dropout(p=0.1),
    ]
    for _ in range(shape.depth - 1):
        layers += [nn.Linear(shape.width, shape.width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(shape.width, 1))
    if shape.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.9)
    # No generator of its own: the shuffle draws from the global torch RNG,
    # the hard case of transformers#17032.
    loader = DataLoader(
        TensorDataset(data, target), batch_size=shape.batch, shuffle=True
    )
    return model, optimizer, scheduler, loader


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m gpufleet.demo.train_mlp",
        description="A deterministic CPU training job that uses gpufleet.job.",
    )
    p.add_argument("--steps", type=int, default=None, help="default: 3 epochs")
    p.add_argument("--samples", type=int, default=Shape.samples)
    p.add_argument("--batch", type=int, default=Shape.batch)
    p.add_argument("--width", type=int, default=Shape.width)
    p.add_argument("--depth", type=int, default=Shape.depth)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument(
        "--kill-after",
        type=int,
        default=None,
        help="os._exit(137) right after this step, unsaved",
    )
    p.add_argument(
        "--save-at",
        type=int,
        default=None,
        help="ask for a checkpoint at this step (as the signal does)",
    )
    p.add_argument("--every-steps", type=int, default=None)
    p.add_argument(
        "--step-delay-s",
        type=float,
        default=0.0,
        help="sleep per step, to leave time for a signal (losses do not change)",
    )
    p.add_argument("--sync", action="store_true", help="synchronous saves")
    p.add_argument(
        "--progress",
        action="store_true",
        help="write a step.progress event every step, so the broker knows the step",
    )
    p.add_argument(
        "--ignore-signal",
        action="store_true",
        help="ignore the checkpoint signal (a job that never saves on request)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; fixed so that hosts with other core counts agree",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Trains; returns the exit code."""
    args = parse_args(argv)
    import torch
    from torch import nn

    from gpufleet import logs
    from gpufleet.job import Checkpointer
    from gpufleet.job.signals import resolve_signal

    logs.configure("info")  # logs to stderr: stdout holds only the losses
    torch.set_num_threads(max(args.threads, 1))
    shape = Shape(args.samples, args.batch, args.width, args.depth, args.optimizer)
    steps = args.steps if args.steps is not None else shape.steps_per_epoch * 3
    model, optimizer, scheduler, loader = build(shape)
    loss_fn = nn.BCEWithLogitsLoss()
    ckpt = Checkpointer(
        model,
        optimizer,
        scheduler,
        every_steps=args.every_steps,
        async_save=not args.sync,
        install_signal=not args.ignore_signal,
    )
    if args.ignore_signal:
        signal.signal(resolve_signal(), signal.SIG_IGN)
    step = ckpt.restore()
    if ckpt.last_restore and ckpt.last_restore.url:
        print(f"resumed step={step} exact={ckpt.last_restore.exact}", flush=True)
    epochs = -(-steps // shape.steps_per_epoch)
    with ckpt:
        for epoch in range(ckpt.data_position.epoch, epochs):
            for index, (x, y) in ckpt.batches(loader, epoch):
                if step >= steps:
                    break
                model.train()
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                print(f"step={step} loss={loss.item().hex()}", flush=True)
                if args.save_at == step:
                    ckpt.request()
                ckpt.step(step, epoch=epoch, batch=index)
                if args.progress:
                    ckpt.events.emit("step.progress", step=step)
                if args.kill_after == step:
                    ckpt.wait()
                    sys.stdout.flush()
                    os._exit(137)
                if args.step_delay_s:
                    time.sleep(args.step_delay_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
