"""Boots the instances a broker launched in moto: see gpufleet.demo.machines."""

from __future__ import annotations

from pathlib import Path

from gpufleet.demo.machines import Machine
from gpufleet.demo.machines import boot as boot_machine


def boot(
    url: str, region: str, view: object, root: Path, *, spot: bool = True
) -> Machine:
    """Runs the startup script of the broker's ``pb.LaunchedInstance``."""
    return boot_machine(
        url,
        region,
        instance_id=view.instance_id,  # type: ignore[attr-defined]
        zone=view.zone,  # type: ignore[attr-defined]
        instance_type=view.instance_type,  # type: ignore[attr-defined]
        spot=spot,
        root=root,
    )


__all__ = ["Machine", "boot"]
