"""The agent as systemd runs it: a real process, readiness, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CASE12 = (
    Path(__file__).resolve().parents[1] / "cases" / "12-a40-resident-model-p0-idle.csv"
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_agent_process_notifies_ready_without_broker_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(20)
    env = dict(
        os.environ,
        NOTIFY_SOCKET=str(notify_path),
        GPUFLEET_AGENT_IDENTITY__DISCOVER="false",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet",
            "--broker",
            f"127.0.0.1:{_closed_port()}",
            "agent",
            "run",
            "--collector",
            "replay",
            "--trace-wide",
            str(CASE12),
            "--speedup",
            "60",
            "--name",
            "proc-test",
            "--state-dir",
            str(tmp_path),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Ready once the first sample is taken, although the broker is down.
        assert sock.recv(64) == b"READY=1"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert sock.recv(64) == b"STOPPING=1"
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "event=agent.ready" in stderr
    assert "event=broker.unreachable" in stderr
    assert "event=agent.stopped" in stderr
    assert "Traceback" not in stderr
