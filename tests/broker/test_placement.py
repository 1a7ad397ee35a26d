"""Placement: same hardware first, away from the preempted zone, cheap, safe."""

from __future__ import annotations

from gpufleet.broker.placement import Candidate, choose_host, fits, hardware_key
from gpufleet.proto import pb


def _host(
    host_id: str,
    *,
    name: str = "NVIDIA A10G",
    gpus: int = 1,
    zone: str = "us-east-1a",
    spot: bool = True,
    price: float = 1.0,
    labels: dict[str, str] | None = None,
) -> Candidate:
    infos = {
        f"{host_id}-g{i}": pb.GpuInfo(
            uuid=f"{host_id}-g{i}",
            index=i,
            name=name,
            vendor="nvidia",
            compute_capability="8.6",
            mem_total_bytes=24 * 1024**3,
            driver_version="590.48.01",
        )
        for i in range(gpus)
    }
    return Candidate(
        host_id=host_id,
        zone=zone,
        spot=spot,
        usd_per_hour=price,
        labels=labels or {},
        free_gpus=tuple(infos),
        gpu_infos=infos,
    )


def test_placement_prefers_same_hardware_over_a_cheaper_host() -> None:
    a10g = _host("a", price=1.0)
    l4 = _host("b", name="NVIDIA L4", price=0.5)
    job = pb.JobSpec(gpus=1)
    prefer = hardware_key(a10g.gpu_infos.values())
    assert choose_host(job, [l4, a10g], prefer_hardware=prefer).host_id == "a"


def test_placement_avoids_preempted_zone_while_another_fits() -> None:
    same_zone = _host("a", zone="us-east-1a", price=0.1)
    other_zone = _host("b", zone="us-east-1b", price=0.9)
    job = pb.JobSpec(gpus=1)
    assert (
        choose_host(job, [same_zone, other_zone], avoid_zone="us-east-1a").host_id
        == "b"
    )
    assert choose_host(job, [same_zone], avoid_zone="us-east-1a").host_id == "a"


def test_placement_prefers_on_demand_then_lower_price() -> None:
    spot = _host("a", spot=True, price=0.3)
    od_dear = _host("b", spot=False, price=1.2)
    od_cheap = _host("c", spot=False, price=1.0)
    assert choose_host(pb.JobSpec(gpus=1), [spot, od_dear, od_cheap]).host_id == "c"


def test_placement_never_the_excluded_host_and_none_when_nothing_fits() -> None:
    leaving = _host("a")
    small = _host("b", gpus=1)
    job = pb.JobSpec(gpus=2)
    assert choose_host(job, [leaving, small], exclude=frozenset({"a"})) is None


def test_placement_labels_and_hardware_must_match() -> None:
    host = _host("a", labels={"team": "vision"})
    key = hardware_key(host.gpu_infos.values())
    assert fits(pb.JobSpec(gpus=1, labels={"team": "vis*"}, hardware=key), host)
    assert not fits(pb.JobSpec(gpus=1, labels={"team": "nlp"}), host)
    assert not fits(pb.JobSpec(gpus=1, hardware="0123456789abcdef"), host)


def test_hardware_accepts_the_key_the_agent_announced() -> None:
    """`gpufleet hosts` shows the agent's key (with Triton's version): it fits."""
    import dataclasses

    from gpufleet.kernels.fingerprint import fingerprint_of

    host = _host("a")
    base = fingerprint_of(next(iter(host.gpu_infos.values())))
    announced = dataclasses.replace(base, triton="3.9.0")
    host = dataclasses.replace(host, kernel_fingerprints=(announced,))
    assert fits(pb.JobSpec(gpus=1, hardware=announced.key), host)
    assert fits(pb.JobSpec(gpus=1, hardware=base.key), host)
    other = dataclasses.replace(announced, product="NVIDIA L4")
    assert not fits(pb.JobSpec(gpus=1, hardware=other.key), host)


def test_accelerator_matches_the_words_of_the_gpu_name() -> None:
    """--accelerator keeps only hosts whose GPUs carry every word of it:
    a100-80gb fits an A100 80GB, l4 does not fit an L40S."""
    job = pb.JobSpec(gpus=1, accelerator="a100-80gb")
    assert fits(job, _host("a", name="NVIDIA A100-SXM4-80GB"))
    assert not fits(job, _host("b", name="NVIDIA A100-SXM4-40GB"))
    assert not fits(
        pb.JobSpec(gpus=1, accelerator="l4"), _host("c", name="NVIDIA L40S")
    )
    assert fits(pb.JobSpec(gpus=1, accelerator="l4"), _host("d", name="NVIDIA L4"))
    chosen = choose_host(
        pb.JobSpec(gpus=1, accelerator="a100"),
        [_host("cheap-a10g", price=0.5), _host("a100", name="NVIDIA A100-SXM4-80GB")],
    )
    assert chosen is not None
    assert chosen.host_id == "a100"
