"""A fault injector in front of moto's EC2 server, on 127.0.0.1.

moto launches every instance it is asked for; real EC2 sometimes answers
``InsufficientInstanceCapacity`` and friends. ``Ec2FaultProxy`` forwards every
request to moto, except those matching a rule added with ``fail``, which it
answers with an EC2 error document itself. It also records the parameters of
every request, so tests can check what the client sent.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# EC2 reports these as server errors (HTTP 500); the rest are client errors.
_SERVER_ERRORS = {
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "InternalError",
}


@dataclass(frozen=True)
class Fault:
    """Answer ``code`` to ``action`` for this instance type and zone ("" = any)."""

    action: str
    code: str
    message: str
    instance_type: str = ""
    zone: str = ""


class Ec2FaultProxy:
    """Forwards to moto at ``upstream``, answering matching requests with faults.

    Attributes:
        url: ``http://127.0.0.1:PORT``, the endpoint for boto3.
        calls: the form parameters of every request, first value of each.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults: list[Fault] = []
        self.calls: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="ec2-faults",
            daemon=True,
        )

    def fail(
        self,
        action: str,
        code: str,
        message: str = "",
        *,
        instance_type: str = "",
        zone: str = "",
    ) -> None:
        """Makes matching ``action`` requests answer the EC2 error ``code``."""
        with self._lock:
            self.faults.append(
                Fault(
                    action, code, message or f"{code} (injected)", instance_type, zone
                )
            )

    def actions(self, action: str) -> list[dict[str, str]]:
        """The recorded parameters of every ``action`` request."""
        with self._lock:
            return [c for c in self.calls if c.get("Action") == action]

    def fault_for(self, params: dict[str, str]) -> Fault | None:
        with self._lock:
            self.calls.append(params)
            for fault in self.faults:
                if params.get("Action") != fault.action:
                    continue
                if fault.instance_type and params.get("InstanceType") != (
                    fault.instance_type
                ):
                    continue
                zone = params.get("Placement.AvailabilityZone", "")
                if fault.zone and zone != fault.zone:
                    continue
                return fault
            return None

    def forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self._upstream, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            reply = conn.getresponse()
            return reply.status, reply.getheaders(), reply.read()
        finally:
            conn.close()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def error_document(code: str, message: str) -> bytes:
    """An EC2 error response body, as the EC2 query API sends it."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code>"
        f"<Message>{message}</Message></Error></Errors>"
        "<RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>"
    ).encode()


def _handler_for(proxy: Ec2FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            query = urlsplit(self.path).query
            form = parse_qs(body.decode("utf-8", "replace")) if body else {}
            form.update(parse_qs(query))
            params = {k: v[0] for k, v in form.items()}
            fault = proxy.fault_for(params)
            if fault is not None:
                status = 500 if fault.code in _SERVER_ERRORS else 400
                data = error_document(fault.code, fault.message)
                headers = [("Content-Type", "text/xml")]
            else:
                status, headers, data = proxy.forward(
                    self.command, self.path, dict(self.headers.items()), body
                )
            self.send_response(status)
            for key, value in headers:
                if key.lower() not in ("content-length", "transfer-encoding"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def ec2_fault_proxy(upstream: str) -> Iterator[Ec2FaultProxy]:
    """Runs an ``Ec2FaultProxy`` in front of ``upstream`` for the block."""
    proxy = Ec2FaultProxy(upstream)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
