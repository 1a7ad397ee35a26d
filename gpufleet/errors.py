"""The exceptions that gpufleet raises to its users, in one tree.

Every message says what failed, why, and what to do, and carries the values
involved as attributes so that callers need not parse it.
"""

from __future__ import annotations


class GpufleetError(Exception):
    """Base of every error gpufleet raises on purpose."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(GpufleetError):
    """A configuration or policy file, or a CLI argument, is invalid.

    ``problems`` lists every problem found, each naming its field.
    """

    def __init__(
        self, source: str, problems: list[str], *, hint: str | None = None
    ) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source}:\n{lines}", hint=hint)


class BrokerUnavailableError(GpufleetError):
    """The broker could not be reached or did not answer in time."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(
            f"cannot reach the broker at {address}: {reason}",
            hint="check that 'gpufleet broker serve' runs there, or pass "
            "--broker / set GPUFLEET_BROKER",
        )


class BrokerTimeoutError(BrokerUnavailableError):
    """The broker did not answer a call within the client's timeout."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(address, reason)
        self.args = (
            f"the broker at {address} did not answer in time ({reason}): it is "
            "not there, or busy",
        )
        self.hint = (
            "check that 'gpufleet broker serve' runs there, or pass a longer --timeout"
        )


class AuthError(GpufleetError):
    """The broker refused the admin token or the agent's credentials."""


class NoGpuLibraryError(GpufleetError):
    """No GPU library is usable on this host."""


class CloudActionError(GpufleetError):
    """A cloud API call (stop or terminate an instance) failed."""

    def __init__(self, provider: str, instance_id: str, reason: str) -> None:
        self.provider = provider
        self.instance_id = instance_id
        self.reason = reason
        super().__init__(f"{provider} action on {instance_id} failed: {reason}")
