"""Benchmark functions for the verifier's ``--bench module:function``.

Real timings under the interpreter are too noisy to assert on, so these run
the launch once and report fixed times by its role.
"""

from __future__ import annotations

from gpufleet.kernels.autotune import Launch


def equal(launch: Launch) -> float:
    """Entry and default take the same time."""
    launch()
    return 1.0


def entry_slow(launch: Launch) -> float:
    """The received entry takes twice as long as the local default."""
    launch()
    return 2.0 if launch.role == "entry" else 1.0
