"""Azure notice source: Scheduled Events of the instance metadata service.

Runs in the agent daemon, polling from boot: Azure turns the service on for a
VM at its first call, which may take up to two minutes, and only then starts
sending events ("Scheduled Events", Azure docs). A Freeze is a pause of
seconds, reported as information only (case 05); Preempt, Terminate, Reboot
and Redeploy for this VM ask for evacuation before ``NotBefore``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import structlog

from gpufleet.agent.preemption.base import (
    Clock,
    FetchError,
    GarbledError,
    PreemptionNotice,
    SourceHealth,
    decode_text,
    fetch,
    format_time,
    new_client,
    parse_time,
)

log = structlog.stdlib.get_logger(__name__)

DEFAULT_BASE = "http://169.254.169.254"
API_VERSION = "2020-07-01"
COMPUTE_API_VERSION = "2021-02-01"
# Azure enables Scheduled Events on the first call and answers it late.
FIRST_TIMEOUT_S = 120.0
EVACUATE_TYPES = {
    "Preempt": "preempted",
    "Terminate": "maintenance",
    "Reboot": "maintenance",
    "Redeploy": "maintenance",
}
INFO_TYPES = frozenset({"Freeze"})
_HEADERS = {"Metadata": "true"}


class AzureSource:
    """Polls Azure Scheduled Events and acknowledges them on request.

    Args:
        base: IMDS base URL.
        vm_name: this VM's compute name, matched against each event's
            ``Resources``; read from IMDS when not given.
        timeout_s: deadline of each request after the first.
        first_timeout_s: deadline of the first Scheduled Events request.
        clock: epoch-seconds clock for detection time.
    """

    provider = "azure"
    long_poll = False

    def __init__(
        self,
        base: str = DEFAULT_BASE,
        *,
        vm_name: str | None = None,
        timeout_s: float = 1.0,
        first_timeout_s: float = FIRST_TIMEOUT_S,
        clock: Clock = time.time,
    ) -> None:
        self.base = base.rstrip("/")
        self.vm_name = vm_name
        self.timeout_s = timeout_s
        self.first_timeout_s = first_timeout_s
        self.clock = clock
        self.health = SourceHealth()
        self.round_timeout_s = first_timeout_s + timeout_s * 2
        self.document_incarnation: int | None = None
        self._client = new_client(timeout_s)
        self._answered = False
        self._name_warned = False
        self._first_seen_s: dict[str, float] = {}

    async def aclose(self) -> None:
        await self._client.aclose()

    async def poll(self) -> list[PreemptionNotice]:
        """One GET of the Scheduled Events document."""
        self.health.begin_round()
        if self.vm_name is None:
            await self._learn_vm_name()
        try:
            response = await fetch(
                self._client,
                "GET",
                f"{self.base}/metadata/scheduledevents",
                headers=_HEADERS,
                params={"api-version": API_VERSION},
                timeout_s=self.timeout_s if self._answered else self.first_timeout_s,
            )
            if response.status_code != 200:
                raise FetchError(f"scheduledevents answered {response.status_code}")
            self._answered = True
            return self._parse(decode_text(response))
        except FetchError as exc:
            self.health.record_failure(str(exc))
            log.debug("preemption.azure_fetch_failed", error=str(exc))
        except (GarbledError, ValueError, TypeError, KeyError) as exc:
            self.health.record_garbled(f"scheduledevents: {exc}")
            log.debug("preemption.azure_garbled", error=str(exc))
        return []

    async def acknowledge(self, event_id: str) -> bool:
        """Tells Azure this VM is ready, so the event may start before NotBefore.

        Returns:
            True when IMDS accepted the request; failures are logged.
        """
        try:
            response = await fetch(
                self._client,
                "POST",
                f"{self.base}/metadata/scheduledevents",
                headers=_HEADERS,
                params={"api-version": API_VERSION},
                json_body={"StartRequests": [{"EventId": event_id}]},
                timeout_s=self.timeout_s,
            )
        except FetchError as exc:
            log.warning(
                "preemption.azure_ack_failed", event_id=event_id, error=str(exc)
            )
            return False
        if response.status_code not in (200, 201, 202, 204):
            log.warning(
                "preemption.azure_ack_failed",
                event_id=event_id,
                status=response.status_code,
            )
            return False
        log.info("preemption.azure_acknowledged", event_id=event_id)
        return True

    async def _learn_vm_name(self) -> None:
        try:
            response = await fetch(
                self._client,
                "GET",
                f"{self.base}/metadata/instance/compute/name",
                headers=_HEADERS,
                params={"api-version": COMPUTE_API_VERSION, "format": "text"},
                timeout_s=self.timeout_s,
            )
            name = decode_text(response).strip() if response.status_code == 200 else ""
        except (FetchError, GarbledError) as exc:
            log.debug("preemption.azure_name_unknown", error=str(exc))
            return
        if name and len(name) <= 128 and name.isprintable():
            self.vm_name = name

    def _parse(self, body: str) -> list[PreemptionNotice]:
        doc = json.loads(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("Events"), list):
            raise GarbledError("scheduledevents document has no Events list")
        self.document_incarnation = int(doc.get("DocumentIncarnation", 0))
        notices = []
        for event in doc["Events"]:
            if not isinstance(event, dict):
                raise GarbledError("scheduledevents holds a non-object event")
            notice = self._notice(event)
            if notice is not None:
                notices.append(notice)
        return notices

    def _notice(self, event: dict[str, Any]) -> PreemptionNotice | None:
        event_type = str(event.get("EventType", ""))
        status = str(event.get("EventStatus", ""))
        if status in ("Completed", "Canceled") or not self._concerns_me(event):
            return None
        if event_type not in EVACUATE_TYPES and event_type not in INFO_TYPES:
            log.debug("preemption.azure_event_ignored", event_type=event_type)
            return None
        event_id = str(event.get("EventId") or f"{event_type}@{event.get('NotBefore')}")
        detected_s = self._first_seen_s.setdefault(event_id, self.clock())
        # An empty NotBefore means the event has started or has no set time.
        not_before_s = parse_time(event.get("NotBefore"))
        evacuate = event_type in EVACUATE_TYPES
        deadline_s = not_before_s
        if evacuate and deadline_s is None:
            deadline_s = detected_s
        duration = event.get("DurationInSeconds", -1)
        return PreemptionNotice(
            provider="azure",
            kind=EVACUATE_TYPES.get(event_type, "info"),
            action=event_type,
            key=event_id,
            deadline_s=deadline_s,
            detected_at_s=detected_s,
            evacuate=evacuate,
            detail=(
                f"{event_type} {status or 'Scheduled'}, not before "
                f"{format_time(not_before_s)}, duration {duration} s: "
                f"{event.get('Description', '')}"
            ),
            raw=event,
        )

    def _concerns_me(self, event: dict[str, Any]) -> bool:
        resources = event.get("Resources")
        if not isinstance(resources, list):
            return True
        if self.vm_name is None:
            if not self._name_warned:
                self._name_warned = True
                log.warning(
                    "preemption.azure_vm_name_unknown",
                    hint="every event is taken as this VM's",
                )
            return True
        return self.vm_name in resources
