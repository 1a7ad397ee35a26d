"""Where a job runs: pure choice of a host from the fleet's current state.

Owned by the broker process; no I/O. The job manager calls ``choose_host``
for new jobs and for migrations.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gpufleet.kernels.fingerprint import HardwareFingerprint, fingerprint_of
from gpufleet.proto import pb


@dataclass(frozen=True)
class Candidate:
    """What placement needs to know of one host."""

    host_id: str
    zone: str
    spot: bool
    usd_per_hour: float  # 0 when the price is unknown
    labels: Mapping[str, str]
    free_gpus: tuple[str, ...]  # uuids, in index order
    gpu_infos: Mapping[str, pb.GpuInfo]
    # The host's GPU kinds as its agent announced them (with the Triton
    # version): the keys users see in `gpufleet hosts` and `kernels list`.
    kernel_fingerprints: tuple[HardwareFingerprint, ...] = ()


def gpu_keys(
    info: pb.GpuInfo, announced: Iterable[HardwareFingerprint] = ()
) -> set[str]:
    """Every fingerprint key that names this GPU's kind."""
    base = fingerprint_of(info)
    same = (
        base.vendor,
        base.product,
        base.compute_capability,
        base.mem_total_gib,
        base.driver_major,
    )
    keys = {base.key}
    for fp in announced:
        if (
            fp.vendor,
            fp.product,
            fp.compute_capability,
            fp.mem_total_gib,
            fp.driver_major,
        ) == same:
            keys.add(fp.key)
    return keys


def hardware_key(infos: Iterable[pb.GpuInfo]) -> str:
    """The fingerprint key of a host's GPUs (the first one's; hosts are
    homogeneous in practice), or "" for a host without GPUs."""
    for info in infos:
        return fingerprint_of(info).key
    return ""


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def is_accelerator(info: pb.GpuInfo, accelerator: str) -> bool:
    """Whether a GPU is of the model a job asks for with ``--accelerator``.

    Every word of the request must be a word of the GPU's name: ``a100``
    and ``a100-80gb`` match "NVIDIA A100-SXM4-80GB", ``l4`` matches
    "NVIDIA L4" but not "NVIDIA L40S".
    """
    wanted = _words(accelerator)
    return bool(wanted) and wanted <= _words(info.name)


def fits(job: pb.JobSpec, host: Candidate) -> bool:
    """Whether the job may run on the host now."""
    if len(host.free_gpus) < max(job.gpus, 0):
        return False
    if job.accelerator:
        chosen = host.free_gpus[: max(job.gpus, 1)]
        if not chosen or not all(
            is_accelerator(host.gpu_infos[u], job.accelerator) for u in chosen
        ):
            return False
    for key, pattern in job.labels.items():
        if not fnmatch.fnmatchcase(host.labels.get(key, ""), pattern):
            return False
    if job.hardware:
        chosen = host.free_gpus[: max(job.gpus, 1)]
        if not chosen or not all(
            job.hardware in gpu_keys(host.gpu_infos[u], host.kernel_fingerprints)
            for u in chosen
        ):
            return False
    return True


def choose_host(
    job: pb.JobSpec,
    candidates: Iterable[Candidate],
    *,
    exclude: frozenset[str] = frozenset(),
    avoid_zone: str = "",
    prefer_hardware: str = "",
) -> Candidate | None:
    """The best host for a job, or None when none fits.

    Order: hosts with the preferred hardware fingerprint first (a migrated
    job resumes on the hardware it ran on); then not in the zone to avoid
    (the one just preempted) while any other fits; then on-demand before spot
    (lower preemption risk); then the lower price; then the host id, so that
    the choice is deterministic.
    """
    fitting = [c for c in candidates if c.host_id not in exclude and fits(job, c)]
    if not fitting:
        return None

    def rank(c: Candidate) -> tuple[bool, bool, bool, float, str]:
        same_hw = bool(prefer_hardware) and (
            hardware_key(c.gpu_infos[u] for u in c.free_gpus) == prefer_hardware
        )
        in_bad_zone = bool(avoid_zone) and c.zone == avoid_zone
        return (not same_hw, in_bad_zone, c.spot, c.usd_per_hour, c.host_id)

    return min(fitting, key=rank)
