"""Small synthetic traces for the simulator tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_trace(path: Path, data: list[Any], gap_s: float = 3600, **extra: Any) -> Path:
    """Writes a trace file in the SkyPilot layout and returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"metadata": {"gap_seconds": gap_s}, "data": data, **extra}
    path.write_text(json.dumps(doc))
    return path
