"""``gpufleet demo spot`` end to end, as ``make demo`` runs it (shorter)."""

from __future__ import annotations

import pytest

from gpufleet.cli.main import main


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_spot_buys_moves_and_gives_back_its_hosts(tmp_path, capsys) -> None:
    """The demo exits 0: the job succeeded after moving zones with no step
    lost, and no instance was left running."""
    code = main(["demo", "spot", "--steps", "120", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "no instance left running" in out
