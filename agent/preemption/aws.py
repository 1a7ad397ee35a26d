"""AWS notice source: spot interruption, rebalance and scheduled events (IMDSv2).

Runs in the agent daemon. Every request carries an IMDSv2 session token,
renewed before 90 % of its TTL; a 401 costs one immediate renewal and retry
in the same round, so an expired token never hides a notice (case 01).
"""

from __future__ import annotations

import json
import time
from typing import Any

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
    parse_time,
)

log = structlog.stdlib.get_logger(__name__)

DEFAULT_BASE = "http://169.254.169.254"
# The longest TTL IMDS grants (6 hours).
DEFAULT_TOKEN_TTL_S = 21600
# Renew at 90 % of the TTL: aws-sdk-java-v2#5764 saw a 401 75 ms before the
# client-side expiry, because IMDS counts the TTL from issue.
TOKEN_RENEW_RATIO = 0.9
SPOT_PATH = "spot/instance-action"
REBALANCE_PATH = "events/recommendations/rebalance"
SCHEDULED_PATH = "events/maintenance/scheduled"
# Scheduled-event codes after which the instance's processes are gone.
EVACUATE_CODES = frozenset(
    {"instance-stop", "instance-retirement", "system-reboot", "instance-reboot"}
)


class _AuthError(Exception):
    """IMDS refused a fresh token."""


class AwsSource:
    """Polls the AWS instance metadata service for notices.

    Args:
        base: IMDS base URL.
        token_ttl_s: TTL asked for each session token.
        timeout_s: deadline of each HTTP request.
        instance_id: the instance id, when known from identity discovery;
            otherwise read once from IMDS. Part of the dedupe key.
        rebalance_evacuate: whether a rebalance recommendation asks for
            evacuation (it does not announce an interruption by itself).
        clock: epoch-seconds clock, used for token age and detection time.
    """

    provider = "aws"
    long_poll = False

    def __init__(
        self,
        base: str = DEFAULT_BASE,
        *,
        token_ttl_s: int = DEFAULT_TOKEN_TTL_S,
        timeout_s: float = 1.0,
        instance_id: str | None = None,
        rebalance_evacuate: bool = False,
        clock: Clock = time.time,
    ) -> None:
        self.base = base.rstrip("/")
        self.token_ttl_s = token_ttl_s
        self.timeout_s = timeout_s
        self.instance_id = instance_id
        self.rebalance_evacuate = rebalance_evacuate
        self.clock = clock
        self.health = SourceHealth()
        # Three paths, each with at most one renewal and retry.
        self.round_timeout_s = timeout_s * 9
        self.tokens_issued_total = 0
        self._client = new_client(timeout_s)
        self._token: str | None = None
        self._token_issued_s = 0.0

    async def aclose(self) -> None:
        await self._client.aclose()

    async def poll(self) -> list[PreemptionNotice]:
        """One round over the spot, rebalance and scheduled-event paths."""
        self.health.begin_round()
        notices: list[PreemptionNotice] = []
        if self.instance_id is None:
            await self._learn_instance_id()
        for path, parse in (
            (SPOT_PATH, self._parse_spot),
            (REBALANCE_PATH, self._parse_rebalance),
            (SCHEDULED_PATH, self._parse_scheduled),
        ):
            try:
                body = await self._get(path)
                if body is not None:
                    notices.extend(parse(body))
            except _AuthError as exc:
                self.health.record_failure(str(exc), auth=True)
                log.debug("preemption.aws_unauthorized", path=path)
                break  # the other paths would be refused the same way
            except FetchError as exc:
                self.health.record_failure(str(exc))
                log.debug("preemption.aws_fetch_failed", path=path, error=str(exc))
            except (GarbledError, ValueError, TypeError, KeyError) as exc:
                self.health.record_garbled(f"{path}: {exc}")
                log.debug("preemption.aws_garbled", path=path, error=str(exc))
        return notices

    async def _renew_token(self) -> str:
        issued_s = self.clock()
        response = await fetch(
            self._client,
            "PUT",
            f"{self.base}/latest/api/token",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)},
            timeout_s=self.timeout_s,
        )
        if response.status_code != 200:
            raise FetchError(
                f"IMDS token request answered {response.status_code}",
                status=response.status_code,
            )
        token = decode_text(response).strip()
        if not token:
            raise GarbledError("IMDS answered an empty token")
        # Age counts from before the request was sent, never from the answer.
        self._token, self._token_issued_s = token, issued_s
        self.tokens_issued_total += 1
        return token

    async def _valid_token(self) -> str:
        age_s = self.clock() - self._token_issued_s
        if self._token is None or age_s >= self.token_ttl_s * TOKEN_RENEW_RATIO:
            return await self._renew_token()
        return self._token

    async def _get(self, path: str) -> str | None:
        """GETs a meta-data path; None on 404 (no notice)."""
        url = f"{self.base}/latest/meta-data/{path}"
        token = await self._valid_token()
        response = await self._get_with(url, token)
        if response.status_code == 401:
            token = await self._renew_token()
            response = await self._get_with(url, token)
            if response.status_code == 401:
                raise _AuthError(f"IMDS refused a fresh token for {path} (401)")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise FetchError(
                f"{url} answered {response.status_code}", status=response.status_code
            )
        return decode_text(response)

    async def _get_with(self, url: str, token: str) -> httpx.Response:
        return await fetch(
            self._client,
            "GET",
            url,
            headers={"X-aws-ec2-metadata-token": token},
            timeout_s=self.timeout_s,
        )

    async def _learn_instance_id(self) -> None:
        """Reads the instance id for dedupe keys; a failure leaves it unknown."""
        try:
            text = await self._get("instance-id")
        except (FetchError, GarbledError, _AuthError):
            return
        if text and text.strip():
            self.instance_id = text.strip()

    def _parse_spot(self, body: str) -> list[PreemptionNotice]:
        doc = _json_object(body, SPOT_PATH)
        action = str(doc["action"])
        deadline_s = parse_time(doc["time"])
        return [
            PreemptionNotice(
                provider="aws",
                kind="spot-interruption",
                action=action,
                key=f"{self._instance_key()}:spot:{action}",
                deadline_s=deadline_s,
                detected_at_s=self.clock(),
                evacuate=True,
                detail=f"spot {action} at {format_time(deadline_s)}",
                raw=doc,
            )
        ]

    def _parse_rebalance(self, body: str) -> list[PreemptionNotice]:
        doc = _json_object(body, REBALANCE_PATH)
        notice_time = str(doc["noticeTime"])
        if parse_time(notice_time) is None:
            raise GarbledError(f"{REBALANCE_PATH} has an empty noticeTime")
        return [
            PreemptionNotice(
                provider="aws",
                kind="rebalance-recommendation",
                action="rebalance",
                key=f"{self._instance_key()}:rebalance",
                deadline_s=None,
                detected_at_s=self.clock(),
                evacuate=self.rebalance_evacuate,
                detail=f"rebalance recommended at {notice_time}",
                raw=doc,
            )
        ]

    def _parse_scheduled(self, body: str) -> list[PreemptionNotice]:
        if not body.strip():
            return []
        events = json.loads(body)
        if not isinstance(events, list):
            raise GarbledError(f"{SCHEDULED_PATH} is not a JSON list")
        notices = []
        for event in events:
            if not isinstance(event, dict):
                raise GarbledError(f"{SCHEDULED_PATH} holds a non-object entry")
            # "completed" and "canceled" events stay listed for a while.
            if str(event.get("State", "active")).lower() != "active":
                continue
            code = str(event.get("Code", "unknown"))
            not_before_s = parse_time(event.get("NotBefore"))
            not_after_s = parse_time(event.get("NotAfter"))
            event_id = str(event.get("EventId") or f"{code}@{event.get('NotBefore')}")
            notices.append(
                PreemptionNotice(
                    provider="aws",
                    kind="maintenance",
                    action=code,
                    key=f"{self._instance_key()}:{event_id}",
                    deadline_s=not_before_s,
                    detected_at_s=self.clock(),
                    evacuate=code in EVACUATE_CODES,
                    detail=(
                        f"{code} scheduled from {format_time(not_before_s)} to "
                        f"{format_time(not_after_s)}: {event.get('Description', '')}"
                    ),
                    raw=event,
                )
            )
        return notices

    def _instance_key(self) -> str:
        # Once a key has used a name, it stays: a key must never change.
        if self.instance_id is None:
            self.instance_id = "unknown-instance"
        return self.instance_id


def _json_object(body: str, path: str) -> dict[str, Any]:
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise GarbledError(f"{path} is not a JSON object")
    return doc
