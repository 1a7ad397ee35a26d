"""Tests of the startup script: rendered, then run for real by bash under a
temporary GPUFLEET_ROOT, with a recording ``systemctl`` on PATH standing in
for the OS service manager and gpufleet preinstalled as in a prepared image."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gpufleet.agent.config import load_agent_config
from gpufleet.broker.clouds.launch import AGENT_ENV, AGENT_UNIT, render_startup_script
from gpufleet.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
GPUFLEET = REPO / ".venv" / "bin" / "gpufleet"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
TIMEOUT_S = 30


def _render(**changes: Any) -> str:
    args: dict[str, Any] = {
        "broker": "broker.lab:50051",
        "package": "gpufleet[agent,nvidia]==0.4.0",
        "launch_id": "l-0001",
        "fleet": "lab",
        "labels": {"team": "vision"},
        "agent_config": {"interval_s": 2.0, "labels": {"rack": "r1"}},
    }
    args.update(changes)
    return render_startup_script(**args)


def _systemctl(bin_dir: Path, *, fail: bool = False) -> Path:
    """A fake systemctl that records its arguments, one call a line."""
    calls = bin_dir / "systemctl.calls"
    script = bin_dir / "systemctl"
    script.write_text(
        f'#!/bin/bash\necho "$*" >> {calls}\n' + ("exit 1\n" if fail else "")
    )
    script.chmod(0o755)
    return calls


def _run(
    script: str, root: Path, *, fail_systemctl: bool = False
) -> tuple[subprocess.CompletedProcess[str], Path]:
    bin_dir = root.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = _systemctl(bin_dir, fail=fail_systemctl)
    venv_bin = root / "opt/gpufleet/venv/bin"
    venv_bin.mkdir(parents=True, exist_ok=True)
    if not (venv_bin / "gpufleet").exists():
        (venv_bin / "gpufleet").symlink_to(GPUFLEET)
    path = root.parent / "startup.sh"
    path.write_text(script)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "GPUFLEET_ROOT": str(root),
        "HOME": str(root.parent),
    }
    done = subprocess.run(
        ["bash", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=root.parent,
        check=False,
    )
    return done, calls


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns, _mode(p))
        for p in sorted(root.rglob("*"))
        if p.is_file() and "venv" not in p.parts
    }


def test_startup_script_passes_bash_syntax_check() -> None:
    """The rendered script parses with bash -n."""
    done = subprocess.run(
        ["bash", "-n"],
        input=_render(ca_pem=PEM, cert_pem=PEM, key_pem=KEY),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )

    assert done.returncode == 0, done.stderr


def test_startup_script_writes_config_unit_and_enables_agent(tmp_path: Path) -> None:
    """A run writes agent.yaml (0600), TLS files, the unit, and starts the agent."""
    root = tmp_path / "root"

    done, calls = _run(_render(ca_pem=PEM, cert_pem=PEM, key_pem=KEY), root)

    assert done.returncode == 0, done.stderr
    config_path = root / "etc/gpufleet/agent.yaml"
    assert _mode(config_path) == 0o600
    cfg = load_agent_config(config_path)
    assert cfg.broker == "broker.lab:50051"
    assert cfg.interval_s == 2.0
    assert cfg.labels == {
        "gpufleet.launch-id": "l-0001",
        "gpufleet.fleet": "lab",
        "team": "vision",
        "rack": "r1",
    }
    assert str(cfg.tls.ca) == "/etc/gpufleet/tls/ca.pem"
    for name, content in (("ca", PEM), ("cert", PEM), ("key", KEY)):
        pem = root / f"etc/gpufleet/tls/{name}.pem"
        assert pem.read_text() == content
        assert _mode(pem) == 0o600
    unit = root / "etc/systemd/system/gpufleet-agent.service"
    assert unit.read_text() == AGENT_UNIT
    assert _mode(unit) == 0o644
    assert (root / "etc/gpufleet/agent.env").read_text() == AGENT_ENV
    assert calls.read_text().splitlines() == [
        "daemon-reload",
        "enable gpufleet-agent",
        "restart gpufleet-agent",
    ]
    assert (
        "gpufleet is installed" in (root / "var/log/gpufleet-startup.log").read_text()
    )


def test_startup_script_second_run_changes_nothing(tmp_path: Path) -> None:
    """Run again (as at every GCE boot), no file is touched."""
    root = tmp_path / "root"
    script = _render(ca_pem=PEM, cert_pem=PEM, key_pem=KEY)
    _run(script, root)
    before = _snapshot(root)
    log_name = "var/log/gpufleet-startup.log"

    done, calls = _run(script, root)

    assert done.returncode == 0, done.stderr
    after = _snapshot(root)
    before.pop(log_name)
    after.pop(log_name)
    assert after == before
    assert calls.read_text().splitlines()[-2:] == [
        "daemon-reload",
        "enable --now gpufleet-agent",
    ]


def test_startup_script_keeps_an_edited_agent_env(tmp_path: Path) -> None:
    """An operator's agent.env survives, like install.sh keeps it."""
    root = tmp_path / "root"
    env_file = root / "etc/gpufleet/agent.env"
    env_file.parent.mkdir(parents=True)
    env_file.write_text("GPUFLEET_AGENT_CONFIG=/etc/gpufleet/agent.yaml\nX=1\n")

    done, _ = _run(_render(), root)

    assert done.returncode == 0, done.stderr
    assert env_file.read_text().endswith("X=1\n")


@pytest.mark.parametrize(
    "evil",
    [
        "$(touch PWNED)",
        "`touch PWNED`",
        "'; touch PWNED; '",
        '"; touch PWNED; "',
        "x\ntouch PWNED\nGPUFLEET_EOF\ntouch PWNED",
        "a: b\nbroker: evil:1\n- [x",
    ],
)
def test_startup_script_values_cannot_inject_shell_or_yaml(
    tmp_path: Path, evil: str
) -> None:
    """Hostile labels, ids, fleet and job values stay data, byte for byte."""
    root = tmp_path / "root"
    script = _render(
        launch_id=evil,
        fleet=evil,
        labels={"evil": evil, evil: "key"},
        agent_config={"name": evil},
    )

    done, _ = _run(script, root)

    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.rglob("PWNED"))
    cfg = load_agent_config(root / "etc/gpufleet/agent.yaml")
    assert cfg.broker == "broker.lab:50051"
    assert cfg.name == evil
    assert cfg.labels["evil"] == evil
    assert cfg.labels[evil] == "key"
    assert cfg.labels["gpufleet.launch-id"] == evil


def test_startup_script_failure_exits_nonzero_with_message(tmp_path: Path) -> None:
    """A failing step stops the script with an error in stderr and the log."""
    root = tmp_path / "root"

    done, _ = _run(_render(), root, fail_systemctl=True)

    assert done.returncode == 1
    assert "error: systemctl daemon-reload failed" in done.stderr
    log = (root / "var/log/gpufleet-startup.log").read_text()
    assert "hint: the image must boot with systemd" in log


def test_startup_script_refuses_config_the_agent_would_refuse() -> None:
    """Bad agent settings and half TLS fail at render time, each named."""
    with pytest.raises(ConfigError) as info:
        _render(broker="no-port", agent_config={"intervl_s": 1}, ca_pem=PEM)

    text = "\n".join(info.value.problems)
    assert "broker: must be HOST:PORT" in text
    assert "intervl_s: unknown field" in text
    assert "ca_pem, cert_pem and key_pem together" in text


@pytest.mark.parametrize(
    ("constant", "packaged"),
    [
        (AGENT_UNIT, "packaging/systemd/gpufleet-agent.service"),
        (AGENT_ENV, "packaging/systemd/agent.env"),
    ],
)
def test_startup_script_embeds_the_packaged_unit_files(
    constant: str, packaged: str
) -> None:
    """The embedded unit and env file equal the packaged ones."""
    assert constant == (REPO / packaged).read_text()
