"""GCE instance actions for the broker, with google-cloud-compute.

One ``InstancesClient`` (REST transport) serves every project and zone; the
project and zone come from the host's identity. The client is blocking, so
each call runs in ``asyncio.to_thread``; a long-running operation is waited
for with a bounded timeout, and its final state read back.

GCE addresses an instance by its NAME, while the agent's identity carries
the numeric instance id from the metadata server. ``gce_instance_name`` takes
``instance_id`` when it is a valid name, else the first label of
``hostname`` (GCE's default hostname is ``NAME.ZONE.c.PROJECT.internal``, or
``NAME`` itself).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from typing import Any

import structlog
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import compute_v1

from gpufleet.broker.clouds.base import InstanceState
from gpufleet.errors import CloudActionError
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

# One REST call should answer within 30 s. A stop waits for the guest's
# shutdown (up to 90 s by default on GCE) before the operation is DONE, so
# operations get five minutes. zoneOperations.wait itself returns after at
# most about two minutes, DONE or not, so it is called in a loop.
RPC_TIMEOUT_S = 30.0
OPERATION_TIMEOUT_S = 300.0
WAIT_CALL_TIMEOUT_S = 150.0

# RFC 1035 label, the rule GCE applies to instance names.
_GCE_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")

_STATUS_MAP = {
    "PROVISIONING": InstanceState.PENDING,
    "STAGING": InstanceState.PENDING,
    "RUNNING": InstanceState.RUNNING,
    "STOPPING": InstanceState.STOPPING,
    "TERMINATED": InstanceState.STOPPED,
    "SUSPENDING": InstanceState.SUSPENDING,
    "SUSPENDED": InstanceState.SUSPENDED,
    "REPAIRING": InstanceState.PENDING,
}

_PERMISSIONS = {
    "stop": "compute.instances.stop",
    "start": "compute.instances.start",
    "delete": "compute.instances.delete",
    "get": "compute.instances.get",
}


def gce_instance_name(host: pb.HostIdentity) -> str:
    """Returns the GCE instance name for a host identity.

    Limitation L-011 (docs/limitations.md#l-011): the name is guessed from
    the instance id or the hostname.

    Raises:
        CloudActionError: neither ``instance_id`` nor ``hostname`` holds a
            valid GCE instance name.
    """
    if _GCE_NAME.fullmatch(host.instance_id):
        return host.instance_id
    label = host.hostname.split(".", 1)[0]
    if _GCE_NAME.fullmatch(label):
        return label
    raise _cloud_error(
        host.instance_id or host.host_id or "?",
        f"cannot tell the GCE instance name: instance_id={host.instance_id!r} "
        f"is not a name and hostname={host.hostname!r} does not start with one",
        "keep the VM's default hostname (NAME.ZONE.c.PROJECT.internal) so "
        "the broker can address it by name",
    )


def _cloud_error(
    instance: str, reason: str, hint: str | None = None
) -> CloudActionError:
    err = CloudActionError("gcp", instance, reason)
    if hint is not None:
        err.hint = hint
    return err


def _hint_for(exc: gexc.GoogleAPICallError, verb: str, where: str) -> str | None:
    if isinstance(exc, gexc.Forbidden | gexc.Unauthorized):
        return (
            f"grant the broker's service account the permission "
            f"{_PERMISSIONS[verb]} (e.g. roles/compute.instanceAdmin.v1)"
        )
    if isinstance(exc, gexc.NotFound):
        return f"check that the instance exists as {where}"
    if isinstance(exc, gexc.TooManyRequests):
        return "the project's Compute API quota is exhausted; retry later"
    return None


class GceActions:
    """GCE stop, delete, start and status lookups.

    Args:
        endpoint: API endpoint instead of ``compute.googleapis.com``, e.g.
            ``http://127.0.0.1:8080`` for a local fake.
        credentials: google-auth credentials; Application Default
            Credentials when None, or anonymous ones for a plain-HTTP
            endpoint.
    """

    provider = "gcp"

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        credentials: Credentials | None = None,
        operation_timeout_s: float = OPERATION_TIMEOUT_S,
    ) -> None:
        self._endpoint = endpoint
        self._credentials = credentials
        if credentials is None and endpoint and endpoint.startswith("http://"):
            self._credentials = AnonymousCredentials()
        self._operation_timeout_s = operation_timeout_s
        self._clients: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    async def stop_instance(self, host: pb.HostIdentity) -> str:
        """Stops the VM; a stopped or deleted one is left alone."""
        return await self._run(host, "stop", self._stop)

    async def terminate_instance(self, host: pb.HostIdentity) -> str:
        """Deletes the VM; an already deleted one counts as terminated."""
        return await self._run(host, "terminate", self._delete)

    async def start_instance(self, host: pb.HostIdentity) -> str:
        """Starts a stopped VM; a running one is left alone."""
        return await self._run(host, "start", self._start)

    async def instance_state(self, host: pb.HostIdentity) -> str:
        """Returns the VM's state in the common vocabulary."""
        return await self._run(host, "state", self._state)

    async def _run(self, host: pb.HostIdentity, action: str, fn: Any) -> str:
        name = gce_instance_name(host)
        project, zone = host.project, host.zone.rsplit("/", 1)[-1]
        if not project or not zone:
            raise _cloud_error(
                name,
                f"the host identity lacks a project or zone "
                f"(project={project!r}, zone={zone!r})",
                "the agent fills both from the GCE metadata server; check "
                "that it runs on GCE with the metadata server reachable",
            )
        try:
            # A little over the operation timeout, so that the SDK's own
            # timeout fires first and gives the better error.
            async with asyncio.timeout(self._operation_timeout_s + RPC_TIMEOUT_S):
                state: str = await asyncio.to_thread(fn, project, zone, name)
        except TimeoutError:
            raise _cloud_error(
                name,
                f"{action} did not finish within {self._operation_timeout_s} s",
                "check the broker's network path to the Compute API",
            ) from None
        log.info(
            "cloud.action_done",
            provider="gcp",
            action=action,
            instance=name,
            project=project,
            zone=zone,
            state=state,
        )
        return state

    def _api(self, name: str) -> tuple[Any, Any]:
        """The instances and zone-operations clients, made on first use."""
        with self._lock:
            if self._clients is None:
                options = ClientOptions(api_endpoint=self._endpoint)
                try:
                    self._clients = (
                        compute_v1.InstancesClient(
                            credentials=self._credentials, client_options=options
                        ),
                        # The operations client InstancesClient makes for its
                        # own waits ignores client_options, so the broker
                        # waits with this one, on the same endpoint.
                        compute_v1.ZoneOperationsClient(
                            credentials=self._credentials, client_options=options
                        ),
                    )
                except auth_exceptions.DefaultCredentialsError as exc:
                    raise _cloud_error(
                        name,
                        f"no Google Cloud credentials found: {exc}",
                        "run the broker with a service account, or set "
                        "GOOGLE_APPLICATION_CREDENTIALS",
                    ) from exc
            return self._clients

    def _call(self, verb: str, project: str, zone: str, name: str) -> Any:
        """Calls instances.<verb> and waits for its operation, if any."""
        where = f"projects/{project}/zones/{zone}/instances/{name}"
        instances, operations = self._api(name)
        try:
            if verb == "get":
                return instances.get(
                    project=project, zone=zone, instance=name, timeout=RPC_TIMEOUT_S
                )
            operation = getattr(instances, f"{verb}_unary")(
                project=project, zone=zone, instance=name, timeout=RPC_TIMEOUT_S
            )
            operation = self._wait(operations, project, zone, name, operation)
        except gexc.GoogleAPICallError as exc:
            raise _cloud_error(
                name,
                f"GCE instances.{verb} on {where} answered {exc.code} {exc.message}",
                _hint_for(exc, verb, where),
            ) from exc
        except auth_exceptions.GoogleAuthError as exc:
            raise _cloud_error(
                name,
                f"Google Cloud authentication failed: {exc}",
                "check the broker's service account credentials",
            ) from exc
        if operation.http_error_status_code or operation.error.errors:
            details = "; ".join(e.message for e in operation.error.errors)
            raise _cloud_error(
                name,
                f"GCE instances.{verb} on {where} failed: "
                f"{operation.http_error_status_code} "
                f"{operation.http_error_message}: {details}",
            )
        return None

    def _wait(
        self, operations: Any, project: str, zone: str, name: str, operation: Any
    ) -> Any:
        """Waits for a zone operation to be DONE, within the timeout."""
        deadline = time.monotonic() + self._operation_timeout_s
        while operation.status != compute_v1.Operation.Status.DONE:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise _cloud_error(
                    name,
                    f"GCE operation {operation.name} on {zone} was not done "
                    f"within {self._operation_timeout_s} s",
                    "check the operation in the console, then retry",
                )
            operation = operations.wait(
                project=project,
                zone=zone,
                operation=operation.name,
                timeout=min(remaining_s, WAIT_CALL_TIMEOUT_S),
            )
        return operation

    def _status(self, project: str, zone: str, name: str) -> str:
        """The VM's state; a VM that does not exist is ``terminated``."""
        try:
            instance = self._call("get", project, zone, name)
        except CloudActionError as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                return InstanceState.TERMINATED
            raise
        return _STATUS_MAP.get(instance.status, InstanceState.UNKNOWN)

    def _state(self, project: str, zone: str, name: str) -> str:
        # Unlike EC2, GCE forgets a deleted VM at once, so a lookup cannot
        # tell "deleted" from "never existed": a state lookup reports 404 as
        # an error, and only terminate treats it as done.
        instance = self._call("get", project, zone, name)
        return _STATUS_MAP.get(instance.status, InstanceState.UNKNOWN)

    def _stop(self, project: str, zone: str, name: str) -> str:
        instance = self._call("get", project, zone, name)
        state = _STATUS_MAP.get(instance.status, InstanceState.UNKNOWN)
        if state in InstanceState.STOPPED_OR_STOPPING:
            return state
        self._call("stop", project, zone, name)
        return self._status(project, zone, name)

    def _delete(self, project: str, zone: str, name: str) -> str:
        if self._status(project, zone, name) == InstanceState.TERMINATED:
            log.warning(
                "cloud.instance_absent",
                provider="gcp",
                instance=name,
                project=project,
                zone=zone,
            )
            return InstanceState.TERMINATED
        self._call("delete", project, zone, name)
        return self._status(project, zone, name)

    def _start(self, project: str, zone: str, name: str) -> str:
        instance = self._call("get", project, zone, name)
        state = _STATUS_MAP.get(instance.status, InstanceState.UNKNOWN)
        if state in (InstanceState.RUNNING, InstanceState.PENDING):
            return state
        self._call("start", project, zone, name)
        return self._status(project, zone, name)
