"""Checkpoint write throughput against dd, and the training stall of a save.

Writes ``--size-mib`` of float32 state with the job SDK's writer (torch.save,
SHA-256 on the way, fsync, manifest) and the same amount with
``dd if=/dev/zero bs=1M conv=fsync`` into the same folder, in the same run.
Then times the call to ``Checkpointer.step()`` that saves, asynchronously and
synchronously. Prints Markdown tables; asserts nothing.

    .venv/bin/python bench/checkpoint_throughput.py [--size-mib 1024] [--dir PATH]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from gpufleet import logs
from gpufleet.job import Checkpointer
from gpufleet.job.storage import LocalStorage
from gpufleet.job.writer import write_state

MIB = 1024 * 1024
TENSORS = 16


def make_model(size_mib: int) -> nn.Module:
    """A module whose parameters hold ``size_mib`` of float32."""
    per = size_mib * MIB // 4 // TENSORS
    return nn.ParameterList(nn.Parameter(torch.randn(per)) for _ in range(TENSORS))


def time_dd(folder: Path, size_mib: int) -> float:
    """Seconds for dd to write and fsync ``size_mib`` of zeros."""
    target = folder / "dd.bin"
    started = time.perf_counter()
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={target}",
            "bs=1M",
            f"count={size_mib}",
            "conv=fsync",
        ],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def time_write(folder: Path, model: nn.Module) -> tuple[float, int]:
    """Seconds and bytes for one checkpoint written by the SDK's writer."""
    storage = LocalStorage(folder / "writer")
    state = {"model": model.state_dict()}
    started = time.perf_counter()
    manifest = write_state(storage, "step_1", 1, state)
    elapsed = time.perf_counter() - started
    shutil.rmtree(folder / "writer")
    return elapsed, manifest.total_bytes


def time_stall(folder: Path, model: nn.Module, async_save: bool) -> tuple[float, float]:
    """(seconds inside step() on the saving step, seconds until written)."""
    ckpt = Checkpointer(
        model,
        url=str(folder / f"stall-{async_save}"),
        every_steps=1,
        async_save=async_save,
        install_signal=False,
    )
    started = time.perf_counter()
    ckpt.step(1)
    stall = time.perf_counter() - started
    ckpt.wait()
    total = time.perf_counter() - started
    ckpt.close(save=False)
    shutil.rmtree(folder / f"stall-{async_save}")
    return stall, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="folder on the disk to measure (default: a temp dir)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logs.configure("warning")
    folder = Path(tempfile.mkdtemp(prefix="gpufleet-bench-", dir=args.dir))
    try:
        model = make_model(args.size_mib)
        rows = []
        for _ in range(args.rounds):
            dd_s = time_dd(folder, args.size_mib)
            write_s, size = time_write(folder, model)
            rows.append((dd_s, write_s, size))
        print(f"## Checkpoint write vs dd ({args.size_mib} MiB, {folder})\n")
        print("| round | dd MiB/s | checkpoint MiB/s | ratio |")
        print("| --- | --- | --- | --- |")
        for index, (dd_s, write_s, size) in enumerate(rows, 1):
            dd_rate = args.size_mib / dd_s
            ck_rate = size / MIB / write_s
            print(
                f"| {index} | {dd_rate:.0f} | {ck_rate:.0f} | {ck_rate / dd_rate:.2f} |"
            )
        best_dd = min(r[0] for r in rows)
        best_ck = min(r[1] for r in rows)
        print(
            f"| best | {args.size_mib / best_dd:.0f} | "
            f"{rows[0][2] / MIB / best_ck:.0f} | "
            f"{(rows[0][2] / MIB / best_ck) / (args.size_mib / best_dd):.2f} |"
        )
        print(f"\n## Training stall of the saving step ({args.size_mib} MiB)\n")
        print("| save | inside step() s | until written s |")
        print("| --- | --- | --- |")
        for async_save in (True, False):
            stall, total = time_stall(folder, model, async_save)
            label = "async" if async_save else "sync"
            print(f"| {label} | {stall:.3f} | {total:.3f} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
