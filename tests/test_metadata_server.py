"""Tests of ``gpufleet dev metadata-server``: protocols, control endpoint, CLI."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from gpufleet.agent.identity import discover_identity
from gpufleet.cli.dev import dev
from gpufleet.dev.metadata_server import MetadataServer
from gpufleet.errors import ConfigError
from tests.fakes.metadata import closed_port_url

TOKEN = "/latest/api/token"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1_796_299_200.0

    def __call__(self) -> float:
        return self.now_s


def _serve(cloud: str, **kwargs: Any) -> Iterator[MetadataServer]:
    server = MetadataServer(cloud, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws() -> Iterator[MetadataServer]:
    yield from _serve("aws")


@pytest.fixture
def gcp() -> Iterator[MetadataServer]:
    yield from _serve("gcp")


@pytest.fixture
def azure() -> Iterator[MetadataServer]:
    yield from _serve("azure")


@pytest.mark.parametrize(
    ("cloud", "instance_id", "region", "zone"),
    [
        ("aws", "i-0fedcba9876543210", "eu-west-1", "eu-west-1b"),
        ("gcp", "1234567890", "europe-west4", "europe-west4-b"),
        ("azure", "0c1d2e3f-0000-4000-8000-000000000000", "swedencentral", "3"),
    ],
)
async def test_metadata_server_answers_agent_identity_discovery(
    cloud: str, instance_id: str, region: str, zone: str
) -> None:
    server = MetadataServer(
        cloud,
        instance_id=instance_id,
        instance_type="g5.xlarge",
        region=region,
        zone=zone,
        spot=False,
    )
    server.start()
    bases = {f"{c}_base": closed_port_url() for c in ("aws", "gcp", "azure")}
    bases[f"{cloud}_base"] = server.url
    try:
        identity = await discover_identity(timeout_s=2.0, **bases)
    finally:
        server.stop()

    assert identity.provider == cloud
    assert identity.instance_id == instance_id
    assert identity.instance_type == "g5.xlarge"
    assert (identity.region, identity.zone) == (region, zone)
    assert identity.spot is False


async def test_metadata_server_spot_identity_is_spot() -> None:
    for server in _serve("gcp"):
        identity = await discover_identity(
            providers=["gcp"], timeout_s=2.0, gcp_base=server.url
        )
    assert identity.spot is True


def test_aws_server_refuses_gets_without_a_valid_token(aws: MetadataServer) -> None:
    with httpx.Client(base_url=aws.url) as client:
        assert client.get("/latest/meta-data/instance-id").status_code == 401
        bad = {"X-aws-ec2-metadata-token": "forged"}
        assert (
            client.get("/latest/meta-data/instance-id", headers=bad).status_code == 401
        )
        assert client.put(TOKEN).status_code == 400
        assert client.put(TOKEN, headers={TTL: "0"}).status_code == 400
        assert client.put(TOKEN, headers={TTL: "21601"}).status_code == 400
        proxied = {TTL: "60", "X-Forwarded-For": "10.0.0.1"}
        assert client.put(TOKEN, headers=proxied).status_code == 403
        assert client.get(TOKEN).status_code == 405


def test_aws_server_enforces_token_ttl() -> None:
    clock = FakeClock()
    for server in _serve("aws", clock=clock, token_ttl_max_s=300):
        with httpx.Client(base_url=server.url) as client:
            assert client.put(TOKEN, headers={TTL: "301"}).status_code == 400
            token = client.put(TOKEN, headers={TTL: "60"}).text
            headers = {"X-aws-ec2-metadata-token": token}
            clock.now_s += 59.9
            ok = client.get("/latest/meta-data/instance-id", headers=headers)
            clock.now_s += 0.1
            expired = client.get("/latest/meta-data/instance-id", headers=headers)

    assert ok.status_code == 200
    assert expired.status_code == 401


def test_aws_server_notice_in_is_visible_after_start() -> None:
    clock = FakeClock()
    for server in _serve("aws", clock=clock, notice_in_s=10.0):
        with httpx.Client(base_url=server.url) as client:
            token = client.put(TOKEN, headers={TTL: "600"}).text
            headers = {"X-aws-ec2-metadata-token": token}
            path = "/latest/meta-data/spot/instance-action"
            before = client.get(path, headers=headers)
            clock.now_s += 10.0
            after = client.get(path, headers=headers)

    assert before.status_code == 404
    assert after.status_code == 200
    assert after.json()["action"] == "terminate"


def test_gcp_server_requires_flavor_header(gcp: MetadataServer) -> None:
    with httpx.Client(base_url=gcp.url) as client:
        refused = client.get("/computeMetadata/v1/instance/id")
        answer = client.get(
            "/computeMetadata/v1/instance/id", headers={"Metadata-Flavor": "Google"}
        )

    assert refused.status_code == 403
    assert answer.headers["Metadata-Flavor"] == "Google"
    assert answer.headers["ETag"]


def test_gcp_server_hanging_get_times_out_with_same_etag(gcp: MetadataServer) -> None:
    headers = {"Metadata-Flavor": "Google"}
    path = "/computeMetadata/v1/instance/preempted"
    with httpx.Client(base_url=gcp.url, headers=headers) as client:
        first = client.get(path)
        started = time.monotonic()
        params = {
            "wait_for_change": "true",
            "last_etag": first.headers["ETag"],
            "timeout_sec": "0.05",
        }
        same = client.get(path, params=params)
        waited_s = time.monotonic() - started
        gcp.schedule_notice("preempted")
        changed = client.get(path, params=params)

    assert 0.04 <= waited_s < 1.0
    assert (same.text, same.headers["ETag"]) == ("FALSE", first.headers["ETag"])
    assert changed.text == "TRUE"
    assert changed.headers["ETag"] != first.headers["ETag"]


def test_azure_server_scheduled_events_and_acknowledgement(
    azure: MetadataServer,
) -> None:
    headers = {"Metadata": "true"}
    params = {"api-version": "2020-07-01"}
    path = "/metadata/scheduledevents"
    with httpx.Client(base_url=azure.url) as client:
        assert client.get(path, params=params).status_code == 400
        assert client.get(path, headers=headers).status_code == 400
        empty = client.get(path, params=params, headers=headers).json()
        azure.schedule_notice("preempted")
        doc = client.get(path, params=params, headers=headers).json()
        event_id = doc["Events"][0]["EventId"]
        bad_ack = client.post(path, params=params, headers=headers, json={})
        ack = client.post(
            path,
            params=params,
            headers=headers,
            json={"StartRequests": [{"EventId": event_id}]},
        )
        started = client.get(path, params=params, headers=headers).json()
        name = client.get(
            "/metadata/instance/compute/name",
            params={"api-version": "2021-02-01", "format": "text"},
            headers=headers,
        )

    assert empty == {"DocumentIncarnation": 1, "Events": []}
    assert doc["DocumentIncarnation"] == 2
    assert doc["Events"][0]["EventType"] == "Preempt"
    assert doc["Events"][0]["NotBefore"].endswith(" GMT")
    assert bad_ack.status_code == 400
    assert ack.status_code == 200
    assert azure.acknowledged == [event_id]
    assert started["DocumentIncarnation"] == 3
    assert started["Events"][0]["EventStatus"] == "Started"
    assert name.text == azure.vm_name


def test_control_endpoint_schedules_and_validates(aws: MetadataServer) -> None:
    with httpx.Client(base_url=aws.url) as client:
        made = client.post(
            "/_gpufleet/notice", json={"kind": "spot-interruption", "in_s": 120}
        )
        wrong = client.post("/_gpufleet/notice", json={"kind": "preempted"})
        negative = client.post("/_gpufleet/notice", json={"in_s": -1})
        fault = client.post("/_gpufleet/fault", json={"mode": "sideways"})
        missing = client.post("/_gpufleet/nothing")
        state = client.get("/_gpufleet/state").json()

    assert made.status_code == 200
    assert made.json()["deadline_s"] - made.json()["at_s"] == 120.0
    assert wrong.status_code == 400
    assert "spot-interruption" in wrong.json()["error"]
    assert negative.status_code == 400
    assert fault.status_code == 400
    assert missing.status_code == 404
    assert len(state["notices"]) == 1


def test_metadata_server_refuses_unknown_cloud() -> None:
    with pytest.raises(ValueError, match="is not one of"):
        MetadataServer("oracle")


def test_cli_metadata_server_rejects_bad_options() -> None:
    result = CliRunner().invoke(
        dev, ["metadata-server", "--cloud", "aws", "--notice-in", "-1"]
    )
    assert isinstance(result.exception, ConfigError)
    assert "--notice-in" in str(result.exception)


def test_cli_metadata_server_prints_url_serves_and_stops_on_sigterm() -> None:
    code = "import sys; from gpufleet.cli.dev import dev; dev(sys.argv[1:])"
    args = ["metadata-server", "--cloud", "aws", "--notice-in", "0"]
    args += ["--instance-id", "i-0aaaabbbbccccdddd"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        with httpx.Client(base_url=url) as client:
            token = client.put(TOKEN, headers={TTL: "60"}).text
            headers = {"X-aws-ec2-metadata-token": token}
            spot = client.get("/latest/meta-data/spot/instance-action", headers=headers)
            iid = client.get("/latest/meta-data/instance-id", headers=headers)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert url.startswith("http://127.0.0.1:")
    assert json.loads(spot.text)["action"] == "terminate"
    assert iid.text == "i-0aaaabbbbccccdddd"
    assert proc.returncode == 0
    assert out == ""
    assert "metadata_server.started" in err
    assert "metadata_server.stopped" in err


def test_a_client_that_resets_its_connection_prints_no_traceback(
    gcp: MetadataServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """An agent stopped while its request is answered (its instance was
    taken) leaves the server quiet and serving."""
    host, port = gcp.url.removeprefix("http://").split(":")
    for delay_s in (0.0, 0.3):
        # Mid-answer, and between two requests of a kept-alive connection.
        gcp.set_fault("slow", delay_s=delay_s)
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            b"GET /computeMetadata/v1/instance/id HTTP/1.1\r\n"
            b"Host: metadata\r\nMetadata-Flavor: Google\r\n\r\n"
        )
        if not delay_s:
            sock.recv(4096)
        # Linger 0: close() resets the connection, as a killed process's does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        time.sleep(0.5)
    gcp.set_fault("ok")
    answer = httpx.get(
        f"{gcp.url.rstrip('/')}/computeMetadata/v1/instance/id",
        headers={"Metadata-Flavor": "Google"},
    )
    assert answer.status_code == 200
    assert "Traceback" not in capfd.readouterr().err
