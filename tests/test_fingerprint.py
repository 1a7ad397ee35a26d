"""The hardware fingerprint separates GPUs that Triton's own key merges."""

from gpufleet.kernels.fingerprint import fingerprint_of
from gpufleet.proto import pb


def _gpu(name: str, mem_gib: float, driver: str = "590.48.01") -> pb.GpuInfo:
    return pb.GpuInfo(
        vendor="nvidia",
        name=name,
        compute_capability="9.0",
        mem_total_bytes=int(mem_gib * 1024**3),
        driver_version=driver,
    )


def test_fingerprint_h100_pcie_and_sxm_differ() -> None:
    pcie = fingerprint_of(_gpu("NVIDIA H100 PCIe", 79.6))
    sxm = fingerprint_of(_gpu("NVIDIA H100 80GB HBM3", 79.6))
    assert pcie.compute_capability == sxm.compute_capability
    assert pcie.key != sxm.key


def test_fingerprint_same_model_minor_driver_update_shares_key() -> None:
    a = fingerprint_of(_gpu("NVIDIA H200", 140.4, "590.48.01"))
    b = fingerprint_of(_gpu("NVIDIA  H200", 140.3, "590.51.02"))
    assert a.key == b.key


def test_fingerprint_driver_major_change_changes_key() -> None:
    a = fingerprint_of(_gpu("NVIDIA H200", 140.4, "580.95.05"))
    b = fingerprint_of(_gpu("NVIDIA H200", 140.4, "590.48.01"))
    assert a.key != b.key
