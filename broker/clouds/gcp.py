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
import uuid
from typing import Any

import structlog
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import compute_v1

from gpufleet.broker.clouds.base import InstanceState
from gpufleet.broker.clouds.launch import (
    LaunchedRef,
    LaunchError,
    LaunchRequest,
    LaunchTemplate,
)
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
    "list": "compute.instances.list",
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


# Launch error classification, by the error's reason in GCE's own spelling
# (upper snake case; request errors spell it camelCase, e.g. quotaExceeded).
# GCE reports a stockout as an operation error after accepting the insert.
_LAUNCH_ERRORS: dict[str, tuple[str, bool]] = {
    "ZONE_RESOURCE_POOL_EXHAUSTED": ("capacity", True),
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS": ("capacity", True),
    "RESOURCE_POOL_EXHAUSTED": ("capacity", True),
    "QUOTA_EXCEEDED": ("quota", True),
    "UNSUPPORTED_OPERATION": ("config", True),
    "FORBIDDEN": ("auth", False),
    "INSUFFICIENT_PERMISSIONS": ("auth", False),
    "PERMISSION_DENIED": ("auth", False),
    "UNAUTHORIZED": ("auth", False),
    "INVALID": ("config", False),
    "INVALID_FIELD_VALUE": ("config", False),
    "BAD_REQUEST": ("config", False),
    "RESOURCE_NOT_FOUND": ("config", False),
    "NOT_FOUND": ("config", False),
}
# Labels on every VM the broker launches, sanitized to GCE's label rules.
LABEL_FLEET, LABEL_LAUNCH_ID, LABEL_JOB, LABEL_MANAGED = (
    "gpufleet-fleet",
    "gpufleet-launch-id",
    "gpufleet-job",
    "gpufleet-managed",
)
# Any fixed namespace works: the same launch id and zone always give the
# same requestId, so GCE answers a retried insert with the first operation.
_REQUEST_ID_NAMESPACE = uuid.UUID("6f1b7c1e-2f43-4c55-9d3e-6a0c7e1f5a10")
_LABEL_UNSAFE = re.compile(r"[^a-z0-9_-]")
_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


def gce_label(value: str, *, key: bool = False) -> str:
    """``value`` made a valid GCE label (a key starts with a letter)."""
    label = _LABEL_UNSAFE.sub("_", value.lower())[:63]
    if key and not label[:1].isalpha():
        label = ("k" + label)[:63]
    return label


def gce_launch_name(launch_id: str) -> str:
    """The VM name for a launch id: the id if it is a valid name, else derived."""
    if _GCE_NAME.fullmatch(launch_id):
        return launch_id
    body = re.sub(r"[^a-z0-9-]+", "-", launch_id.lower()).strip("-")
    return f"gpufleet-{body}"[:63].rstrip("-")


def gce_request_id(launch_id: str, zone: str) -> str:
    """The insert's requestId, a UUID derived from the launch id and zone."""
    return str(uuid.uuid5(_REQUEST_ID_NAMESPACE, f"{launch_id}/{zone}"))


def _reason_code(reason: str) -> str:
    """``quotaExceeded`` -> ``QUOTA_EXCEEDED``; upper snake case is kept."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", reason).upper()


def classify_gce_launch_error(
    code: str, message: str, req: LaunchRequest
) -> tuple[str, bool, str]:
    """Maps a GCE error reason to (kind, next_offer, hint) for a launch."""
    kind, next_offer = _LAUNCH_ERRORS.get(_reason_code(code), ("other", False))
    where = f"{req.zone} ({req.project})"
    if kind == "config" and "machineTypes" in message:
        # A machine type the zone does not offer: another zone may.
        kind, next_offer = "capacity", True
    if kind == "capacity":
        hint = (
            f"GCE has no {req.lifecycle} {req.instance_type} capacity in {where} "
            "now; try another zone, region or machine type"
        )
    elif kind == "quota":
        # GPUS_ALL_REGIONS and CPUS_ALL_REGIONS are project-wide: no other
        # zone or region helps.
        if "ALL_REGIONS" in message or "globally" in message:
            next_offer = False
        hint = (
            f"ask for a higher quota in project {req.project} (IAM & Admin > "
            "Quotas); the message names the quota"
        )
    elif kind == "auth":
        hint = (
            "grant the broker's service account compute.instances.create and "
            "iam.serviceAccounts.actAs on the VM's service account "
            "(e.g. roles/compute.instanceAdmin.v1 and roles/iam.serviceAccountUser)"
        )
    elif kind == "config":
        hint = (
            f"check the GCE launch template and the request for {where}: image, "
            "network, subnetwork, service account, provisioning model"
        )
    else:
        hint = (
            f"retry with the same launch id {req.launch_id}: its requestId keeps "
            "GCE from starting a second VM"
        )
    return kind, next_offer, hint


def _gce_launch_error(req: LaunchRequest, code: str, message: str) -> LaunchError:
    kind, next_offer, hint = classify_gce_launch_error(code, message, req)
    return LaunchError(
        "gcp",
        req.launch_id,
        f"GCE instances.insert of {req.lifecycle} {req.instance_type} in "
        f"projects/{req.project}/zones/{req.zone} failed with "
        f"{code or 'no reply'}: {message}",
        kind=kind,
        code=code,
        next_offer=next_offer,
        hint=hint,
    )


def gce_instance_resource(req: LaunchRequest, tpl: LaunchTemplate) -> Any:
    """The ``Instance`` body of instances.insert for one launch.

    Only machine types with their GPUs built in (a2, a3, g2) get GPUs: no
    ``guestAccelerators`` are attached (see docs/provisioning.md).
    """
    zone = req.zone
    labels = {gce_label(k, key=True): gce_label(v) for k, v in tpl.tags.items()}
    labels |= {
        LABEL_FLEET: gce_label(req.fleet),
        LABEL_LAUNCH_ID: gce_label(req.launch_id),
        LABEL_JOB: gce_label(req.job_id),
        LABEL_MANAGED: "true",
    }
    if req.lifecycle == "spot":
        # DELETE, not STOP: the broker moves a preempted job elsewhere, so a
        # stopped spot VM would only sit idle with its disk billed.
        scheduling = compute_v1.Scheduling(
            provisioning_model="SPOT",
            instance_termination_action="DELETE",
            on_host_maintenance="TERMINATE",
            automatic_restart=False,
        )
    else:
        # GPU VMs cannot live-migrate, so host maintenance must stop them.
        scheduling = compute_v1.Scheduling(
            provisioning_model="STANDARD",
            on_host_maintenance="TERMINATE",
            automatic_restart=True,
        )
    nic = compute_v1.NetworkInterface()
    if tpl.network:
        nic.network = tpl.network
    if tpl.subnetwork:
        nic.subnetwork = tpl.subnetwork
    if tpl.gce_external_ip:
        nic.access_configs = [
            compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")
        ]
    instance = compute_v1.Instance(
        name=gce_launch_name(req.launch_id),
        machine_type=f"zones/{zone}/machineTypes/{req.instance_type}",
        disks=[
            compute_v1.AttachedDisk(
                boot=True,
                auto_delete=True,
                initialize_params=compute_v1.AttachedDiskInitializeParams(
                    source_image=tpl.image,
                    disk_size_gb=tpl.disk_gb,
                    disk_type=f"zones/{zone}/diskTypes/pd-balanced",
                ),
            )
        ],
        network_interfaces=[nic],
        scheduling=scheduling,
        metadata=compute_v1.Metadata(
            items=[compute_v1.Items(key="startup-script", value=req.user_data)]
        ),
        labels=labels,
    )
    if tpl.service_account:
        instance.service_accounts = [
            compute_v1.ServiceAccount(email=tpl.service_account, scopes=_SCOPES)
        ]
    return instance


def _gce_ref(req_project: str, zone: str, instance: Any) -> LaunchedRef:
    spot = instance.scheduling.provisioning_model == "SPOT"
    return LaunchedRef(
        provider="gcp",
        region=zone.rsplit("-", 1)[0],
        zone=zone,
        instance_id=str(instance.id),
        name=instance.name,
        project=req_project,
        lifecycle="spot" if spot else "on-demand",
        state=_STATUS_MAP.get(instance.status, InstanceState.UNKNOWN),
        launch_id=instance.labels.get(LABEL_LAUNCH_ID, ""),
    )


class GceLauncher:
    """Launches and lists the broker's GCE VMs (mixed into GceActions)."""

    _api: Any
    _wait: Any
    _operation_timeout_s: float

    async def launch_instance(
        self, req: LaunchRequest, tpl: LaunchTemplate
    ) -> LaunchedRef:
        """Creates one VM, or returns the one created for this launch id.

        Raises:
            LaunchError: the launch failed; ``kind`` and ``next_offer`` say
                whether to try the next offer.
        """
        problems = req.problems()
        if not req.project or not req.zone:
            problems.append("project and zone: GCE needs both")
        if not tpl.image:
            problems.append("image: the GCE launch template names no image")
        if problems:
            raise LaunchError(
                "gcp",
                req.launch_id or "?",
                "invalid launch request: " + "; ".join(problems),
                kind="config",
                next_offer=False,
                hint="fix the launch request or the GCE launch template",
            )
        try:
            async with asyncio.timeout(self._operation_timeout_s + RPC_TIMEOUT_S):
                ref: LaunchedRef = await asyncio.to_thread(self._launch, req, tpl)
        except TimeoutError:
            raise LaunchError(
                "gcp",
                req.launch_id,
                f"launch did not finish within {self._operation_timeout_s} s",
                kind="other",
                hint=f"retry with the same launch id {req.launch_id}",
            ) from None
        log.info(
            "cloud.instance_launched",
            provider="gcp",
            launch_id=req.launch_id,
            instance=ref.name,
            project=req.project,
            zone=req.zone,
            instance_type=req.instance_type,
            lifecycle=ref.lifecycle,
            state=ref.state,
        )
        return ref

    async def list_launched(
        self, project: str, zone: str, fleet: str
    ) -> list[LaunchedRef]:
        """The fleet's broker-launched VMs in one zone."""
        async with asyncio.timeout(self._operation_timeout_s):
            return await asyncio.to_thread(self._list, project, zone, fleet)

    def _list(self, project: str, zone: str, fleet: str) -> list[LaunchedRef]:
        instances, _ = self._api(f"fleet {fleet}")
        request = compute_v1.ListInstancesRequest(
            project=project,
            zone=zone,
            filter=(
                f'(labels.{LABEL_MANAGED} = "true") AND '
                f'(labels.{LABEL_FLEET} = "{gce_label(fleet)}")'
            ),
        )
        try:
            pager = instances.list(request=request, timeout=RPC_TIMEOUT_S)
            return [_gce_ref(project, zone, i) for i in pager]
        except gexc.GoogleAPICallError as exc:
            raise _cloud_error(
                f"fleet {fleet}",
                f"GCE instances.list in projects/{project}/zones/{zone} answered "
                f"{exc.code} {exc.message}",
                "grant the broker's service account compute.instances.list",
            ) from exc

    def _launch(self, req: LaunchRequest, tpl: LaunchTemplate) -> LaunchedRef:
        instances, operations = self._api(req.launch_id)
        name = gce_launch_name(req.launch_id)
        request = compute_v1.InsertInstanceRequest(
            project=req.project,
            zone=req.zone,
            instance_resource=gce_instance_resource(req, tpl),
            request_id=gce_request_id(req.launch_id, req.zone),
        )
        try:
            operation = instances.insert_unary(request=request, timeout=RPC_TIMEOUT_S)
            operation = self._wait(operations, req.project, req.zone, name, operation)
        except gexc.Conflict:
            # A VM of that name exists: ours from an earlier try, or not.
            return self._existing(req, name)
        except gexc.GoogleAPICallError as exc:
            reasons = [str(e.get("reason", "")) for e in exc.errors or []]
            code = next((r for r in reasons if r), type(exc).__name__)
            if isinstance(exc, gexc.Forbidden) and "quota" not in code.lower():
                code = "FORBIDDEN"
            raise _gce_launch_error(req, code, str(exc.message)) from exc
        except auth_exceptions.GoogleAuthError as exc:
            raise _gce_launch_error(req, "UNAUTHORIZED", str(exc)) from exc
        except CloudActionError as exc:
            # The operation did not finish in time; it may still succeed.
            raise _gce_launch_error(req, "TIMEOUT", exc.reason) from exc
        if operation.error.errors:
            first = operation.error.errors[0]
            message = "; ".join(e.message for e in operation.error.errors)
            raise _gce_launch_error(req, first.code, message)
        return self._existing(req, name)

    def _existing(self, req: LaunchRequest, name: str) -> LaunchedRef:
        instances, _ = self._api(name)
        try:
            instance = instances.get(
                project=req.project, zone=req.zone, instance=name, timeout=RPC_TIMEOUT_S
            )
        except gexc.GoogleAPICallError as exc:
            raise _gce_launch_error(req, "NOT_FOUND", str(exc.message)) from exc
        if instance.labels.get(LABEL_LAUNCH_ID) != gce_label(req.launch_id):
            raise LaunchError(
                "gcp",
                req.launch_id,
                f"a VM named {name} already exists in {req.zone} and was not "
                "made by this launch",
                kind="config",
                code="ALREADY_EXISTS",
                next_offer=False,
                hint="give every launch a new launch id, or delete the stray VM",
            )
        return _gce_ref(req.project, req.zone, instance)


class GceActions(GceLauncher):
    """GCE stop, delete, start and status lookups, and launches.

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
