"""moto's EC2 server on 127.0.0.1 for tests of the broker's AWS actions.

``moto_ec2_url`` is a pytest fixture: it sets fake AWS credentials in the
environment, starts ``moto.server.ThreadedMotoServer`` on a free loopback
port and yields its URL. ``launch`` starts instances there with boto3.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

# Any id works in moto; this one is among the AMIs moto seeds in every region.
AMI_ID = "ami-12c6146b"


@pytest.fixture
def moto_ec2_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Yields the URL of a fresh moto server with fake credentials set."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # moto keeps its backends in the process, not in the server: a test
    # would see the instances of the tests before it without a reset.
    urllib.request.urlopen(
        urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10
    ).close()
    try:
        yield url
    finally:
        server.stop()


def launch(
    url: str,
    region: str,
    *,
    instance_type: str = "g5.xlarge",
    spot: str | None = None,
) -> str:
    """Launches one instance in moto and returns its id.

    Args:
        spot: None for on-demand, "one-time" for a one-time spot instance
            (run_instances with spot market options), "persistent" for one
            from a persistent spot request with interruption behaviour stop.
    """
    ec2 = boto3.client("ec2", region_name=region, endpoint_url=url)
    if spot == "persistent":
        reply = ec2.request_spot_instances(
            SpotPrice="10.0",
            Type="persistent",
            InstanceInterruptionBehavior="stop",
            InstanceCount=1,
            LaunchSpecification={"ImageId": AMI_ID, "InstanceType": instance_type},
        )
        return str(reply["SpotInstanceRequests"][0]["InstanceId"])
    kwargs: dict[str, object] = {}
    if spot == "one-time":
        kwargs["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {"SpotInstanceType": "one-time"},
        }
    reply = ec2.run_instances(
        ImageId=AMI_ID, MinCount=1, MaxCount=1, InstanceType=instance_type, **kwargs
    )
    return str(reply["Instances"][0]["InstanceId"])
