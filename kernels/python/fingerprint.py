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
from dataclasses import asdict, dataclass, fields
from typing import Any

from gpufleet.proto import pb


class FingerprintError(ValueError):
    """A fingerprint that is malformed or whose key does not match its fields."""


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

    @property
    def label(self) -> str:
        """A short human name, e.g. ``NVIDIA A10G (8.6, 24 GiB)``."""
        details = [self.compute_capability, f"{self.mem_total_gib} GiB"]
        return f"{self.product} ({', '.join(d for d in details if d)})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key}

    @classmethod
    def from_dict(cls, data: Any) -> HardwareFingerprint:
        """Reads a fingerprint written by ``to_dict``; checks types and key."""
        if not isinstance(data, dict):
            raise FingerprintError("a fingerprint must be a JSON object")
        values: dict[str, Any] = {}
        for field in fields(cls):
            value = data.get(field.name, field.default)
            wanted = int if field.type in ("int", int) else str
            if type(value) is not wanted:
                raise FingerprintError(
                    f"fingerprint field {field.name!r} must be {wanted.__name__}, "
                    f"got {type(value).__name__}"
                )
            if wanted is str and len(value) > 128:
                raise FingerprintError(f"fingerprint field {field.name!r} is too long")
            if wanted is int and not 0 <= value <= 1_000_000:
                raise FingerprintError(f"fingerprint field {field.name!r} is absurd")
            values[field.name] = value
        fingerprint = cls(**values)
        claimed = data.get("key")
        if claimed is not None and claimed != fingerprint.key:
            raise FingerprintError(
                f"fingerprint key {claimed!r} does not match its fields "
                f"(they give {fingerprint.key!r})"
            )
        return fingerprint

    def to_proto(self) -> pb.KernelFingerprint:
        return pb.KernelFingerprint(key=self.key, **asdict(self))

    @classmethod
    def from_proto(cls, message: pb.KernelFingerprint) -> HardwareFingerprint:
        """Reads a fingerprint from the wire; the key must match the fields."""
        data: dict[str, Any] = {f.name: getattr(message, f.name) for f in fields(cls)}
        if message.key:
            data["key"] = message.key
        return cls.from_dict(data)


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
