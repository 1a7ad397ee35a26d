"""What every preemption-notice source shares: the notice, the source protocol,
health counters, time parsing and one guarded HTTP request.

Runs in the agent daemon, inside the preemption watcher's task. A source never
raises for a failing, slow or garbled metadata service: it records the failure
in its ``SourceHealth`` and returns no notice for that round.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

Clock = Callable[[], float]


@dataclass(frozen=True)
class PreemptionNotice:
    """One announcement that this host will go away (or is paused, for info).

    ``key`` names the event, never the whole payload: emulators and clouds
    move the time field between polls (case 02), so a payload hash would turn
    one interruption into many.
    """

    provider: str
    kind: str
    action: str
    key: str
    deadline_s: float | None
    detected_at_s: float
    evacuate: bool
    detail: str
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class SourceHealth:
    """Counters one source keeps about its metadata service.

    Written only by the source's ``poll``; read by the watcher after each
    round.
    """

    failures_total: int = 0
    auth_failures_total: int = 0
    garbled_total: int = 0
    last_error: str = ""
    round_failed: bool = False
    round_auth_failed: bool = False

    def begin_round(self) -> None:
        self.round_failed = False
        self.round_auth_failed = False

    def record_failure(self, error: str, *, auth: bool = False) -> None:
        self.failures_total += 1
        self.round_failed = True
        self.last_error = error
        if auth:
            self.auth_failures_total += 1
            self.round_auth_failed = True

    def record_garbled(self, error: str) -> None:
        self.garbled_total += 1
        self.record_failure(error)


class PreemptionSource(Protocol):
    """One cloud's notice endpoints; ``poll`` runs one round."""

    provider: str
    health: SourceHealth
    round_timeout_s: float
    long_poll: bool

    async def poll(self) -> list[PreemptionNotice]:
        """Returns the notices present now; never raises for service errors."""
        ...

    async def aclose(self) -> None:
        """Closes the HTTP client and cancels requests in flight."""
        ...


class GarbledError(Exception):
    """A metadata answer arrived but cannot be read."""


class FetchError(Exception):
    """A metadata request failed (refused, timed out, or a 5xx status)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def parse_time(text: object) -> float | None:
    """Parses a cloud timestamp into epoch seconds; None for empty or missing.

    Accepts ISO 8601 (``2020-04-28T23:02:46.243Z``, AWS spot and rebalance),
    RFC 1123 (``Wed, 03 Dec 2026 12:10:30 GMT``, Azure NotBefore) and the
    layout of AWS scheduled events (``25 Feb 2021 02:00:00 GMT``, case 03).
    A date without a zone is read as UTC.

    Raises:
        GarbledError: the text is not empty and is none of these layouts.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise GarbledError(f"time {text!r} is not a string")
    value = text.strip()
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError) as exc:
            raise GarbledError(f"unreadable time {value[:60]!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_time(epoch_s: float | None) -> str:
    """ISO 8601 UTC text for logs and details; "none" for no time."""
    if epoch_s is None:
        return "none"
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def new_client(timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client for a link-local metadata service.

    ``trust_env=False``: a proxy from the environment would only send the
    request somewhere else, and both AWS and GCP refuse proxied requests.
    """
    return httpx.AsyncClient(timeout=timeout_s, trust_env=False)


async def fetch(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    timeout_s: float,
    params: Mapping[str, str] | None = None,
    json_body: Any = None,
) -> httpx.Response:
    """Sends one request with a hard deadline; a 5xx becomes FetchError.

    Other statuses (401, 404, ...) are returned for the caller to interpret.

    Raises:
        FetchError: no answer in ``timeout_s``, connection failed, or 5xx.
    """
    try:
        response = await client.request(
            method,
            url,
            headers=dict(headers),
            params=params,
            json=json_body,
            timeout=timeout_s,
        )
    except httpx.TimeoutException as exc:
        raise FetchError(f"no answer from {url} in {timeout_s} s") from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"request to {url} failed: {exc!r}") from exc
    if response.status_code >= 500:
        raise FetchError(
            f"{url} answered {response.status_code}", status=response.status_code
        )
    return response


def decode_text(response: httpx.Response) -> str:
    """The body as UTF-8 text.

    Raises:
        GarbledError: the body is not UTF-8 or holds NUL bytes.
    """
    try:
        text = response.content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GarbledError(f"{response.url} answered non-UTF-8 bytes") from exc
    if "\x00" in text:
        raise GarbledError(f"{response.url} answered binary data")
    return text
