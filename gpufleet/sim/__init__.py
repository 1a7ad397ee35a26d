"""Offline fleet simulator: placement policies replayed on real spot traces.

Used by ``gpufleet simulate`` and ``bench/spot_policies.py``; it runs the
broker's own policies (:mod:`gpufleet.broker.spot_policy`) and needs no
broker.
"""

from gpufleet.sim.engine import (
    FleetRun,
    FleetSpec,
    HostPlan,
    JobOutcome,
    simulate_fleet,
)
from gpufleet.sim.report import PolicySummary, summarize, to_document
from gpufleet.sim.traces import (
    ActivityShapes,
    SpotTrace,
    default_activity_file,
    default_traces_dir,
    load_activity,
    load_trace,
    load_traces,
)

__all__ = [
    "ActivityShapes",
    "FleetRun",
    "FleetSpec",
    "HostPlan",
    "JobOutcome",
    "PolicySummary",
    "SpotTrace",
    "default_activity_file",
    "default_traces_dir",
    "load_activity",
    "load_trace",
    "load_traces",
    "simulate_fleet",
    "summarize",
    "to_document",
]
