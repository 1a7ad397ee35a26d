"""A small deterministic CPU training job that uses the SDK as a user would.

Case 17's setup: 20 samples, batch 4 (5 steps per epoch), 3 epochs, shuffle,
an MLP with dropout p=0.1, seed 1234. It prints ``step=N loss=HEX`` per step,
with the loss as ``float.hex()`` so that runs compare bit for bit. Checkpoint
location and resume point come from the GPUFLEET_* environment.

    python tests/job/trainer.py [--steps 15] [--kill-after N] [--save-at N]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gpufleet import logs
from gpufleet.job import Checkpointer

SEED = 1234
SAMPLES, BATCH, EPOCHS = 20, 4, 3


def build() -> tuple[nn.Module, torch.optim.Optimizer, object, DataLoader]:
    """Model, optimizer, scheduler and loader, all seeded."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    data = torch.randn(SAMPLES, 8)
    target = (data.sum(dim=1, keepdim=True) > 0).float()
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Dropout(p=0.1), nn.Linear(16, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.9)
    # No generator of its own: the shuffle draws from the global torch RNG,
    # the hard case of transformers#17032.
    loader = DataLoader(TensorDataset(data, target), batch_size=BATCH, shuffle=True)
    return model, optimizer, scheduler, loader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=SAMPLES // BATCH * EPOCHS)
    parser.add_argument(
        "--kill-after",
        type=int,
        default=None,
        help="os._exit(137) right after this step, unsaved",
    )
    parser.add_argument(
        "--save-at",
        type=int,
        default=None,
        help="ask for a checkpoint at this step (as the signal does)",
    )
    parser.add_argument("--every-steps", type=int, default=None)
    parser.add_argument(
        "--step-delay-s",
        type=float,
        default=0.0,
        help="sleep per step, to leave time for a signal",
    )
    parser.add_argument("--sync", action="store_true", help="synchronous saves")
    args = parser.parse_args(argv)
    logs.configure("info")  # logs to stderr: stdout holds only the losses

    model, optimizer, scheduler, loader = build()
    loss_fn = nn.BCEWithLogitsLoss()
    ckpt = Checkpointer(
        model,
        optimizer,
        scheduler,
        every_steps=args.every_steps,
        async_save=not args.sync,
    )
    step = ckpt.restore()
    if ckpt.last_restore and ckpt.last_restore.url:
        print(f"resumed step={step} exact={ckpt.last_restore.exact}", flush=True)
    epochs = -(-args.steps // (SAMPLES // BATCH))
    with ckpt:
        for epoch in range(ckpt.data_position.epoch, epochs):
            for index, (x, y) in ckpt.batches(loader, epoch):
                if step >= args.steps:
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
                if args.kill_after == step:
                    ckpt.wait()
                    sys.stdout.flush()
                    os._exit(137)
                if args.step_delay_s:
                    time.sleep(args.step_delay_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
