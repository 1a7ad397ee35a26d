"""Tests of the systemd units, their env files and the installer script."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
INSTALL = PACKAGING / "install.sh"
ROLES = ("agent", "broker")
TIMEOUT_S = 60


def _unit(role: str) -> Path:
    return PACKAGING / "systemd" / f"gpufleet-{role}.service"


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _directives(role: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in _unit(role).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)
@pytest.mark.parametrize("role", ROLES)
def test_packaging_unit_passes_systemd_verify(role: str, tmp_path: Path) -> None:
    """verify needs ExecStart to exist, so it checks a copy that runs true."""
    text = _unit(role).read_text()
    exec_start = f"ExecStart=/opt/gpufleet/venv/bin/gpufleet {role} "
    assert exec_start in text
    copy = tmp_path / _unit(role).name
    copy.write_text(text.replace(exec_start, f"ExecStart={shutil.which('true')} "))

    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_packaging_agent_unit_keeps_gpu_devices_and_process_access() -> None:
    unit = _directives("agent")

    assert "PrivateDevices" not in unit
    assert "ProtectProc" not in unit
    assert "CAP_KILL" in unit["CapabilityBoundingSet"][0].split()
    assert "char-nvidia-frontend rw" in unit["DeviceAllow"]
    assert "char-kfd rw" in unit["DeviceAllow"]
    assert "char-drm rw" in unit["DeviceAllow"]
    assert unit["Type"] == ["notify"]
    assert unit["EnvironmentFile"] == ["-/etc/gpufleet/agent.env"]


def test_packaging_broker_unit_runs_as_dynamic_user_without_caps() -> None:
    unit = _directives("broker")

    assert unit["DynamicUser"] == ["yes"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["PrivateDevices"] == ["yes"]
    assert unit["StateDirectory"] == ["gpufleet"]
    assert unit["EnvironmentFile"] == ["-/etc/gpufleet/broker.env"]


@pytest.mark.parametrize(
    ("role", "variable"),
    [("agent", "GPUFLEET_AGENT_CONFIG"), ("broker", "GPUFLEET_BROKER_CONFIG")],
)
def test_packaging_env_file_names_only_the_config_file(
    role: str, variable: str
) -> None:
    text = (PACKAGING / "systemd" / f"{role}.env").read_text()
    settings = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]

    assert settings == [f"{variable}=/etc/gpufleet/{role}.yaml"]


def test_packaging_install_script_parses() -> None:
    done = subprocess.run(
        ["bash", "-n", str(INSTALL)], capture_output=True, text=True, check=False
    )

    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("role", ROLES)
def test_packaging_install_dry_run_prints_plan_and_writes_nothing(
    role: str, tmp_path: Path
) -> None:
    prefix = tmp_path / "root"

    done = _install(
        role, "--extras", "nvidia,aws", "--dry-run", "--prefix", str(prefix)
    )

    assert done.returncode == 0, done.stderr
    assert f"{prefix}/opt/gpufleet/venv" in done.stdout
    assert f"[{role},nvidia,aws]" in done.stdout.replace("\\", "")
    assert f"{prefix}/etc/systemd/system/gpufleet-{role}.service" in done.stdout
    assert not prefix.exists()


def test_packaging_install_keeps_an_edited_env_file(tmp_path: Path) -> None:
    prefix = str(tmp_path)
    env_file = tmp_path / "etc/gpufleet/broker.env"

    first = _install("broker", "--no-pip", "--prefix", prefix)
    env_file.write_text(env_file.read_text() + "GPUFLEET_BROKER_LISTEN=0.0.0.0:50051\n")
    second = _install("broker", "--no-pip", "--prefix", prefix)

    assert first.returncode == second.returncode == 0, second.stderr
    assert "GPUFLEET_BROKER_LISTEN" in env_file.read_text()
    assert (tmp_path / "etc/gpufleet/broker.env.new").exists()
    assert (tmp_path / "etc/systemd/system/gpufleet-broker.service").exists()
    assert oct(env_file.stat().st_mode & 0o777) == "0o640"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "say what to install"),
        (("agent", "--extras", "nvidia;rm"), "not a comma-separated list"),
        (("agent", "--bogus"), "unknown argument"),
    ],
)
def test_packaging_install_bad_arguments_exit_2(
    args: tuple[str, ...], message: str
) -> None:
    done = _install(*args)

    assert done.returncode == 2
    assert message in done.stderr


def test_the_wheel_carries_every_shipped_data_file(tmp_path: Path) -> None:
    """A broker installed from the wheel (not a checkout) finds its price and
    risk tables: every file of broker/market_data and the reaper's prices."""
    import sys
    import zipfile

    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"]
    subprocess.run(
        [*pip, "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=TIMEOUT_S * 3,
    )
    [wheel] = tmp_path.glob("gpufleet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.name for p in (ROOT / "broker" / "market_data").iterdir()]
    assert shipped
    for name in shipped:
        assert f"gpufleet/broker/market_data/{name}" in names
    assert "gpufleet/broker/prices_default.csv" in names
