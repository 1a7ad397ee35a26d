"""Which hardware this process runs kernels on, as a fingerprint.

A job must look up the same slots that the agent of its host publishes, so
the agent's record of each GPU (``host.json`` in the kernel cache) wins over
what torch reports. Imports torch and Triton: the agent and the broker never
import this module.
"""

from __future__ import annotations

import os
import platform
import threading

import torch
import triton

from gpufleet.kernels.cache import ENV_CACHE, ENV_FINGERPRINT, KernelCache
from gpufleet.kernels.fingerprint import HardwareFingerprint
from gpufleet.logs import library_logger

log = library_logger(__name__)

ENV_INTERPRET = "TRITON_INTERPRET"


def interpreting() -> bool:
    """Whether Triton kernels decorated now run in the interpreter."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)  # what @triton.jit itself reads
    return os.environ.get(ENV_INTERPRET, "").strip().lower() in ("1", "true", "on")


_fingerprints: dict[tuple[str, str, int, bool], HardwareFingerprint] = {}
_fingerprints_lock = threading.Lock()


def local_fingerprint(
    cache: KernelCache | None = None, *, device: int | None = None
) -> HardwareFingerprint:
    """The hardware fingerprint this process tunes and looks up entries for.

    In order: the fingerprint named by ``GPUFLEET_KERNEL_FINGERPRINT`` (set by
    the agent for the jobs it starts) among the host's fingerprints in the
    cache's ``host.json``; else one computed from ``torch.cuda`` for
    ``device`` (the current device by default), replaced by the agent's
    record of the same GPU when ``host.json`` has one; else, under the
    interpreter or without a GPU, the agent's replayed GPU when the host
    replays traces, or a ``cpu`` fingerprint.

    Under the interpreter or without a GPU, a named fingerprint of a real
    GPU is ignored with a warning and the ``cpu`` fingerprint is used:
    interpreter timings must never be filed, and then published, as that
    GPU's. Only a replayed GPU (vendor ``replay``) is kept there.
    """
    # Called on every kernel call: the memo key is built from the environment
    # alone, and the cache object only made when the memo misses.
    wanted = os.environ.get(ENV_FINGERPRINT, "").strip()
    root = str(cache.root) if cache is not None else os.environ.get(ENV_CACHE, "")
    use_gpu = not interpreting() and torch.cuda.is_available()
    if use_gpu and device is None:
        device = torch.cuda.current_device()
    memo = (wanted, root, -1 if device is None else device, use_gpu)
    known = _fingerprints.get(memo)
    if known is not None:
        return known
    cache = cache if cache is not None else KernelCache()
    fingerprint = _find_fingerprint(cache, wanted, device if use_gpu else None)
    with _fingerprints_lock:
        _fingerprints[memo] = fingerprint
    return fingerprint


def _find_fingerprint(
    cache: KernelCache, wanted: str, device: int | None
) -> HardwareFingerprint:
    if wanted:
        found = cache.fingerprint(wanted)
        if found is not None and (device is not None or found.vendor == "replay"):
            return found
        if found is not None:
            # The interpreter's timings say nothing about a real GPU: entries
            # filed under its fingerprint would be published to its peers.
            log.warning(
                "kernels.fingerprint_not_interpreted",
                fingerprint_key=wanted,
                gpu=found.label,
                hint="kernels run in Triton's interpreter or without a GPU here, "
                "so they are tuned and looked up under the cpu fingerprint",
            )
            return cpu_fingerprint()
        log.warning(
            "kernels.fingerprint_unknown",
            fingerprint_key=wanted,
            host_file=str(cache.root / "host.json"),
            hint="the agent writes host.json; computing the fingerprint instead",
        )
    if device is None:
        return _replay_fingerprint(cache) or cpu_fingerprint()
    computed = cuda_fingerprint(device)
    host = cache.read_host()
    if host is not None:
        for recorded in host[0].values():
            if (
                recorded.vendor,
                recorded.product,
                recorded.compute_capability,
                recorded.mem_total_gib,
            ) == (
                computed.vendor,
                computed.product,
                computed.compute_capability,
                computed.mem_total_gib,
            ):
                return recorded
    return computed


def _replay_fingerprint(cache: KernelCache) -> HardwareFingerprint | None:
    """The agent's fingerprint on a host whose GPUs are replayed traces.

    Such a host is a rehearsal of a fleet on CPUs: its jobs run kernels in
    the interpreter and share them under the replayed GPU's fingerprint.
    A host with real GPUs never does: what the interpreter measures says
    nothing about them.
    """
    host = cache.read_host()
    if host is None:
        return None
    fingerprints, default_key = host
    if not fingerprints or any(fp.vendor != "replay" for fp in fingerprints.values()):
        return None
    for fingerprint in fingerprints.values():
        if fingerprint.key == default_key:
            return fingerprint
    return next(iter(fingerprints.values()))


def cpu_fingerprint() -> HardwareFingerprint:
    """The fingerprint of the Triton interpreter on this kind of CPU."""
    return HardwareFingerprint(
        vendor="cpu",
        product=f"triton-interpreter-{platform.machine() or 'unknown'}",
        compute_capability="interpreter",
        mem_total_gib=0,
        driver_major="",
        runtime=f"torch-{torch.__version__.split('+', 1)[0]}",
        triton=triton.__version__,
    )


def cuda_fingerprint(device: int) -> HardwareFingerprint:
    """The fingerprint of one GPU as torch sees it (NVIDIA or AMD)."""
    props = torch.cuda.get_device_properties(device)
    hip = getattr(torch.version, "hip", None)
    if hip:
        vendor = "amd"
        capability = str(getattr(props, "gcnArchName", "")).split(":", 1)[0]
        runtime = str(hip)
    else:
        vendor = "nvidia"
        capability = f"{props.major}.{props.minor}"
        runtime = str(torch.version.cuda or "")
    return HardwareFingerprint(
        vendor=vendor,
        product=" ".join(props.name.split()),
        compute_capability=capability,
        mem_total_gib=round(props.total_memory / 1024**3),
        driver_major=_driver_major(vendor),
        runtime=runtime,
        triton=triton.__version__,
        multiprocessors=int(props.multi_processor_count),
    )


def _driver_major(vendor: str) -> str:
    """The driver's major version as the agent records it, when NVML tells."""
    if vendor != "nvidia":
        return ""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML is optional in a job; the key then just differs.
        return ""
    if isinstance(version, bytes):
        version = version.decode()
    return str(version).split(".", 1)[0]
