"""Cloud actions of the broker: stop, terminate and start instances.

``cloud_for`` picks the backend for a host's provider. The SDKs are optional
extras (``gpufleet[aws]``, ``gpufleet[gcp]``), so each backend is imported
only when asked for.
"""

from __future__ import annotations

from typing import Any

from gpufleet.broker.clouds.base import CloudActions, InstanceState
from gpufleet.errors import ConfigError

PROVIDERS = ("aws", "gcp")


def cloud_for(
    provider: str,
    *,
    aws_endpoint_url: str | None = None,
    gce_endpoint: str | None = None,
    gce_credentials: Any = None,
) -> CloudActions:
    """Returns the cloud actions for ``provider`` ("aws" or "gcp").

    Args:
        provider: the host identity's provider.
        aws_endpoint_url: EC2 endpoint to use instead of AWS's (moto in
            tests); boto3 also honours ``AWS_ENDPOINT_URL``.
        gce_endpoint: Compute API endpoint instead of Google's, e.g.
            ``http://127.0.0.1:PORT``.
        gce_credentials: google-auth credentials; Application Default
            Credentials when None (anonymous for a plain-HTTP endpoint).

    Raises:
        ConfigError: the provider is unknown or its SDK is not installed.
    """
    if provider == "aws":
        try:
            from gpufleet.broker.clouds.aws import AwsActions
        except ImportError as exc:
            raise _missing_sdk("aws", "boto3", exc) from exc
        return AwsActions(endpoint_url=aws_endpoint_url)
    if provider == "gcp":
        try:
            from gpufleet.broker.clouds.gcp import GceActions
        except ImportError as exc:
            raise _missing_sdk("gcp", "google-cloud-compute", exc) from exc
        return GceActions(endpoint=gce_endpoint, credentials=gce_credentials)
    raise ConfigError(
        "cloud provider",
        [
            f"provider {provider!r} has no cloud actions; "
            f"supported: {', '.join(PROVIDERS)}"
        ],
        hint="use the action kill-processes or notify for hosts off these clouds",
    )


def _missing_sdk(provider: str, package: str, exc: ImportError) -> ConfigError:
    return ConfigError(
        "cloud provider",
        [f"provider {provider!r} needs the {package} package: {exc}"],
        hint=f"pip install 'gpufleet[{provider}]' on the broker",
    )


__all__ = ["PROVIDERS", "CloudActions", "InstanceState", "cloud_for"]
