"""GPU collectors of the agent: NVML, AMD SMI and trace replay, behind one interface."""

from gpufleet.agent.collectors.base import Collector, GpuLostError, GpuSampler
from gpufleet.agent.collectors.detect import detect_collector

__all__ = ["Collector", "GpuLostError", "GpuSampler", "detect_collector"]
