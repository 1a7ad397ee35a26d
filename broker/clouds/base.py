"""The one small interface every cloud backend of the broker implements.

The broker's idle reaper and the demo call these actions, and its
provisioner launches instances through ``CloudLauncher``; ``aws.py`` and
``gcp.py`` implement them with the clouds' own SDKs. States are reported in
one vocabulary for every cloud (see ``InstanceState``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from gpufleet.broker.clouds.launch import LaunchedRef, LaunchRequest, LaunchTemplate
from gpufleet.proto import pb


class InstanceState:
    """The instance states that cloud actions report, the same on every cloud.

    AWS names are used as they are. GCE statuses are mapped: ``RUNNING`` is
    ``running``, ``PROVISIONING``/``STAGING`` are ``pending``, ``STOPPING`` is
    ``stopping``, ``TERMINATED`` (GCE's word for a stopped VM) is ``stopped``,
    ``SUSPENDING``/``SUSPENDED`` are kept, and a deleted VM is ``terminated``.
    """

    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SHUTTING_DOWN = "shutting-down"
    TERMINATED = "terminated"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    UNKNOWN = "unknown"

    # States from which a stop request has nothing left to do.
    STOPPED_OR_STOPPING = frozenset({STOPPING, STOPPED})
    # States from which the instance can never run again.
    GONE = frozenset({SHUTTING_DOWN, TERMINATED})


@runtime_checkable
class CloudActions(Protocol):
    """Stops, terminates, starts and inspects one cloud's instances.

    Every action is idempotent: asking to stop a stopped instance, or to
    terminate a terminated one, returns its state without error. Failures
    raise ``gpufleet.errors.CloudActionError`` naming the provider, the
    instance and the cloud's own error code.
    """

    provider: str

    async def stop_instance(self, host: pb.HostIdentity) -> str:
        """Stops the host's instance and returns the state it reached."""
        ...

    async def terminate_instance(self, host: pb.HostIdentity) -> str:
        """Terminates (deletes) the host's instance and returns its state."""
        ...

    async def start_instance(self, host: pb.HostIdentity) -> str:
        """Starts the host's stopped instance and returns its state."""
        ...

    async def instance_state(self, host: pb.HostIdentity) -> str:
        """Returns the instance's current state, e.g. ``running``."""
        ...


@runtime_checkable
class CloudLauncher(Protocol):
    """Launches GPU instances and finds the ones the broker launched.

    Every backend of ``CloudActions`` implements this too. The instance is
    tagged (AWS) or labelled (GCE) with its fleet, launch id and job, so that
    nothing the broker launched is ever orphaned. A launch is idempotent per
    ``launch_id`` (EC2 ClientToken, GCE requestId): retry a failed call with
    the same id, and give each new offer a new id. ``list_launched`` takes
    ``(region, fleet)`` on AWS and ``(project, zone, fleet)`` on GCE.
    """

    provider: str

    async def launch_instance(
        self, req: LaunchRequest, tpl: LaunchTemplate
    ) -> LaunchedRef:
        """Launches one instance; raises ``LaunchError`` with kind and next_offer."""
        ...
