"""gpufleet: fleet telemetry, idle-GPU reaping and more for small GPU fleets."""

__version__ = "0.1.0"
