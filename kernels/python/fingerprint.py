"""The hardware fingerprint: which GPUs may share a tuned kernel config.

Two GPUs with the same fingerprint run the same kernel config equally well.
It is finer than Triton's own cache key (architecture and ptxas version
only), because an H100 PCIe and an H100 SXM share that key while their best
configs differ: the product name and memory size tell them apart. The
agent computes it from its GPU inventory; nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from gpufleet.proto import pb


@dataclass(frozen=True)
class HardwareFingerprint:
    """What decides a kernel config's speed and whether it fits at all."""

    vendor: str
    product: str
    compute_capability: str  # "9.0" on NVIDIA, "gfx942" on AMD
    mem_total_gib: int  # rounded; ECC and reservations move it a little
    driver_major: str
    runtime: str = ""  # CUDA or ROCm runtime version, when known
    triton: str = ""  # Triton version, when installed
    multiprocessors: int = 0  # SM or CU count, when known

    @property
    def key(self) -> str:
        """A short stable id, e.g. for cache folders and catalog keys."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint_of(
    gpu: pb.GpuInfo,
    *,
    runtime: str = "",
    triton: str = "",
    multiprocessors: int = 0,
) -> HardwareFingerprint:
    """Builds the fingerprint of one GPU from the agent's inventory."""
    return HardwareFingerprint(
        vendor=gpu.vendor,
        product=" ".join(gpu.name.split()),
        compute_capability=gpu.compute_capability,
        mem_total_gib=round(gpu.mem_total_bytes / 1024**3),
        driver_major=gpu.driver_version.split(".", 1)[0],
        runtime=runtime,
        triton=triton,
        multiprocessors=multiprocessors,
    )
