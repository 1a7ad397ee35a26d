"""GCP notice source: ``instance/preempted`` and ``instance/maintenance-event``.

Runs in the agent daemon. Both values are watched with hanging GETs
(``wait_for_change=true`` plus the ``last_etag`` of the previous answer, as
the metadata server documents), so a change arrives as soon as the server
knows it, not at the next poll. A request still in flight at the end of a
round is kept for the next round rather than cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
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
)

log = structlog.stdlib.get_logger(__name__)

DEFAULT_BASE = "http://metadata.google.internal"
PREEMPTED = "instance/preempted"
MAINTENANCE = "instance/maintenance-event"
# GCP stops a preempted VM about 30 s after the notice ("Preemption process",
# Compute Engine docs); maintenance with termination gets at least as much.
NOTICE_WINDOW_S = 30.0
# How long the metadata server may hold a hanging GET (its timeout_sec).
DEFAULT_WAIT_S = 60.0
_HEADERS = {"Metadata-Flavor": "Google"}


class GcpSource:
    """Watches the GCP metadata server for preemption and host maintenance.

    Args:
        base: metadata server base URL.
        timeout_s: deadline of a plain request, added to ``wait_s`` for a
            hanging one.
        wait_s: the ``timeout_sec`` asked of each hanging GET.
        clock: epoch-seconds clock for detection time and deadlines.
    """

    provider = "gcp"
    long_poll = True

    def __init__(
        self,
        base: str = DEFAULT_BASE,
        *,
        timeout_s: float = 1.0,
        wait_s: float = DEFAULT_WAIT_S,
        clock: Clock = time.time,
    ) -> None:
        self.base = base.rstrip("/")
        self.timeout_s = timeout_s
        self.wait_s = wait_s
        self.clock = clock
        self.health = SourceHealth()
        self.round_timeout_s = wait_s + timeout_s * 2
        self._client = new_client(timeout_s)
        self._etags: dict[str, str] = {}
        self._values: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Task[httpx.Response]] = {}
        # First detection time per key, so that repeated answers keep one
        # deadline instead of pushing it back each round.
        self._first_seen_s: dict[str, float] = {}
        self._maintenance_episode = 0

    async def aclose(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        for task in self._inflight.values():
            with contextlib.suppress(BaseException):
                await task
        self._inflight.clear()
        await self._client.aclose()

    async def poll(self) -> list[PreemptionNotice]:
        """Waits until a value changes (or ``wait_s`` passes) and reports it."""
        self.health.begin_round()
        plain = []
        for path in (PREEMPTED, MAINTENANCE):
            if path not in self._inflight:
                task = asyncio.create_task(
                    self._request(path), name=f"gcp-metadata-{path}"
                )
                self._inflight[path] = task
                if path not in self._etags:
                    plain.append(task)
        if plain:
            # Plain GETs answer at once: take them all, so that the first
            # round knows both values before any hanging GET starts.
            await asyncio.wait(plain)
        else:
            await asyncio.wait(
                self._inflight.values(), return_when=asyncio.FIRST_COMPLETED
            )
        for path, task in list(self._inflight.items()):
            if task.done():
                del self._inflight[path]
                self._take(path, task)
        return self._notices()

    async def _request(self, path: str) -> httpx.Response:
        params = {}
        timeout_s = self.timeout_s
        if path in self._etags:
            # Without last_etag the server would wait for the next change and
            # miss one that happened between two rounds.
            params = {
                "wait_for_change": "true",
                "last_etag": self._etags[path],
                "timeout_sec": str(int(self.wait_s)),
            }
            timeout_s += self.wait_s
        return await fetch(
            self._client,
            "GET",
            f"{self.base}/computeMetadata/v1/{path}",
            headers=_HEADERS,
            params=params,
            timeout_s=timeout_s,
        )

    def _take(self, path: str, task: asyncio.Task[httpx.Response]) -> None:
        try:
            response = task.result()
            if response.status_code == 404:
                self._values[path] = ""
                return
            if response.status_code != 200:
                raise FetchError(f"{path} answered {response.status_code}")
            if response.headers.get("Metadata-Flavor") != "Google":
                raise GarbledError(f"{path} answer lacks Metadata-Flavor: Google")
            value = decode_text(response).strip()
            _check_value(path, value)
        except FetchError as exc:
            self.health.record_failure(str(exc))
            log.debug("preemption.gcp_fetch_failed", path=path, error=str(exc))
            return
        except GarbledError as exc:
            self.health.record_garbled(str(exc))
            self._etags.pop(path, None)  # ask plainly next time
            log.debug("preemption.gcp_garbled", path=path, error=str(exc))
            return
        etag = response.headers.get("ETag")
        if etag:
            self._etags[path] = etag
        previous = self._values.get(MAINTENANCE, "NONE")
        if path == MAINTENANCE and value not in ("", "NONE", previous):
            self._maintenance_episode += 1
        self._values[path] = value

    def _notices(self) -> list[PreemptionNotice]:
        notices = []
        if self._values.get(PREEMPTED) == "TRUE":
            notices.append(self._notice("preempted", "preempt", "preempted", True))
        maintenance = self._values.get(MAINTENANCE, "NONE")
        if maintenance not in ("", "NONE"):
            # Live migration keeps the VM and its processes running.
            evacuate = maintenance.startswith("TERMINATE")
            notices.append(
                self._notice(
                    "maintenance" if evacuate else "info",
                    maintenance,
                    f"maintenance:{maintenance}:{self._maintenance_episode}",
                    evacuate,
                )
            )
        return notices

    def _notice(
        self, kind: str, action: str, key: str, evacuate: bool
    ) -> PreemptionNotice:
        detected_s = self._first_seen_s.setdefault(key, self.clock())
        deadline_s = detected_s + NOTICE_WINDOW_S if evacuate else None
        return PreemptionNotice(
            provider="gcp",
            kind=kind,
            action=action,
            key=key,
            deadline_s=deadline_s,
            detected_at_s=detected_s,
            evacuate=evacuate,
            detail=f"{action} (stop expected by {format_time(deadline_s)})",
            raw=dict(self._values),
        )


def _check_value(path: str, value: str) -> None:
    """Rejects answers that are neither of the documented shapes."""
    if path == PREEMPTED and value not in ("TRUE", "FALSE"):
        raise GarbledError(f"{path} answered {value[:40]!r}, not TRUE or FALSE")
    if path == MAINTENANCE and (
        not value.replace("_", "").isalnum() or len(value) > 64
    ):
        raise GarbledError(f"{path} answered {value[:40]!r}")
