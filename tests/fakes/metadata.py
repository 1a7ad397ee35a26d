"""Fake cloud instance metadata services on 127.0.0.1, speaking real HTTP.

``MetadataServer`` serves one cloud's protocol: AWS IMDSv2 (a PUT for a token,
GETs without a valid token get 401), GCP (requests without
``Metadata-Flavor: Google`` get 403) or Azure IMDS (requests without
``Metadata: true`` get 400). ``mode`` makes it slow or garbled.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

AWS_TOKEN = "AQAEAFakeTokenForTests=="

AWS_DEFAULT = {
    "instance-id": "i-0abc1234def567890",
    "instance-type": "p5.48xlarge",
    "placement/region": "us-east-1",
    "placement/availability-zone": "us-east-1a",
    "instance-life-cycle": "spot",
}
GCP_DEFAULT = {
    "instance/id": "4520031799277581759",
    "instance/zone": "projects/123456789012/zones/us-central1-a",
    "instance/machine-type": "projects/123456789012/machineTypes/a3-highgpu-8g",
    "instance/scheduling/provisioning-model": "SPOT",
    "instance/scheduling/preemptible": "TRUE",
    "project/project-id": "lab-training",
}
AZURE_DEFAULT: dict[str, Any] = {
    "compute": {
        "vmId": "02aab8a4-74ef-476e-8182-f6d2ba4166a6",
        "location": "westeurope",
        "zone": "2",
        "vmSize": "Standard_ND96isr_H100_v5",
        "priority": "Spot",
        "name": "gpu-vm-1",
    }
}


class MetadataServer:
    """One cloud's metadata service in a thread.

    Args:
        cloud: "aws", "gcp" or "azure".
        values: the answers (path -> text for AWS and GCP, the instance JSON
            document for Azure); the cloud's defaults when None.
        mode: "ok", "slow" (answers after ``delay_s``), "slow-after-first"
            (the first request at once, every later one after ``delay_s``:
            a busy service) or "garbled" (answers 200 with nonsense).
    """

    def __init__(
        self,
        cloud: str,
        values: Any = None,
        *,
        mode: str = "ok",
        delay_s: float = 2.0,
    ) -> None:
        defaults = {"aws": AWS_DEFAULT, "gcp": GCP_DEFAULT, "azure": AZURE_DEFAULT}
        self.cloud = cloud
        self.values = values if values is not None else defaults[cloud]
        self.mode = mode
        self.delay_s = delay_s
        self.requests: list[tuple[str, str, int]] = []
        self.arrived = 0
        self.lock = threading.Lock()
        self.stop_waiting = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # A short poll keeps shutdown() from costing serve_forever's 0.5 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.01,), daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> MetadataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_waiting.set()
        self._server.shutdown()
        self._server.server_close()

    def _answer(
        self, method: str, path: str, headers: Any, *, first: bool = True
    ) -> tuple[int, str, dict[str, str]]:
        if self.mode == "slow" or (self.mode == "slow-after-first" and not first):
            self.stop_waiting.wait(self.delay_s)
        if self.mode == "garbled":
            return 200, "\x00<html>garbage{", {}
        if self.cloud == "aws":
            return self._aws(method, path, headers)
        if self.cloud == "gcp":
            return self._gcp(method, path, headers)
        return self._azure(method, path, headers)

    def _aws(
        self, method: str, path: str, headers: Any
    ) -> tuple[int, str, dict[str, str]]:
        if path == "/latest/api/token":
            if method != "PUT" or not headers.get(
                "X-aws-ec2-metadata-token-ttl-seconds"
            ):
                return 400, "Bad Request", {}
            return 200, AWS_TOKEN, {}
        if headers.get("X-aws-ec2-metadata-token") != AWS_TOKEN:
            return 401, "Unauthorized", {}
        key = path.removeprefix("/latest/meta-data/")
        if method == "GET" and key in self.values:
            return 200, self.values[key], {}
        return 404, "Not Found", {}

    def _gcp(
        self, method: str, path: str, headers: Any
    ) -> tuple[int, str, dict[str, str]]:
        if headers.get("Metadata-Flavor") != "Google":
            return 403, "Missing Metadata-Flavor:Google header.", {}
        key = path.removeprefix("/computeMetadata/v1/")
        if method == "GET" and key in self.values:
            return 200, self.values[key], {"Metadata-Flavor": "Google"}
        return 404, "Not Found", {"Metadata-Flavor": "Google"}

    def _azure(
        self, method: str, path: str, headers: Any
    ) -> tuple[int, str, dict[str, str]]:
        if headers.get("Metadata") != "true":
            return (
                400,
                json.dumps(
                    {"error": "Bad request. Required metadata header not specified"}
                ),
                {},
            )
        if method == "GET" and path == "/metadata/instance":
            return 200, json.dumps(self.values), {"Content-Type": "application/json"}
        return 404, "Not Found", {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                path = urlsplit(self.path).path
                with server.lock:
                    first = server.arrived == 0
                    server.arrived += 1
                status, body, extra = server._answer(
                    self.command, path, self.headers, first=first
                )
                server.requests.append((self.command, self.path, status))
                payload = body.encode()
                try:
                    self.send_response(status)
                    for key, value in extra.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (the slow mode's purpose)

            do_GET = _serve
            do_PUT = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@contextmanager
def metadata_server(
    cloud: str, values: Any = None, **kwargs: Any
) -> Iterator[MetadataServer]:
    """Runs a MetadataServer for the duration of a with block."""
    server = MetadataServer(cloud, values, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


def closed_port_url() -> str:
    """A loopback URL on which nothing listens (connection refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
