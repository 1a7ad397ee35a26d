"""Preemption notices: one source per cloud and the watcher that polls it.

Runs in the agent daemon. ``detect_source`` picks the source for the cloud
that identity discovery found; ``NoticeWatcher.run_loop`` hands each new
notice to the agent once.
"""

from gpufleet.agent.preemption.base import (
    PreemptionNotice,
    PreemptionSource,
    SourceHealth,
    parse_time,
)
from gpufleet.agent.preemption.watcher import NoticeWatcher, detect_source

__all__ = [
    "NoticeWatcher",
    "PreemptionNotice",
    "PreemptionSource",
    "SourceHealth",
    "detect_source",
    "parse_time",
]
