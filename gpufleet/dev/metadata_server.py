"""A local cloud metadata service: AWS IMDSv2, GCP metadata server or Azure IMDS.

Run by ``gpufleet dev metadata-server``, by the tests and by the demo, in a
thread of that process. It speaks the cloud's documented protocol (IMDSv2
session tokens with an enforced TTL, GCP hanging GETs with ETags, Azure
Scheduled Events with DocumentIncarnation and StartRequests) and can announce
a notice at a chosen moment, so a preemption can be rehearsed on any host.
The three protocols share the notice schedule, faults and control endpoint,
which is why they live in one module.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

log = structlog.stdlib.get_logger(__name__)

CLOUDS = ("aws", "gcp", "azure")
CONTROL_PREFIX = "/_gpufleet/"
FAULT_MODES = ("ok", "slow", "garbled", "error", "unauthorized")
# Notice windows the clouds document: AWS two minutes, GCP and Azure Spot
# about 30 s; Azure reboots are announced at least 15 minutes ahead.
DEFAULT_WINDOW_S = {
    ("aws", "spot-interruption"): 120.0,
    ("aws", "rebalance-recommendation"): 0.0,
    ("aws", "maintenance"): 3600.0,
    ("gcp", "preempted"): 30.0,
    ("gcp", "maintenance"): 60.0,
    ("azure", "preempted"): 30.0,
    ("azure", "maintenance"): 900.0,
    ("azure", "info"): 0.0,
}
KIND_ALIASES = {
    ("gcp", "spot-interruption"): "preempted",
    ("azure", "spot-interruption"): "preempted",
    ("azure", "freeze"): "info",
}
DEFAULT_ACTION = {
    ("aws", "spot-interruption"): "terminate",
    ("aws", "rebalance-recommendation"): "rebalance",
    ("aws", "maintenance"): "instance-stop",
    ("gcp", "preempted"): "TRUE",
    ("gcp", "maintenance"): "TERMINATE_ON_HOST_MAINTENANCE",
    ("azure", "preempted"): "Preempt",
    ("azure", "maintenance"): "Reboot",
    ("azure", "info"): "Freeze",
}
DEFAULT_KIND = {"aws": "spot-interruption", "gcp": "preempted", "azure": "preempted"}
IDENTITY_DEFAULTS = {
    "aws": ("i-0123456789abcdef0", "p5.48xlarge", "us-east-1", "us-east-1a"),
    "gcp": ("4520031799277581759", "a3-highgpu-8g", "us-central1", "us-central1-a"),
    "azure": (
        "02aab8a4-74ef-476e-8182-f6d2ba4166a6",
        "Standard_ND96isr_H100_v5",
        "westeurope",
        "1",
    ),
}
AWS_404 = (
    '<?xml version="1.0" encoding="iso-8859-1"?>\n<!DOCTYPE html>\n<html><head>'
    "<title>404 - Not Found</title></head><body><h1>404 - Not Found</h1>"
    "</body></html>\n"
)
GARBLED_BODY = b"\x00\xff\xfe<html>{garbage"

Answer = tuple[int, bytes, dict[str, str]]


@dataclass
class Notice:
    """A notice on the schedule; visible from ``at_s`` on (server clock)."""

    notice_id: int
    kind: str
    action: str
    at_s: float
    deadline_s: float
    moving_time: bool = False
    started: bool = False


@dataclass(frozen=True)
class Request:
    """One request the server answered, for tests to inspect."""

    method: str
    path: str
    status: int
    at_s: float
    token_age_s: float | None = None


def _iso(epoch_s: float) -> str:
    moment = datetime.fromtimestamp(epoch_s, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _aws_layout(epoch_s: float) -> str:
    moment = datetime.fromtimestamp(epoch_s, UTC)
    return f"{moment.day} {moment:%b %Y %H:%M:%S} GMT"


def _rfc1123(epoch_s: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(epoch_s, UTC), True)


class _QuietServer(ThreadingHTTPServer):
    """A client that goes away mid-answer (an agent stopped with its
    instance) is routine here: logged, not printed as a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            log.debug(
                "metadata.client_gone", client=str(client_address), error=str(exc)
            )
            return
        log.exception("metadata.handler_failed", client=str(client_address))


class MetadataServer:
    """One cloud's metadata service on a loopback port, served from a thread.

    Args:
        cloud: "aws", "gcp" or "azure".
        host: address to bind; keep it on loopback, as the control endpoint
            has no authentication.
        port: port to bind; 0 picks a free one.
        instance_id: AWS instance id, GCP numeric id or Azure vmId.
        instance_type: instance type, machine type or VM size.
        region: region (Azure: location).
        zone: zone.
        spot: whether the instance is spot / preemptible.
        vm_name: Azure compute name (matched against event Resources) and
            GCP instance name.
        token_ttl_max_s: the longest IMDSv2 token TTL granted (AWS: 21600).
        notice_in_s: schedule the cloud's default notice this long after
            ``start``.
        clock: epoch-seconds clock for tokens and the schedule (fake in tests).
        azure_first_call_delay_s: how long the first Scheduled Events call
            takes (Azure enables the service then).
    """

    def __init__(
        self,
        cloud: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        instance_id: str | None = None,
        instance_type: str | None = None,
        region: str | None = None,
        zone: str | None = None,
        spot: bool = True,
        vm_name: str = "gpufleet-dev-vm",
        token_ttl_max_s: int = 21600,
        notice_in_s: float | None = None,
        clock: Callable[[], float] = time.time,
        azure_first_call_delay_s: float = 0.0,
    ) -> None:
        if cloud not in CLOUDS:
            raise ValueError(f"cloud {cloud!r} is not one of {', '.join(CLOUDS)}")
        defaults = IDENTITY_DEFAULTS[cloud]
        self.cloud = cloud
        self.instance_id = instance_id or defaults[0]
        self.instance_type = instance_type or defaults[1]
        self.region = region or defaults[2]
        # GCP has no region path: readers take it from the zone's name.
        suffix = {"aws": "a", "gcp": "-a", "azure": ""}[cloud]
        self.zone = zone or (f"{region}{suffix}" if region and suffix else defaults[3])
        self.spot = spot
        self.vm_name = vm_name
        self.token_ttl_max_s = token_ttl_max_s
        self.notice_in_s = notice_in_s
        self.clock = clock
        self.azure_first_call_delay_s = azure_first_call_delay_s
        self.requests: list[Request] = []
        self.acknowledged: list[str] = []
        self.fault = "ok"
        self.fault_delay_s = 2.0
        self.fault_body: bytes = GARBLED_BODY
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._notices: list[Notice] = []
        self._raw: dict[str, tuple[int, str]] = {}
        self._tokens: dict[str, tuple[float, float]] = {}  # token -> issued, ttl
        self._azure_doc: tuple[str, int] = ("", 0)  # events JSON, incarnation
        self._azure_enabled = False
        self._server = _QuietServer((host, port), self._handler())
        self._server.daemon_threads = True
        # A short poll keeps shutdown() from waiting serve_forever's 0.5 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(0.01,),
            name=f"metadata-server-{cloud}",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        """Starts serving; returns the base URL."""
        if self.notice_in_s is not None:
            self.schedule_notice(in_s=self.notice_in_s)
        self._thread.start()
        log.info("metadata_server.started", cloud=self.cloud, url=self.url)
        return self.url

    def stop(self) -> None:
        """Stops serving; hanging requests are answered at once."""
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()
        log.info("metadata_server.stopped", cloud=self.cloud)

    # Control: the Python API behind the /_gpufleet/ endpoints.

    def schedule_notice(
        self,
        kind: str | None = None,
        *,
        in_s: float = 0.0,
        deadline_in_s: float | None = None,
        action: str | None = None,
        moving_time: bool = False,
    ) -> Notice:
        """Announces a notice ``in_s`` seconds from now.

        Args:
            kind: "spot-interruption", "rebalance-recommendation" (AWS),
                "preempted", "maintenance", or "freeze" (Azure); the cloud's
                spot notice when None.
            in_s: seconds until the notice is visible.
            deadline_in_s: seconds from its appearance to the host's end;
                the cloud's documented window when None.
            action: AWS spot action or scheduled-event code, GCP
                maintenance-event value, Azure EventType.
            moving_time: AWS spot time = request time + window on every GET,
                as amazon-ec2-metadata-mock does (case 02).

        Raises:
            ValueError: the kind does not exist on this cloud, or a time is
                negative.
        """
        name = kind or DEFAULT_KIND[self.cloud]
        name = KIND_ALIASES.get((self.cloud, name), name)
        if (self.cloud, name) not in DEFAULT_WINDOW_S:
            known = sorted(k for c, k in DEFAULT_WINDOW_S if c == self.cloud)
            raise ValueError(
                f"notice kind {kind!r} does not exist on {self.cloud}: "
                f"use one of {', '.join(known)}"
            )
        if in_s < 0 or (deadline_in_s is not None and deadline_in_s < 0):
            raise ValueError(f"in_s {in_s} and deadline_in_s must be >= 0")
        window_s = DEFAULT_WINDOW_S[(self.cloud, name)]
        window_s = window_s if deadline_in_s is None else deadline_in_s
        with self._changed:
            at_s = self.clock() + in_s
            notice = Notice(
                notice_id=len(self._notices) + 1,
                kind=name,
                action=action or DEFAULT_ACTION[(self.cloud, name)],
                at_s=at_s,
                deadline_s=at_s + window_s,
                moving_time=moving_time,
                started=name == "info",
            )
            self._notices.append(notice)
            self._changed.notify_all()
        log.info(
            "metadata_server.notice_scheduled",
            cloud=self.cloud,
            kind=notice.kind,
            action=notice.action,
            in_s=in_s,
            deadline=_iso(notice.deadline_s),
        )
        return notice

    def set_raw(self, path: str, body: Any, status: int = 200) -> None:
        """Answers ``path`` (full request path) with this body; None undoes it.

        A body that is not text is sent as its JSON.
        """
        if body is not None and not isinstance(body, str):
            body = json.dumps(body)
        with self._changed:
            if body is None:
                self._raw.pop(path, None)
            else:
                self._raw[path] = (status, body)
            self._changed.notify_all()

    def set_fault(
        self, mode: str, *, delay_s: float = 2.0, body: str | None = None
    ) -> None:
        """Makes cloud paths misbehave: slow, garbled, 500s, or 401s (AWS)."""
        if mode not in FAULT_MODES:
            raise ValueError(f"fault {mode!r} is not one of {', '.join(FAULT_MODES)}")
        self.fault, self.fault_delay_s = mode, delay_s
        self.fault_body = GARBLED_BODY if body is None else body.encode()
        log.info("metadata_server.fault", cloud=self.cloud, mode=mode)

    def expire_tokens(self) -> None:
        """Forgets every IMDSv2 token, as if all had reached their TTL."""
        with self._changed:
            self._tokens.clear()

    def clear(self) -> None:
        """Removes every notice and raw answer; faults are reset."""
        with self._changed:
            self._notices.clear()
            self._raw.clear()
            self._changed.notify_all()
        self.set_fault("ok")

    def state(self) -> dict[str, Any]:
        with self._changed:
            return {
                "cloud": self.cloud,
                "now_s": self.clock(),
                "notices": [asdict(n) for n in self._notices],
                "acknowledged": list(self.acknowledged),
                "requests_total": len(self.requests),
                "fault": self.fault,
            }

    # Answers. Each runs with self._changed held, except waits.

    def _active(self, kind: str) -> list[Notice]:
        now_s = self.clock()
        return [n for n in self._notices if n.kind == kind and n.at_s <= now_s]

    def _answer(
        self, method: str, path: str, query: dict[str, str], headers: Any, body: bytes
    ) -> tuple[Answer, float | None]:
        if self.fault == "slow":
            self._stopping.wait(self.fault_delay_s)
        if self.fault == "error":
            return (500, b"Internal Server Error", {}), None
        if self.fault == "garbled":
            return (200, self.fault_body, self._flavor()), None
        if self.cloud == "aws":
            return self._aws(method, path, headers)
        if self.cloud == "gcp":
            return self._gcp(method, path, query, headers), None
        return self._azure(method, path, query, headers, body), None

    def _flavor(self) -> dict[str, str]:
        return {"Metadata-Flavor": "Google"} if self.cloud == "gcp" else {}

    def _aws(self, method: str, path: str, headers: Any) -> tuple[Answer, float | None]:
        if path == "/latest/api/token":
            return self._aws_token(method, headers), None
        token = headers.get("X-aws-ec2-metadata-token", "")
        with self._changed:
            issued = self._tokens.get(token)
            now_s = self.clock()
            if issued is None or now_s >= issued[0] + issued[1]:
                self._tokens.pop(token, None)
                return (401, b"", {}), None
            age_s = now_s - issued[0]
            if self.fault == "unauthorized":
                return (401, b"", {}), age_s
            if method != "GET":
                return (405, b"Method Not Allowed", {}), age_s
            status, text = self._aws_value(path.removeprefix("/latest/meta-data/"))
        return (status, text.encode(), {"Content-Type": "text/plain"}), age_s

    def _aws_token(self, method: str, headers: Any) -> Answer:
        if method != "PUT":
            return 405, b"Method Not Allowed", {}
        if headers.get("X-Forwarded-For"):
            return 403, b"Forbidden", {}
        try:
            ttl_s = int(headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
        except ValueError:
            return 400, b"Bad Request", {}
        if not 1 <= ttl_s <= self.token_ttl_max_s:
            return 400, b"Bad Request", {}
        token = secrets.token_urlsafe(32)
        with self._changed:
            self._tokens[token] = (self.clock(), float(ttl_s))
        return 200, token.encode(), {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl_s)}

    def _aws_value(self, key: str) -> tuple[int, str]:
        raw = self._raw.get(f"/latest/meta-data/{key}")
        if raw is not None:
            return raw
        identity = {
            "instance-id": self.instance_id,
            "instance-type": self.instance_type,
            "placement/region": self.region,
            "placement/availability-zone": self.zone,
            "instance-life-cycle": "spot" if self.spot else "on-demand",
            "hostname": f"ip-10-0-0-1.{self.region}.compute.internal",
        }
        if key in identity:
            return 200, identity[key]
        spot = self._active("spot-interruption")
        if key == "spot/instance-action" and spot:
            notice = spot[0]
            window_s = notice.deadline_s - notice.at_s
            when_s = (
                self.clock() + window_s if notice.moving_time else notice.deadline_s
            )
            return 200, json.dumps({"action": notice.action, "time": _iso(when_s)})
        if key == "spot/termination-time" and spot:
            return 200, _iso(spot[0].deadline_s)
        rebalance = self._active("rebalance-recommendation")
        if key == "events/recommendations/rebalance" and rebalance:
            return 200, json.dumps({"noticeTime": _iso(rebalance[0].at_s)})
        if key == "events/maintenance/scheduled":
            events = [
                {
                    "NotBefore": _aws_layout(n.deadline_s),
                    "Code": n.action,
                    "Description": "scheduled by gpufleet dev metadata-server",
                    "EventId": f"instance-event-{n.notice_id:017x}",
                    "NotAfter": _aws_layout(n.deadline_s + 7200),
                    "State": "active",
                }
                for n in self._active("maintenance")
            ]
            return 200, json.dumps(events, indent=1)
        return 404, AWS_404

    def _gcp_value(self, key: str) -> tuple[int, str]:
        raw = self._raw.get(f"/computeMetadata/v1/{key}")
        if raw is not None:
            return raw
        maintenance = self._active("maintenance")
        values = {
            "instance/id": self.instance_id,
            "instance/name": self.vm_name,
            "instance/hostname": f"{self.vm_name}.{self.zone}.c.lab-training.internal",
            "instance/zone": f"projects/123456789012/zones/{self.zone}",
            "instance/machine-type": (
                f"projects/123456789012/machineTypes/{self.instance_type}"
            ),
            "instance/scheduling/provisioning-model": "SPOT"
            if self.spot
            else "STANDARD",
            "instance/scheduling/preemptible": "TRUE" if self.spot else "FALSE",
            "project/project-id": "lab-training",
            "project/numeric-project-id": "123456789012",
            "instance/preempted": "TRUE" if self._active("preempted") else "FALSE",
            "instance/maintenance-event": (
                maintenance[0].action if maintenance else "NONE"
            ),
        }
        if key in values:
            return 200, values[key]
        return 404, "Not Found"

    def _gcp(
        self, method: str, path: str, query: dict[str, str], headers: Any
    ) -> Answer:
        if headers.get("Metadata-Flavor") != "Google" or headers.get("X-Forwarded-For"):
            return 403, b"Missing Metadata-Flavor:Google header.", {}
        if method != "GET":
            return 405, b"Method Not Allowed", {}
        key = path.removeprefix("/computeMetadata/v1/")
        wait = query.get("wait_for_change", "").lower() == "true"
        last_etag = query.get("last_etag")
        try:
            wait_s = min(float(query.get("timeout_sec", 300)), 3600.0)
        except ValueError:
            return 400, b"timeout_sec must be a number", {}
        deadline = time.monotonic() + wait_s
        with self._changed:
            status, text = self._gcp_value(key)
            etag = hashlib.sha256(text.encode()).hexdigest()[:16]
            target = last_etag or etag
            # A hanging GET returns at once when last_etag is already stale,
            # else when the value changes or timeout_sec passes. The slices
            # let a scheduled notice (server clock) show up without a timer.
            while wait and etag == target and not self._stopping.is_set():
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    break
                self._changed.wait(min(left_s, 0.02))
                status, text = self._gcp_value(key)
                etag = hashlib.sha256(text.encode()).hexdigest()[:16]
        headers_out = {"Metadata-Flavor": "Google", "ETag": etag}
        headers_out["Content-Type"] = "application/text"
        return status, text.encode(), headers_out

    def _azure(
        self, method: str, path: str, query: dict[str, str], headers: Any, body: bytes
    ) -> Answer:
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        if headers.get("Metadata") != "true" or headers.get("X-Forwarded-For"):
            error = {"error": "Bad request. Required metadata header not specified"}
            return 400, json.dumps(error).encode(), json_type
        if "api-version" not in query:
            error = {"error": "Bad request. api-version was not specified"}
            return 400, json.dumps(error).encode(), json_type
        if path == "/metadata/scheduledevents":
            if method == "POST":
                return self._azure_ack(body)
            if not self._azure_enabled:
                self._stopping.wait(self.azure_first_call_delay_s)
                self._azure_enabled = True
            with self._changed:
                status, text = self._azure_events()
            return status, text.encode(), json_type
        compute = {
            "vmId": self.instance_id,
            "name": self.vm_name,
            "location": self.region,
            "zone": self.zone,
            "vmSize": self.instance_type,
            "priority": "Spot" if self.spot else "Regular",
            "azEnvironment": "AzurePublicCloud",
        }
        if path == "/metadata/instance":
            document = {"compute": compute, "network": {"interface": []}}
            return 200, json.dumps(document).encode(), json_type
        field = path.removeprefix("/metadata/instance/compute/")
        if field in compute:
            if query.get("format") == "text":
                return 200, str(compute[field]).encode(), {"Content-Type": "text/plain"}
            return 200, json.dumps(compute[field]).encode(), json_type
        return 404, json.dumps({"error": "Not found"}).encode(), json_type

    def _azure_events(self) -> tuple[int, str]:
        raw = self._raw.get("/metadata/scheduledevents")
        if raw is not None:
            return raw
        events = []
        for notice in self._notices:
            if notice.at_s > self.clock():
                continue
            events.append(
                {
                    "EventId": str(uuid.UUID(int=notice.notice_id)).upper(),
                    "EventStatus": "Started" if notice.started else "Scheduled",
                    "EventType": notice.action,
                    "ResourceType": "VirtualMachine",
                    "Resources": [self.vm_name],
                    "NotBefore": "" if notice.started else _rfc1123(notice.deadline_s),
                    "Description": "",
                    "EventSource": "Platform",
                    "DurationInSeconds": 6 if notice.action == "Freeze" else -1,
                }
            )
        # The incarnation changes whenever the list of events changes.
        text = json.dumps(events)
        previous, incarnation = self._azure_doc
        if text != previous:
            incarnation += 1
            self._azure_doc = (text, incarnation)
        return 200, json.dumps({"DocumentIncarnation": incarnation, "Events": events})

    def _azure_ack(self, body: bytes) -> Answer:
        try:
            requests = json.loads(body)["StartRequests"]
            event_ids = [str(item["EventId"]) for item in requests]
        except (ValueError, KeyError, TypeError):
            error = {"error": "Bad request. Expected {'StartRequests': [{'EventId'}]}"}
            return 400, json.dumps(error).encode(), {}
        with self._changed:
            self.acknowledged.extend(event_ids)
            for notice in self._notices:
                if str(uuid.UUID(int=notice.notice_id)).upper() in event_ids:
                    notice.started = True
            self._changed.notify_all()
        log.info("metadata_server.acknowledged", event_ids=",".join(event_ids))
        return 200, b"", {}

    def _control(self, method: str, path: str, body: bytes) -> Answer:
        name = path.removeprefix(CONTROL_PREFIX)
        try:
            args = json.loads(body) if body.strip() else {}
            if not isinstance(args, dict):
                raise ValueError("the body must be a JSON object")
            if method == "GET" and name == "state":
                result: Any = self.state()
            elif method != "POST":
                raise ValueError(f"{method} {path} is not a control request")
            elif name == "notice":
                result = asdict(
                    self.schedule_notice(
                        args.get("kind"),
                        in_s=float(args.get("in_s", 0.0)),
                        deadline_in_s=_float_or_none(args.get("deadline_in_s")),
                        action=args.get("action"),
                        moving_time=bool(args.get("moving_time", False)),
                    )
                )
            elif name == "raw":
                self.set_raw(
                    str(args["path"]), args.get("body"), int(args.get("status", 200))
                )
                result = {"ok": True}
            elif name == "fault":
                self.set_fault(
                    str(args.get("mode", "ok")),
                    delay_s=float(args.get("delay_s", 2.0)),
                    body=args.get("body"),
                )
                result = {"ok": True}
            elif name == "expire-tokens":
                self.expire_tokens()
                result = {"ok": True}
            elif name == "clear":
                self.clear()
                result = {"ok": True}
            else:
                return (
                    404,
                    json.dumps({"error": f"no control endpoint {path}"}).encode(),
                    {},
                )
        except KeyError as exc:
            return 400, json.dumps({"error": f"missing field {exc}"}).encode(), {}
        except (ValueError, TypeError) as exc:
            return 400, json.dumps({"error": str(exc)}).encode(), {}
        return 200, json.dumps(result).encode(), {"Content-Type": "application/json"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in two writes; Nagle plus delayed ACK
            # would add 40 ms to every answer.
            disable_nagle_algorithm = True

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = 0
                body = self.rfile.read(length) if length else b""
                token_age_s = None
                if parts.path.startswith(CONTROL_PREFIX):
                    answer = server._control(self.command, parts.path, body)
                else:
                    answer, token_age_s = server._answer(
                        self.command, parts.path, query, self.headers, body
                    )
                status, payload, extra = answer
                server.requests.append(
                    Request(
                        self.command, self.path, status, server.clock(), token_age_s
                    )
                )
                log.debug(
                    "metadata_server.request",
                    method=self.command,
                    path=self.path,
                    status=status,
                )
                try:
                    self.send_response(status)
                    for key, value in extra.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    self.close_connection = True  # the client gave up waiting

            do_GET = _serve
            do_PUT = _serve
            do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are logged through structlog above

        return Handler


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
