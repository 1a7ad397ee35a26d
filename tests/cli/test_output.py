"""JSON output of the CLI: protobuf messages as plain documents."""

from __future__ import annotations

from gpufleet.cli.output import to_dict
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
