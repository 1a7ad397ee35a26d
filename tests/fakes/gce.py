"""A small GCE Compute REST server on 127.0.0.1 for tests of the GCE actions.

It serves the paths that google-cloud-compute's ``InstancesClient`` uses
(instances get/stop/start/delete and zone operations get/wait), keeps each
instance's status in memory and answers errors in GCE's JSON shape, so the
real client library talks to it. ``FakeGce.deny`` makes one verb answer 403,
and ``FakeGce.fail_operations`` makes operations finish with an error.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_PREFIX = "/compute/v1/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)"
_INSTANCE = re.compile(_PREFIX + r"/instances/(?P<name>[^/:]+)(?:/(?P<verb>\w+))?$")
_OPERATION = re.compile(_PREFIX + r"/operations/(?P<op>[^/]+)(?:/wait)?$")

# What each verb does to an instance's status, as GCE reports it when the
# operation is DONE.
_TRANSITIONS = {"stop": "TERMINATED", "start": "RUNNING"}


class FakeGce:
    """In-memory GCE instances behind a real HTTP server.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``, for ``ClientOptions``.
        requests: every request seen, as ``"METHOD path"``.
    """

    def __init__(self) -> None:
        self.instances: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.operations: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.requests: list[str] = []
        self.denied: set[str] = set()
        self.operation_error: str | None = None
        self._ids = itertools.count(1_000_000_000_000_000)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-gce",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def add_instance(
        self, project: str, zone: str, name: str, *, status: str = "RUNNING"
    ) -> str:
        """Adds an instance and returns its numeric id, as GCE gives it."""
        instance_id = str(next(self._ids))
        with self._lock:
            self.instances[(project, zone, name)] = {
                "kind": "compute#instance",
                "id": instance_id,
                "name": name,
                "status": status,
                "zone": f"projects/{project}/zones/{zone}",
                "machineType": f"zones/{zone}/machineTypes/g2-standard-4",
            }
        return instance_id

    def status_of(self, project: str, zone: str, name: str) -> str | None:
        with self._lock:
            instance = self.instances.get((project, zone, name))
            return None if instance is None else str(instance["status"])

    def deny(self, verb: str) -> None:
        """Makes ``verb`` ("get", "stop", "start", "delete") answer 403."""
        self.denied.add(verb)

    def fail_operations(self, message: str) -> None:
        """Makes every later operation finish DONE with this error."""
        self.operation_error = message

    def handle(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        """Answers one request with (HTTP status, JSON body)."""
        with self._lock:
            self.requests.append(f"{method} {path}")
            match = _INSTANCE.match(path)
            if match is not None:
                return self._instance(method, **match.groupdict())
            match = _OPERATION.match(path)
            if match is not None and method in ("GET", "POST"):
                return self._operation(**match.groupdict())
            return _error(404, f"The URL {path} is not served by this fake", "notFound")

    def _instance(
        self, method: str, project: str, zone: str, name: str, verb: str | None
    ) -> tuple[int, dict[str, Any]]:
        key = (project, zone, name)
        action = {("GET", None): "get", ("DELETE", None): "delete"}.get(
            (method, verb), verb if method == "POST" else None
        )
        if action not in ("get", "delete", "stop", "start"):
            return _error(400, f"Unsupported {method} on instance {name}", "invalid")
        if action in self.denied:
            return _error(
                403,
                f"Required 'compute.instances.{action}' permission for "
                f"'projects/{project}/zones/{zone}/instances/{name}'",
                "forbidden",
            )
        instance = self.instances.get(key)
        if instance is None:
            return _error(
                404,
                f"The resource 'projects/{project}/zones/{zone}/instances/"
                f"{name}' was not found",
                "notFound",
            )
        if action == "get":
            return 200, dict(instance)
        return 200, self._new_operation(key, action)

    def _new_operation(self, key: tuple[str, str, str], action: str) -> dict[str, Any]:
        project, zone, name = key
        op_name = f"operation-{next(self._ids)}"
        operation: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": op_name,
            "zone": f"projects/{project}/zones/{zone}",
            "operationType": action,
            "targetLink": f"projects/{project}/zones/{zone}/instances/{name}",
            # RUNNING first, so the client polls the operation once.
            "status": "RUNNING",
        }
        self.operations[(project, zone, op_name)] = {"op": operation, "key": key}
        return dict(operation)

    def _operation(
        self, project: str, zone: str, op: str
    ) -> tuple[int, dict[str, Any]]:
        entry = self.operations.get((project, zone, op))
        if entry is None:
            return _error(
                404, f"The resource operation '{op}' was not found", "notFound"
            )
        operation = entry["op"]
        if operation["status"] != "DONE":
            operation["status"] = "DONE"
            if self.operation_error is not None:
                operation["httpErrorStatusCode"] = 400
                operation["httpErrorMessage"] = "BAD REQUEST"
                operation["error"] = {
                    "errors": [
                        {
                            "code": "UNSUPPORTED_OPERATION",
                            "message": self.operation_error,
                        }
                    ]
                }
            else:
                self._apply(entry["key"], operation["operationType"])
        return 200, dict(operation)

    def _apply(self, key: tuple[str, str, str], action: str) -> None:
        if action == "delete":
            self.instances.pop(key, None)
        elif key in self.instances:
            self.instances[key]["status"] = _TRANSITIONS[action]


def _error(code: int, message: str, reason: str) -> tuple[int, dict[str, Any]]:
    return code, {
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }


def _handler_for(fake: FakeGce) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            code, body = fake.handle(self.command, urlsplit(self.path).path)
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def running_fake_gce() -> Iterator[FakeGce]:
    """Runs a ``FakeGce`` for the duration of the block."""
    fake = FakeGce()
    fake.start()
    try:
        yield fake
    finally:
        fake.close()
