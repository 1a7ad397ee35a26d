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


class AwsActions:
    """EC2 stop, terminate, start and state lookups.

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
        self._clients: dict[str, Any] = {}
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

    def _client(self, region: str) -> Any:
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                client = self._session.client(
                    "ec2",
                    region_name=region,
                    endpoint_url=self._endpoint_url,
                    config=self._config,
                )
                self._clients[region] = client
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
        state = self._state(region, instance_id)
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
