"""EC2 instance actions for the broker, with boto3.

One ``ec2`` client per region (the host's ``region``), credentials from the
SDK's default chain (environment, ``~/.aws``, instance role). boto3 is
blocking, so each call runs in ``asyncio.to_thread`` under botocore's own
connect/read timeouts and retries plus an overall ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import structlog

from gpufleet.broker.clouds.base import InstanceState
from gpufleet.broker.clouds.launch import (
    TAG_FLEET,
    TAG_JOB,
    TAG_LAUNCH_ID,
    TAG_MANAGED,
    LaunchedRef,
    LaunchError,
    LaunchRequest,
    LaunchTemplate,
)
from gpufleet.errors import CloudActionError
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

# One EC2 call is small; connect within 5 s and answer within 20 s, or the
# endpoint is in trouble. "standard" retry mode retries throttling and 5xx
# with backoff, four attempts in all.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0
MAX_ATTEMPTS = 4
# Bounds a whole action (describe + act, with retries) as seen by the caller.
ACTION_TIMEOUT_S = 120.0

# The IAM action each API call needs, for the "missing permission" hint.
_IAM_ACTIONS = {
    "StopInstances": "ec2:StopInstances",
    "StartInstances": "ec2:StartInstances",
    "TerminateInstances": "ec2:TerminateInstances",
    "DescribeInstances": "ec2:DescribeInstances",
    "DescribeSpotInstanceRequests": "ec2:DescribeSpotInstanceRequests",
    "RunInstances": "ec2:RunInstances and ec2:CreateTags",
    "DescribeImages": "ec2:DescribeImages",
}

_SPOT_STOP_HINT = (
    "a one-time spot instance cannot be stopped, only terminated: use the "
    "action terminate-instance in the policy for spot hosts, or launch them "
    "from a persistent spot request with interruption behaviour 'stop'"
)


def _hint_for(code: str, operation: str, region: str) -> str | None:
    if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
        action = _IAM_ACTIONS.get(operation, f"ec2:{operation}")
        return f"grant the broker's IAM identity the permission {action}"
    if code.startswith("InvalidInstanceID"):
        return (
            f"check that the instance exists in region {region} and that the "
            "host's identity names the right region"
        )
    if code in ("AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch"):
        return "check the broker's AWS credentials (environment, ~/.aws, role)"
    if code == "UnsupportedOperation":
        return _SPOT_STOP_HINT
    if code == "IncorrectInstanceState":
        return "the instance is changing state; retry once it has settled"
    if code in ("RequestLimitExceeded", "Throttling"):
        return "EC2 is throttling the account's API calls; retry later"
    return None


def _cloud_error(
    instance_id: str, reason: str, hint: str | None = None
) -> CloudActionError:
    err = CloudActionError("aws", instance_id, reason)
    if hint is not None:
        err.hint = hint
    return err


# EC2 error code -> (launch error kind, whether another offer may succeed),
# from the EC2 API error code reference. Capacity errors are per zone and
# instance type; the vCPU, instance and spot count limits are per region.
_LAUNCH_ERRORS: dict[str, tuple[str, bool]] = {
    "InsufficientInstanceCapacity": ("capacity", True),
    "InsufficientCapacity": ("capacity", True),
    "InsufficientHostCapacity": ("capacity", True),
    "InsufficientReservedInstanceCapacity": ("capacity", True),
    # "Your requested instance type is not supported in your requested
    # Availability Zone": the offer does not exist there, like no capacity.
    "Unsupported": ("capacity", True),
    "SpotMaxPriceTooLow": ("price", True),
    "MaxSpotInstanceCountExceeded": ("quota", True),
    "VcpuLimitExceeded": ("quota", True),
    "InstanceLimitExceeded": ("quota", True),
    "VolumeLimitExceeded": ("quota", True),
    "UnauthorizedOperation": ("auth", False),
    "AccessDenied": ("auth", False),
    "AuthFailure": ("auth", False),
    "InvalidClientTokenId": ("auth", False),
    "SignatureDoesNotMatch": ("auth", False),
    "OptInRequired": ("auth", False),
    "Blocked": ("auth", False),
    "PendingVerification": ("auth", False),
    "IdempotentParameterMismatch": ("config", False),
    "MissingParameter": ("config", False),
    "InvalidUserData.Malformed": ("config", False),
    "InvalidBlockDeviceMapping": ("config", False),
}
_CONFIG_PREFIXES = (
    "InvalidAMIID.",
    "InvalidSubnetID.",
    "InvalidSubnet",
    "InvalidGroup.",
    "InvalidGroupId.",
    "InvalidKeyPair.",
    "InvalidParameter",
    "InvalidInstanceType",
)
# EC2 takes at most 16 KiB of user data, before base64.
MAX_USER_DATA_BYTES = 16 * 1024
# The states in which a launched instance still exists (and may still cost).
_LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]


def classify_launch_error(
    code: str, message: str, req: LaunchRequest
) -> tuple[str, bool, str]:
    """Maps an EC2 error code to (kind, next_offer, hint) for a launch."""
    kind, next_offer = _LAUNCH_ERRORS.get(code, ("other", False))
    if kind == "other" and code.startswith(_CONFIG_PREFIXES):
        kind = "config"
    where = req.zone or req.region
    family = req.instance_type.split(".", 1)[0]
    if code == "Unsupported":
        hint = f"{req.instance_type} is not offered in {where}; try another zone"
    elif kind == "capacity":
        hint = (
            f"EC2 has no {req.lifecycle} {req.instance_type} capacity in {where} "
            "now; try another zone, region or instance type"
        )
    elif kind == "price":
        hint = (
            f"the spot price of {req.instance_type} in {where} is above "
            f"max_usd_per_hour={req.max_usd_per_hour}; raise it or use on-demand"
        )
    elif kind == "quota":
        hint = (
            f"ask for a higher EC2 quota for {req.lifecycle} {family} instances "
            f"in {req.region} (Service Quotas), or try another region"
        )
    elif kind == "auth":
        hint = _hint_for(code, "RunInstances", req.region) or (
            "check the broker's AWS account and credentials"
        )
        if code == "UnauthorizedOperation":
            hint += ", and iam:PassRole on the instance profile's role if one is set"
    elif code == "IdempotentParameterMismatch":
        hint = (
            f"launch id {req.launch_id} was used before for a different request; "
            "give every launch a new id"
        )
    elif kind == "config":
        hint = (
            f"check the AWS launch template for {req.region}: the image (AMIs "
            "are regional), subnets, security groups and key pair"
        )
    else:
        hint = (
            f"retry with the same launch id {req.launch_id}: EC2 then never "
            "starts a second instance"
        )
    return kind, next_offer, hint


def _tag(instance: dict[str, Any], key: str) -> str:
    for tag in instance.get("Tags", []):
        if tag.get("Key") == key:
            return str(tag.get("Value", ""))
    return ""


def _ref(region: str, instance: dict[str, Any]) -> LaunchedRef:
    spot = instance.get("InstanceLifecycle") == "spot"
    return LaunchedRef(
        provider="aws",
        region=region,
        zone=str(instance.get("Placement", {}).get("AvailabilityZone", "")),
        instance_id=str(instance["InstanceId"]),
        name=_tag(instance, "Name"),
        project="",
        lifecycle="spot" if spot else "on-demand",
        state=str(instance["State"]["Name"]),
        launch_id=_tag(instance, TAG_LAUNCH_ID),
    )


def run_instances_args(
    req: LaunchRequest, tpl: LaunchTemplate, root_device: str
) -> dict[str, Any]:
    """The keyword arguments of ``run_instances`` for one launch."""
    tags = {
        **tpl.tags,
        "Name": f"gpufleet-{req.launch_id}",
        TAG_FLEET: req.fleet,
        TAG_LAUNCH_ID: req.launch_id,
        TAG_JOB: req.job_id,
        TAG_MANAGED: "true",
    }
    tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
    args: dict[str, Any] = {
        "ImageId": tpl.image,
        "InstanceType": req.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        # EC2 answers a retried call with the same token with the instance
        # it launched the first time, instead of launching another.
        "ClientToken": req.launch_id,
        "UserData": req.user_data,
        # A guest "shutdown" ends the instance, so it cannot linger stopped
        # with its disk billed; the broker stops instances through the API.
        "InstanceInitiatedShutdownBehavior": "terminate",
        "BlockDeviceMappings": [
            {
                "DeviceName": root_device,
                "Ebs": {
                    "VolumeSize": tpl.disk_gb,
                    "VolumeType": "gp3",
                    "DeleteOnTermination": True,
                },
            }
        ],
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tag_list},
            {"ResourceType": "volume", "Tags": tag_list},
        ],
    }
    if req.zone:
        args["Placement"] = {"AvailabilityZone": req.zone}
        if req.zone in tpl.subnet_ids:
            args["SubnetId"] = tpl.subnet_ids[req.zone]
    if tpl.security_group_ids:
        args["SecurityGroupIds"] = list(tpl.security_group_ids)
    if tpl.iam_instance_profile:
        key = "Arn" if tpl.iam_instance_profile.startswith("arn:") else "Name"
        args["IamInstanceProfile"] = {key: tpl.iam_instance_profile}
    if tpl.key_name:
        args["KeyName"] = tpl.key_name
    if req.lifecycle == "spot":
        spot: dict[str, Any] = {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
        }
        if req.max_usd_per_hour > 0:
            spot["MaxPrice"] = f"{req.max_usd_per_hour:.4f}"
        args["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
    return args


class AwsLauncher:
    """Launches and lists the broker's EC2 instances (mixed into AwsActions)."""

    _client: Any
    _session: Any
    _endpoint_url: str | None
    _action_timeout_s: float

    async def launch_instance(
        self, req: LaunchRequest, tpl: LaunchTemplate
    ) -> LaunchedRef:
        """Launches one instance, or returns the one launched for this id.

        Raises:
            LaunchError: the launch failed; ``kind`` and ``next_offer`` say
                whether to try the next offer.
        """
        _check_launch(req, tpl)
        try:
            async with asyncio.timeout(self._action_timeout_s):
                ref: LaunchedRef = await asyncio.to_thread(self._launch, req, tpl)
        except TimeoutError:
            raise LaunchError(
                "aws",
                req.launch_id,
                f"launch did not finish within {self._action_timeout_s} s",
                kind="other",
                hint=f"retry with the same launch id {req.launch_id}",
            ) from None
        log.info(
            "cloud.instance_launched",
            provider="aws",
            launch_id=req.launch_id,
            instance_id=ref.instance_id,
            region=ref.region,
            zone=ref.zone,
            instance_type=req.instance_type,
            lifecycle=ref.lifecycle,
            state=ref.state,
        )
        return ref

    async def list_launched(self, region: str, fleet: str) -> list[LaunchedRef]:
        """The fleet's broker-launched instances in ``region``, not terminated."""
        async with asyncio.timeout(self._action_timeout_s):
            return await asyncio.to_thread(self._list, region, fleet, "")

    def _list(self, region: str, fleet: str, launch_id: str) -> list[LaunchedRef]:
        filters = [
            {"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]},
            {"Name": f"tag:{TAG_FLEET}", "Values": [fleet]},
            {"Name": "instance-state-name", "Values": _LIVE_STATES},
        ]
        if launch_id:
            filters.append({"Name": f"tag:{TAG_LAUNCH_ID}", "Values": [launch_id]})
        refs: list[LaunchedRef] = []
        token = ""
        while True:
            kwargs: dict[str, Any] = {"Filters": filters}
            if token:
                kwargs["NextToken"] = token
            reply = self._call(region, f"fleet {fleet}", "describe_instances", **kwargs)
            for reservation in reply.get("Reservations", []):
                refs += [_ref(region, i) for i in reservation.get("Instances", [])]
            token = reply.get("NextToken") or ""
            if not token:
                return refs

    def _launch(self, req: LaunchRequest, tpl: LaunchTemplate) -> LaunchedRef:
        # ClientToken covers a lost reply on EC2; looking for the tag first
        # also covers endpoints that ignore the token.
        for ref in self._list(req.region, req.fleet, req.launch_id):
            return ref
        root_device = self._root_device(req, tpl.image)
        args = run_instances_args(req, tpl, root_device)
        # Capacity errors come back as HTTP 5xx, which botocore would retry
        # with backoff; a launch must fall through to the next offer fast, so
        # its client makes one attempt.
        client = self._launch_client(req.region)
        try:
            reply = client.run_instances(**args)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            message = str(error.get("Message", ""))
            raise _launch_error(req, code, message) from exc
        except botocore.exceptions.NoCredentialsError as exc:
            raise _launch_error(req, "AuthFailure", "no AWS credentials found") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise _launch_error(req, "", f"EC2 call failed: {exc}") from exc
        return _ref(req.region, reply["Instances"][0])

    def _root_device(self, req: LaunchRequest, image: str) -> str:
        client = self._client(req.region)
        try:
            reply = client.describe_images(ImageIds=[image])
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            raise _launch_error(req, code, str(error.get("Message", ""))) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise _launch_error(req, "", f"EC2 call failed: {exc}") from exc
        images = reply.get("Images", [])
        if not images:
            raise _launch_error(
                req, "InvalidAMIID.NotFound", f"image {image} is not in {req.region}"
            )
        return str(images[0].get("RootDeviceName") or "/dev/xvda")

    def _launch_client(self, region: str) -> Any:
        return self._client(region, launch=True)


def _launch_error(req: LaunchRequest, code: str, message: str) -> LaunchError:
    kind, next_offer, hint = classify_launch_error(code, message, req)
    where = req.zone or req.region
    return LaunchError(
        "aws",
        req.launch_id,
        f"EC2 RunInstances of {req.lifecycle} {req.instance_type} in {where} "
        f"answered {code or 'no reply'}: {message}",
        kind=kind,
        code=code,
        next_offer=next_offer,
        hint=hint,
    )


def _check_launch(req: LaunchRequest, tpl: LaunchTemplate) -> None:
    problems = req.problems()
    size = len(req.user_data.encode())
    if size > MAX_USER_DATA_BYTES:
        problems.append(
            f"user_data: {size} bytes, EC2 takes at most {MAX_USER_DATA_BYTES}"
        )
    if not tpl.image:
        problems.append("image: the AWS launch template names no AMI")
    if req.zone and tpl.subnet_ids and req.zone not in tpl.subnet_ids:
        problems.append(
            f"subnet_ids: no subnet for zone {req.zone} "
            f"(have {', '.join(sorted(tpl.subnet_ids))})"
        )
    if problems:
        raise LaunchError(
            "aws",
            req.launch_id or "?",
            "invalid launch request: " + "; ".join(problems),
            kind="config",
            # A zone without a subnet is one bad offer among others.
            next_offer=all(p.startswith("subnet_ids:") for p in problems),
            hint="fix the launch request or the AWS launch template",
        )


class AwsActions(AwsLauncher):
    """EC2 stop, terminate, start and state lookups, and launches.

    Args:
        endpoint_url: EC2 endpoint to use instead of AWS's (moto, a VPC
            endpoint). ``AWS_ENDPOINT_URL`` in the environment is honoured by
            boto3 itself when this is None.
        session: a boto3 session to take clients from; the default session
            otherwise.
    """

    provider = "aws"

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        session: boto3.session.Session | None = None,
        action_timeout_s: float = ACTION_TIMEOUT_S,
    ) -> None:
        self._endpoint_url = endpoint_url
        self._session = session or boto3.session.Session()
        self._action_timeout_s = action_timeout_s
        self._config = botocore.config.Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        )
        self._clients: dict[tuple[str, bool], Any] = {}
        # boto3 sessions are not thread-safe, clients are: create under a lock.
        self._lock = threading.Lock()

    async def stop_instance(self, host: pb.HostIdentity) -> str:
        """Stops the instance; a stopped or terminated one is left alone."""
        return await self._run(host, "stop", self._stop)

    async def terminate_instance(self, host: pb.HostIdentity) -> str:
        """Terminates the instance; a terminated one is left alone."""
        return await self._run(host, "terminate", self._terminate)

    async def start_instance(self, host: pb.HostIdentity) -> str:
        """Starts a stopped instance; a running one is left alone."""
        return await self._run(host, "start", self._start)

    async def instance_state(self, host: pb.HostIdentity) -> str:
        """Returns the EC2 state name, e.g. ``running`` or ``stopped``."""
        return await self._run(host, "state", self._state)

    async def _run(self, host: pb.HostIdentity, action: str, fn: Any) -> str:
        instance_id, region = host.instance_id, host.region
        if not instance_id or not region:
            raise _cloud_error(
                instance_id or host.host_id or "?",
                f"the host identity lacks an instance id or region "
                f"(instance_id={instance_id!r}, region={region!r})",
                "the agent fills both from the EC2 metadata service; check "
                "that it runs on EC2 with IMDS reachable",
            )
        try:
            async with asyncio.timeout(self._action_timeout_s):
                state: str = await asyncio.to_thread(fn, region, instance_id)
        except TimeoutError:
            raise _cloud_error(
                instance_id,
                f"{action} did not finish within {self._action_timeout_s} s",
                "check the broker's network path to the EC2 endpoint",
            ) from None
        log.info(
            "cloud.action_done",
            provider="aws",
            action=action,
            instance_id=instance_id,
            region=region,
            state=state,
        )
        return state

    def _client(self, region: str, *, launch: bool = False) -> Any:
        with self._lock:
            client = self._clients.get((region, launch))
            if client is None:
                config = self._config
                if launch:
                    config = config.merge(
                        botocore.config.Config(
                            retries={"total_max_attempts": 1, "mode": "standard"}
                        )
                    )
                client = self._session.client(
                    "ec2",
                    region_name=region,
                    endpoint_url=self._endpoint_url,
                    config=config,
                )
                self._clients[(region, launch)] = client
            return client

    def _call(self, region: str, instance_id: str, op: str, **kwargs: Any) -> Any:
        """Calls one EC2 operation, translating botocore errors."""
        client = self._client(region)
        try:
            return getattr(client, op)(**kwargs)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            message = str(error.get("Message", ""))
            raise _cloud_error(
                instance_id,
                f"EC2 {exc.operation_name} answered {code}: {message}",
                _hint_for(code, exc.operation_name, region),
            ) from exc
        except botocore.exceptions.NoCredentialsError as exc:
            raise _cloud_error(
                instance_id,
                "no AWS credentials found",
                "give the broker credentials through the environment, "
                "~/.aws/credentials or an instance role",
            ) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise _cloud_error(
                instance_id,
                f"EC2 call failed in region {region}: {exc}",
                "check the broker's network path to the EC2 endpoint",
            ) from exc

    def _describe(self, region: str, instance_id: str) -> dict[str, Any]:
        reply = self._call(
            region, instance_id, "describe_instances", InstanceIds=[instance_id]
        )
        for reservation in reply.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                if instance.get("InstanceId") == instance_id:
                    return dict(instance)
        raise _cloud_error(
            instance_id,
            f"EC2 DescribeInstances does not know the instance in {region}",
            _hint_for("InvalidInstanceID.NotFound", "DescribeInstances", region),
        )

    def _state(self, region: str, instance_id: str) -> str:
        return str(self._describe(region, instance_id)["State"]["Name"])

    def _stop(self, region: str, instance_id: str) -> str:
        instance = self._describe(region, instance_id)
        state = str(instance["State"]["Name"])
        if state in InstanceState.STOPPED_OR_STOPPING | InstanceState.GONE:
            return state
        if instance.get("InstanceLifecycle") == "spot" and not self._is_stoppable_spot(
            region, instance_id, instance.get("SpotInstanceRequestId")
        ):
            # EC2 itself answers UnsupportedOperation here; moto does not, so
            # the broker checks first and fails the same way everywhere.
            raise _cloud_error(
                instance_id,
                "EC2 StopInstances answered UnsupportedOperation: the instance "
                "is a one-time spot instance",
                _SPOT_STOP_HINT,
            )
        reply = self._call(
            region, instance_id, "stop_instances", InstanceIds=[instance_id]
        )
        return str(reply["StoppingInstances"][0]["CurrentState"]["Name"])

    def _is_stoppable_spot(
        self, region: str, instance_id: str, request_id: str | None
    ) -> bool:
        """True when the spot instance comes from a persistent request."""
        if request_id:
            kwargs: dict[str, Any] = {"SpotInstanceRequestIds": [request_id]}
        else:
            kwargs = {"Filters": [{"Name": "instance-id", "Values": [instance_id]}]}
        reply = self._call(
            region, instance_id, "describe_spot_instance_requests", **kwargs
        )
        requests = reply.get("SpotInstanceRequests", [])
        # An instance launched by run_instances with spot market options and
        # no persistent request is one-time, the EC2 default.
        return any(r.get("Type") == "persistent" for r in requests)

    def _terminate(self, region: str, instance_id: str) -> str:
        try:
            state = self._state(region, instance_id)
        except CloudActionError as exc:
            # EC2 forgets a terminated instance after about an hour (a spot
            # instance reclaimed while the broker was down): nothing is left.
            if "InvalidInstanceID.NotFound" in str(exc) or "does not know" in str(exc):
                return InstanceState.TERMINATED
            raise
        if state == InstanceState.TERMINATED:
            return state
        reply = self._call(
            region, instance_id, "terminate_instances", InstanceIds=[instance_id]
        )
        return str(reply["TerminatingInstances"][0]["CurrentState"]["Name"])

    def _start(self, region: str, instance_id: str) -> str:
        state = self._state(region, instance_id)
        if state in (InstanceState.RUNNING, InstanceState.PENDING):
            return state
        if state in InstanceState.GONE:
            raise _cloud_error(
                instance_id,
                f"the instance is {state} and can never run again",
                "launch a new instance instead",
            )
        reply = self._call(
            region, instance_id, "start_instances", InstanceIds=[instance_id]
        )
        return str(reply["StartingInstances"][0]["CurrentState"]["Name"])
