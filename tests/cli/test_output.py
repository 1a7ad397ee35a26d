"""JSON output of the CLI: protobuf messages as plain documents."""

from __future__ import annotations

from gpufleet.cli.output import to_dict, usd_rate, when
from gpufleet.proto import pb


def test_64_bit_integers_are_numbers_at_every_depth() -> None:
    """protobuf's JSON writes int64 as strings; the CLI's documents do not."""
    view = pb.JobView(job_id="j", step=-1, checkpoint_step=12, steps_lost=3, attempt=2)
    listing = pb.ListJobsResponse(jobs=[view])
    doc = to_dict(listing)
    [job] = doc["jobs"]
    assert (job["step"], job["checkpoint_step"], job["steps_lost"]) == (-1, 12, 3)
    assert job["attempt"] == 2
    assert job["job_id"] == "j"


def test_usd_rate_shows_a_tiny_price_as_not_zero() -> None:
    assert usd_rate(1.006) == "1.0060"
    assert usd_rate(0.343, 3) == "0.343"
    assert usd_rate(1e-05) == "1e-05"
    assert usd_rate(0.0) == "0.0000"


def test_when_shows_a_time_out_of_the_calendar_as_a_number() -> None:
    assert when(0) == "-"
    assert when(1_800_000_000) == "2027-01-15 08:00:00"
    assert when(1e300) == "1e+300 (not a date)"
