"""A small GCE Compute REST server on 127.0.0.1 for tests of the GCE actions.

It serves the paths that google-cloud-compute's ``InstancesClient`` uses
(instances insert/list/get/stop/start/delete and zone operations get/wait),
keeps each instance in memory and answers errors in GCE's JSON shape, so the
real client library talks to it. ``FakeGce.deny`` makes one verb answer 403,
``FakeGce.fail_operations`` makes operations finish with an error, and
``FakeGce.fail_insert`` makes inserts in a zone fail, at the request or in
the operation (as GCE reports a stockout).
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
from urllib.parse import parse_qs, urlsplit

_PREFIX = "/compute/v1/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)"
_INSTANCE = re.compile(_PREFIX + r"/instances/(?P<name>[^/:]+)(?:/(?P<verb>\w+))?$")
_INSTANCES = re.compile(_PREFIX + r"/instances$")
# One ``labels.KEY = VALUE`` term of an instances.list filter.
_LABEL_TERM = re.compile(r'labels\.([a-z0-9_-]+)\s*=\s*"?([^"\s)]*)"?')
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
        # zone -> (reason code, message, "request" | "operation", HTTP status)
        self.insert_faults: dict[str, tuple[str, str, str, int]] = {}
        # requestId -> the operation its first insert made
        self.request_ids: dict[str, dict[str, Any]] = {}
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

    def fail_insert(
        self,
        zone: str,
        code: str,
        message: str,
        at: str = "operation",
        *,
        http_status: int = 0,
    ) -> None:
        """Makes inserts in ``zone`` fail with the reason ``code``.

        Args:
            at: "request" answers the insert itself with an HTTP error (as GCE
                does for quota), "operation" accepts it and ends its operation
                DONE with the error (as GCE does for a stockout).
            http_status: the HTTP status; by default 403 for quota reasons,
                503 for resource pool exhaustion and 400 otherwise.
        """
        if at not in ("request", "operation"):
            raise ValueError(f"at must be 'request' or 'operation', got {at!r}")
        if not http_status:
            lowered = code.lower()
            http_status = 403 if "quota" in lowered else 400
            if "exhausted" in lowered:
                http_status = 503
        with self._lock:
            self.insert_faults[zone] = (code, message, at, http_status)

    def body_of(self, project: str, zone: str, name: str) -> dict[str, Any] | None:
        """The instance as inserted (labels, metadata, scheduling...)."""
        with self._lock:
            instance = self.instances.get((project, zone, name))
            return None if instance is None else json.loads(json.dumps(instance))

    def handle(
        self, method: str, path: str, query: str = "", body: bytes = b""
    ) -> tuple[int, dict[str, Any]]:
        """Answers one request with (HTTP status, JSON body)."""
        with self._lock:
            self.requests.append(f"{method} {path}")
            match = _INSTANCES.match(path)
            if match is not None:
                params = {k: v[0] for k, v in parse_qs(query).items()}
                if method == "POST":
                    return self._insert(**match.groupdict(), params=params, body=body)
                if method == "GET":
                    return self._list(**match.groupdict(), params=params)
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

    def _insert(
        self, project: str, zone: str, params: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        request_id = params.get("requestId", "")
        if request_id and request_id in self.request_ids:
            return 200, dict(self.request_ids[request_id])
        if "insert" in self.denied:
            return _error(
                403,
                f"Required 'compute.instances.create' permission for "
                f"'projects/{project}/zones/{zone}/instances'",
                "forbidden",
            )
        fault = self.insert_faults.get(zone)
        if fault is not None and fault[2] == "request":
            return _error(fault[3], fault[1], fault[0])
        resource = json.loads(body or b"{}")
        name = str(resource.get("name", ""))
        key = (project, zone, name)
        if key in self.instances:
            return _error(
                409,
                f"The resource 'projects/{project}/zones/{zone}/instances/"
                f"{name}' already exists",
                "alreadyExists",
            )
        instance = {
            **resource,
            "kind": "compute#instance",
            "id": str(next(self._ids)),
            "status": "PROVISIONING",
            "zone": f"projects/{project}/zones/{zone}",
        }
        operation = self._new_operation(key, "insert")
        if fault is not None:
            self.operations[(project, zone, operation["name"])]["fault"] = fault
        else:
            self.instances[key] = instance
        if request_id:
            self.request_ids[request_id] = operation
        return 200, operation

    def _list(
        self, project: str, zone: str, params: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        text = params.get("filter", "")
        if " OR " in text.upper():
            return _error(400, f"The fake does not serve OR in {text!r}", "invalid")
        terms = _LABEL_TERM.findall(text)
        if text and not terms:
            return _error(400, f"Invalid list filter expression {text!r}", "invalid")
        items = [
            dict(instance)
            for (p, z, _), instance in self.instances.items()
            if (p, z) == (project, zone)
            and all(instance.get("labels", {}).get(k) == v for k, v in terms)
        ]
        return 200, {"kind": "compute#instanceList", "items": items}

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
            fault = entry.get("fault")
            if fault is not None:
                operation["httpErrorStatusCode"] = fault[3]
                operation["httpErrorMessage"] = "SERVICE UNAVAILABLE"
                operation["error"] = {
                    "errors": [{"code": fault[0], "message": fault[1]}]
                }
            elif self.operation_error is not None:
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
        if action == "insert":
            if key in self.instances:
                self.instances[key]["status"] = "RUNNING"
        elif action == "delete":
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
            data_in = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            code, body = fake.handle(self.command, parts.path, parts.query, data_in)
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
