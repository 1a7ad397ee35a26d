"""Plays the machines behind instances the broker launched in moto's EC2.

moto records a launch but runs nothing. ``boot`` plays the machine: it takes
the instance's real user data from moto and runs that startup script under
a folder standing for the machine's ``/``, with the machine's own instance
metadata service (a ``MetadataServer`` reporting its id, zone and
lifecycle, as IMDS does on EC2). Two things stand in for the image:
gpufleet is preinstalled (a link to this environment's ``gpufleet``), and
``systemctl`` is a small script that starts the unit's agent process
directly, since there is no systemd to ask. The agent's configuration,
labels and broker address are what the broker's script wrote.

``Datacenter`` watches moto for instances the broker launched, boots each
new one, and stops the machine of each instance the broker terminated. The
spot demo and the end-to-end tests use both.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.dev.metadata_server import MetadataServer

GPUFLEET = Path(sys.executable).with_name("gpufleet")

# Starts the agent as the unit's ExecStart would, with the file locations
# moved under the root; every call is logged for the caller to read.
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
    """A booted instance: its folder, metadata service and agent process."""

    instance_id: str
    zone: str
    root: Path
    imds: MetadataServer
    booted_at_s: float = 0.0

    @property
    def pid(self) -> int | None:
        path = self.root / "agent.pid"
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return None

    def agent_log(self) -> str:
        path = self.root / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        """Stops the agent process and the metadata service."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.imds.stop()


def ec2_client(endpoint: str, region: str) -> Any:
    """A boto3 EC2 client for moto, with credentials only moto accepts."""
    import boto3

    return boto3.client(
        "ec2",
        region_name=region,
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        aws_session_token="testing",
    )


def user_data(endpoint: str, region: str, instance_id: str) -> str:
    """The instance's user data (its startup script), as moto keeps it."""
    attr = ec2_client(endpoint, region).describe_instance_attribute(
        InstanceId=instance_id, Attribute="userData"
    )
    return base64.b64decode(attr["UserData"]["Value"]).decode()


def boot(
    endpoint: str,
    region: str,
    *,
    instance_id: str,
    zone: str,
    instance_type: str,
    spot: bool,
    root: Path,
    env: dict[str, str] | None = None,
) -> Machine:
    """Runs a launched instance's startup script; returns the machine.

    Args:
        endpoint: moto's EC2 endpoint.
        root: an empty folder that plays the machine's ``/``.
        env: the environment to run the script in (default: this one's).

    Raises:
        RuntimeError: the script failed; the message holds its stderr.
    """
    import time

    imds = MetadataServer(
        "aws",
        instance_id=instance_id,
        instance_type=instance_type,
        region=region,
        zone=zone,
        spot=spot,
    )
    imds.start()
    try:
        script = user_data(endpoint, region, instance_id)
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
        base = dict(os.environ if env is None else env)
        base.update(
            GPUFLEET_ROOT=str(root),
            PATH=f"{fake_bin}:{base.get('PATH', '/usr/bin:/bin')}",
            # What differs from machine to machine on a real cloud: its own
            # metadata service, its own disk, its own GPUs' uuids.
            GPUFLEET_AGENT_IDENTITY__METADATA_BASE=imds.url,
            GPUFLEET_AGENT_STATE_DIR=str(root / "var" / "lib" / "gpufleet"),
            GPUFLEET_AGENT_REPLAY__UUID_SALT=instance_id,
        )
        done = subprocess.run(
            ["bash", str(root / "startup.sh")],
            env=base,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except BaseException:
        imds.stop()
        raise
    if done.returncode != 0:
        imds.stop()
        raise RuntimeError(
            f"the startup script of {instance_id} failed with exit code "
            f"{done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    return Machine(instance_id, zone, root, imds, booted_at_s=time.time())


class Datacenter(threading.Thread):
    """Boots what the broker launches in moto and stops what it terminates.

    Attributes:
        machines: booted machines by instance id.
        errors: what went wrong booting, by instance id.
        gone: instances whose machine was stopped because the cloud ended them.
    """

    def __init__(
        self,
        endpoint: str,
        region: str,
        fleet: str,
        work: Path,
        *,
        env: dict[str, str] | None = None,
        poll_s: float = 0.3,
    ) -> None:
        super().__init__(daemon=True, name="demo-datacenter")
        self.endpoint = endpoint
        self.region = region
        self.fleet = fleet
        self.work = work
        self.env = env
        self.poll_s = poll_s
        self.machines: dict[str, Machine] = {}
        self.errors: dict[str, str] = {}
        self.gone: set[str] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        ec2 = ec2_client(self.endpoint, self.region)
        while not self._halt.wait(self.poll_s):
            with contextlib.suppress(Exception):
                self._step(ec2)

    def _step(self, ec2: Any) -> None:
        reply = ec2.describe_instances(
            Filters=[{"Name": "tag:gpufleet:fleet", "Values": [self.fleet]}]
        )
        for reservation in reply["Reservations"]:
            for inst in reservation["Instances"]:
                iid = inst["InstanceId"]
                state = inst["State"]["Name"]
                if state in ("shutting-down", "terminated", "stopping", "stopped"):
                    machine = self.machines.get(iid)
                    if machine is not None and iid not in self.gone:
                        machine.kill()
                        self.gone.add(iid)
                    continue
                if iid in self.machines or iid in self.errors:
                    continue
                try:
                    self.machines[iid] = boot(
                        self.endpoint,
                        self.region,
                        instance_id=iid,
                        zone=inst["Placement"]["AvailabilityZone"],
                        instance_type=inst["InstanceType"],
                        spot=inst.get("InstanceLifecycle") == "spot",
                        root=self.work / iid,
                        env=self.env,
                    )
                except Exception as exc:
                    self.errors[iid] = str(exc)

    def stop(self) -> None:
        """Stops watching and stops every machine still running."""
        self._halt.set()
        self.join(timeout=5)
        for iid, machine in self.machines.items():
            if iid not in self.gone:
                machine.kill()
                self.gone.add(iid)
