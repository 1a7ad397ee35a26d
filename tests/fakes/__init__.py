"""Fakes of the GPU libraries and cloud metadata services that gpufleet talks to.

Tests drive real gpufleet code against these instead of mocks.
"""

from __future__ import annotations

from pathlib import Path


def make_proc_root(
    root: Path, pids: dict[int, str], *, pid_max: int = 4_194_304
) -> Path:
    """Builds a /proc look-alike holding ``pids`` (pid -> comm) and pid_max."""
    (root / "sys/kernel").mkdir(parents=True, exist_ok=True)
    (root / "sys/kernel/pid_max").write_text(f"{pid_max}\n")
    for pid, comm in pids.items():
        (root / str(pid)).mkdir(exist_ok=True)
        (root / str(pid) / "comm").write_text(f"{comm}\n")
    return root
