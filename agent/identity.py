"""Host identity for the agent daemon: which cloud, region, instance and price class.

The agent asks each cloud's instance metadata service at once (AWS IMDSv2, GCP,
Azure IMDS) with a short timeout for the first answer, so off-cloud start-up
costs at most about ``timeout_s``; a service that has answered once gets a
longer budget for the rest. A slow, failing or garbled service never stops
the agent: the host is then treated as off-cloud.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpx
import structlog

from gpufleet.errors import ConfigError
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

PROVIDERS = ("aws", "gcp", "azure")
AWS_TOKEN_TTL_S = 60
_OVERRIDABLE = set(pb.HostIdentity.DESCRIPTOR.fields_by_name)

_Fields = dict[str, Any]


class _GarbledError(Exception):
    """A metadata answer arrived but cannot be read.

    Logged as a warning, unlike a refused connection, which is simply what an
    off-cloud host looks like.
    """


async def _aws(client: httpx.AsyncClient, base: str) -> _Fields:
    """AWS IMDSv2: a PUT for a session token, then GETs carrying it."""
    token_response = await client.put(
        f"{base}/latest/api/token",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)},
    )
    token_response.raise_for_status()
    headers = {"X-aws-ec2-metadata-token": token_response.text.strip()}

    async def get(path: str) -> str:
        response = await client.get(f"{base}/latest/meta-data/{path}", headers=headers)
        response.raise_for_status()
        return response.text.strip()

    instance_id, instance_type, region, zone, life_cycle = await asyncio.gather(
        get("instance-id"),
        get("instance-type"),
        get("placement/region"),
        get("placement/availability-zone"),
        get("instance-life-cycle"),
    )
    if not instance_id.startswith("i-"):
        raise _GarbledError(f"instance-id {instance_id[:40]!r} is not an EC2 id")
    return {
        "instance_id": instance_id,
        "instance_type": instance_type,
        "region": region,
        "zone": zone,
        "spot": life_cycle == "spot",
    }


async def _gcp(client: httpx.AsyncClient, base: str) -> _Fields:
    """GCP metadata server; every request carries Metadata-Flavor: Google."""
    headers = {"Metadata-Flavor": "Google"}

    async def get(path: str, *, missing_ok: bool = False) -> str:
        response = await client.get(
            f"{base}/computeMetadata/v1/{path}", headers=headers
        )
        if missing_ok and response.status_code == 404:
            return ""
        response.raise_for_status()
        if response.headers.get("Metadata-Flavor") != "Google":
            raise _GarbledError("answer lacks the Metadata-Flavor: Google header")
        return response.text.strip()

    (
        instance_id,
        zone_path,
        machine_path,
        model,
        preemptible,
        project,
    ) = await asyncio.gather(
        get("instance/id"),
        get("instance/zone"),
        get("instance/machine-type"),
        get("instance/scheduling/provisioning-model", missing_ok=True),
        get("instance/scheduling/preemptible", missing_ok=True),
        get("project/project-id"),
    )
    # zone is "projects/<number>/zones/<zone>"; the region drops the last part.
    zone = zone_path.rsplit("/", 1)[-1]
    if not instance_id.isdigit() or "-" not in zone:
        raise _GarbledError(f"instance id {instance_id[:40]!r}, zone {zone[:40]!r}")
    return {
        "instance_id": instance_id,
        "instance_type": machine_path.rsplit("/", 1)[-1],
        "zone": zone,
        "region": zone.rsplit("-", 1)[0],
        "spot": model.upper() == "SPOT" or preemptible.upper() == "TRUE",
        "project": project,
    }


async def _azure(client: httpx.AsyncClient, base: str) -> _Fields:
    """Azure IMDS; requests carry Metadata: true and no proxy."""
    response = await client.get(
        f"{base}/metadata/instance",
        params={"api-version": "2021-02-01"},
        headers={"Metadata": "true"},
    )
    response.raise_for_status()
    try:
        compute = json.loads(response.text)["compute"]
        vm_id = str(compute["vmId"])
    except (ValueError, KeyError, TypeError) as exc:
        raise _GarbledError(f"unreadable instance document: {exc!r}") from exc
    # Azure's "Low" priority is the older name of Spot.
    return {
        "instance_id": vm_id,
        "instance_type": str(compute.get("vmSize", "")),
        "region": str(compute.get("location", "")),
        "zone": str(compute.get("zone", "")),
        "spot": str(compute.get("priority", "")).lower() in ("spot", "low"),
    }


_PROBES: dict[str, Callable[[httpx.AsyncClient, str], Awaitable[_Fields]]] = {
    "aws": _aws,
    "gcp": _gcp,
    "azure": _azure,
}


async def _probe(
    provider: str, base: str, timeout_s: float, total_timeout_s: float
) -> _Fields | None:
    """Runs one provider's probe; None when it is not this host's cloud.

    The service has ``timeout_s`` to give a first answer (off-cloud, nothing
    answers, and start-up must stay quick); once it has answered, this is
    the cloud, and the whole probe may take ``total_timeout_s``: a busy
    metadata service must not make a cloud host look off-cloud.
    """
    loop = asyncio.get_running_loop()
    deadline: asyncio.Timeout | None = None
    answered = False

    async def heard(_response: httpx.Response) -> None:
        nonlocal answered
        answered = True
        if deadline is not None:
            when = loop.time() + total_timeout_s
            current = deadline.when()
            if current is None or current < when:
                deadline.reschedule(when)

    # Metadata services are link-local: a proxy from the environment would
    # only send the request somewhere else.
    client = httpx.AsyncClient(
        timeout=max(timeout_s, total_timeout_s),
        trust_env=False,
        event_hooks={"response": [heard]},
    )
    try:
        async with client, asyncio.timeout(timeout_s) as deadline:
            return await _PROBES[provider](client, base)
    except TimeoutError:
        log.debug(
            "identity.probe_timeout",
            provider=provider,
            answered=answered,
            timeout_s=timeout_s,
        )
    except httpx.HTTPStatusError as exc:
        log.debug(
            "identity.probe_refused", provider=provider, status=exc.response.status_code
        )
    except httpx.HTTPError as exc:
        log.debug("identity.probe_unreachable", provider=provider, error=repr(exc))
    except (_GarbledError, UnicodeDecodeError) as exc:
        log.warning("identity.metadata_garbled", provider=provider, error=str(exc))
    return None


def _check_overrides(overrides: dict[str, Any]) -> None:
    problems = []
    scratch = pb.HostIdentity()
    for key, value in overrides.items():
        if key not in _OVERRIDABLE:
            problems.append(f"unknown field {key!r}")
            continue
        try:
            setattr(scratch, key, value)
        except (TypeError, ValueError) as exc:
            problems.append(f"{key}: {value!r} is not valid: {exc}")
    if problems:
        raise ConfigError(
            "host identity overrides",
            problems,
            hint=f"known fields: {', '.join(sorted(_OVERRIDABLE))}",
        )


async def discover_identity(
    *,
    name: str | None = None,
    providers: Iterable[str] = PROVIDERS,
    timeout_s: float = 0.5,
    total_timeout_s: float = 5.0,
    aws_base: str = "http://169.254.169.254",
    gcp_base: str = "http://metadata.google.internal",
    azure_base: str = "http://169.254.169.254",
    overrides: dict[str, Any] | None = None,
) -> pb.HostIdentity:
    """Finds out who this host is.

    Args:
        name: the configured host name, used as host_id off-cloud.
        providers: clouds to probe, in order of preference.
        timeout_s: how long each provider's service has to answer first;
            all run concurrently, so an off-cloud host waits about this long.
        total_timeout_s: how long a provider's whole probe may take once
            its service has answered.
        aws_base: base URL of the AWS IMDS.
        gcp_base: base URL of the GCP metadata server.
        azure_base: base URL of the Azure IMDS.
        overrides: HostIdentity fields set explicitly (simulated hosts). When
            it sets ``provider``, no metadata service is asked.

    Raises:
        ConfigError: overrides name a field HostIdentity does not have.
    """
    overrides = dict(overrides or {})
    _check_overrides(overrides)
    identity = pb.HostIdentity(hostname=socket.gethostname())
    bases = {"aws": aws_base, "gcp": gcp_base, "azure": azure_base}
    wanted = (
        [p for p in providers if p in _PROBES] if "provider" not in overrides else []
    )

    if wanted:
        async with asyncio.TaskGroup() as tg:
            tasks = {
                p: tg.create_task(_probe(p, bases[p], timeout_s, total_timeout_s))
                for p in wanted
            }
        for provider in wanted:
            fields = tasks[provider].result()
            if fields is not None:
                identity.provider = provider
                for key, value in fields.items():
                    setattr(identity, key, value)
                break
        else:
            log.info("identity.off_cloud", providers=",".join(wanted))

    for key, value in overrides.items():
        setattr(identity, key, value)
    if "host_id" not in overrides:
        identity.host_id = identity.instance_id or name or identity.hostname
    log.info(
        "identity.discovered",
        host_id=identity.host_id,
        provider=identity.provider or "none",
        region=identity.region,
        instance_type=identity.instance_type,
        spot=identity.spot,
    )
    return identity
