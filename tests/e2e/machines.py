"""Boots the instances a broker launched in moto, as far as this machine can.

moto records a launch but runs nothing. ``boot`` plays the machine: it takes
the instance's real user data from moto and runs that startup script under
a temporary root, with its own instance metadata service (a
``MetadataServer`` reporting the instance's id, zone and lifecycle, the way
IMDS does on EC2). Two things stand in for the image: gpufleet is
preinstalled (a link to this checkout's ``gpufleet``), and ``systemctl`` is
a small script that starts the unit's agent process directly, since there
is no systemd here. Everything else (the agent's configuration, labels and
broker address) is what the broker's script wrote.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3

from gpufleet.dev.metadata_server import MetadataServer

GPUFLEET = Path(sys.executable).with_name("gpufleet")

# Starts the agent as the unit's ExecStart would, with the file locations
# moved under the root; every call is logged for the test to read.
FAKE_SYSTEMCTL = """#!/bin/bash
echo "$*" >> "$GPUFLEET_ROOT/systemctl.log"
case "$*" in
    "enable --now gpufleet-agent"|"restart gpufleet-agent")
        nohup "$GPUFLEET_ROOT/opt/gpufleet/venv/bin/gpufleet" agent run \\
            --config "$GPUFLEET_ROOT/etc/gpufleet/agent.yaml" \\
            >"$GPUFLEET_ROOT/agent.log" 2>&1 &
        echo $! >"$GPUFLEET_ROOT/agent.pid"
        ;;
esac
exit 0
"""


@dataclass
class Machine:
    instance_id: str
    zone: str
    root: Path
    imds: MetadataServer

    @property
    def pid(self) -> int | None:
        path = self.root / "agent.pid"
        return int(path.read_text()) if path.exists() else None

    def agent_log(self) -> str:
        path = self.root / "agent.log"
        return path.read_text() if path.exists() else ""

    def kill(self) -> None:
        """Stops the agent process and the metadata service."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.imds.stop()


def user_data(url: str, region: str, instance_id: str) -> str:
    ec2 = boto3.client("ec2", region_name=region, endpoint_url=url)
    attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"]).decode()


def boot(
    url: str, region: str, view: object, root: Path, *, spot: bool = True
) -> Machine:
    """Runs the launched instance's startup script; returns the machine.

    Args:
        url: moto's endpoint.
        view: the broker's ``pb.LaunchedInstance`` for the instance.
        root: an empty folder that plays the machine's ``/``.
    """
    instance_id = view.instance_id  # type: ignore[attr-defined]
    zone = view.zone  # type: ignore[attr-defined]
    imds = MetadataServer(
        "aws",
        instance_id=instance_id,
        instance_type=view.instance_type,  # type: ignore[attr-defined]
        region=region,
        zone=zone,
        spot=spot,
    )
    imds.start()
    script = user_data(url, region, instance_id)
    root.mkdir(parents=True)
    venv_bin = root / "opt" / "gpufleet" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "gpufleet").symlink_to(GPUFLEET)
    fake_bin = root / "fake-bin"
    fake_bin.mkdir()
    systemctl = fake_bin / "systemctl"
    systemctl.write_text(FAKE_SYSTEMCTL)
    systemctl.chmod(0o755)
    (root / "startup.sh").write_text(script)
    env = {
        **os.environ,
        "GPUFLEET_ROOT": str(root),
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        # What differs from machine to machine on a real cloud: its own
        # metadata service and its own disk.
        "GPUFLEET_AGENT_IDENTITY__METADATA_BASE": imds.url,
        "GPUFLEET_AGENT_STATE_DIR": str(root / "var" / "lib" / "gpufleet"),
        # Real GPUs have their own uuids; replayed ones get them from a salt.
        "GPUFLEET_AGENT_REPLAY__UUID_SALT": instance_id,
    }
    done = subprocess.run(
        ["bash", str(root / "startup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return Machine(instance_id, zone, root, imds)
