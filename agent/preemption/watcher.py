"""The preemption watcher loop and the choice of source for this host's cloud.

Runs in the agent daemon as one long-lived task. It owns the dedupe state: a
notice is handed on once per key, and again only when its deadline moves
earlier. A failing, slow or garbled metadata service slows the loop down
(backoff) and marks it unhealthy, and never ends it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from gpufleet.agent.preemption import aws, azure, gcp
from gpufleet.agent.preemption.base import (
    Clock,
    PreemptionNotice,
    PreemptionSource,
    format_time,
)

log = structlog.stdlib.get_logger(__name__)

# Rounds in a row that must fail before the watcher reports itself unhealthy;
# one lost answer from a link-local service is noise, three are not.
UNHEALTHY_AFTER_ROUNDS = 3
# Backoff never exceeds this: AWS gives 120 s of notice, GCP and Azure about
# 30 s, so even a struggling service must be asked several times per window.
BACKOFF_MAX_S = 5.0
# A hanging-GET source returns only on a change or after its wait; this gap
# keeps a server that ignores wait_for_change from spinning the loop.
LONG_POLL_GAP_S = 0.05

OnNotice = Callable[[PreemptionNotice], Awaitable[None]]


class NoticeWatcher:
    """Polls one source and hands each new notice on once.

    Args:
        source: the cloud's notice source.
        interval_s: pause between rounds while the service is healthy.
        clock: epoch-seconds clock (fake in tests).
    """

    def __init__(
        self,
        source: PreemptionSource,
        *,
        interval_s: float = 1.0,
        clock: Clock = time.time,
    ) -> None:
        self.source = source
        self.interval_s = interval_s
        self.clock = clock
        self.polls_total = 0
        self.notices_total = 0
        self.consecutive_failures = 0
        self.healthy = True
        self._delivered: dict[str, PreemptionNotice] = {}
        self._auth_reported = False

    @property
    def failures_total(self) -> int:
        return self.source.health.failures_total

    @property
    def auth_failures_total(self) -> int:
        return self.source.health.auth_failures_total

    def health(self) -> dict[str, Any]:
        """A snapshot of the counters, for metrics and the event log."""
        return {
            "provider": self.source.provider,
            "healthy": self.healthy,
            "polls_total": self.polls_total,
            "notices_total": self.notices_total,
            "failures_total": self.failures_total,
            "auth_failures_total": self.auth_failures_total,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.source.health.last_error,
        }

    def next_delay_s(self) -> float:
        """The pause before the next round: doubled per failed round, capped."""
        if self.consecutive_failures:
            base_s = max(self.interval_s, 0.01)
            exponent = min(self.consecutive_failures - 1, 16)
            return min(base_s * 2**exponent, max(BACKOFF_MAX_S, self.interval_s))
        if self.source.long_poll:
            return LONG_POLL_GAP_S
        return self.interval_s

    async def poll_once(self) -> list[PreemptionNotice]:
        """Runs one round; returns the notices that are new or came earlier.

        The returned notices are marked delivered; ``run_loop`` un-marks one
        whose handler failed so that the next round hands it on again.
        """
        self.polls_total += 1
        try:
            async with asyncio.timeout(self.source.round_timeout_s):
                found = await self.source.poll()
        except TimeoutError:
            self.source.health.record_failure(
                f"round took over {self.source.round_timeout_s} s"
            )
            found = []
        except Exception as exc:
            # A source must not raise; one that does costs a round, not the loop.
            log.exception("preemption.source_failed", provider=self.source.provider)
            self.source.health.record_failure(repr(exc))
            found = []
        self._update_health()
        news = (self._news(notice) for notice in found)
        return [notice for notice in news if notice is not None]

    async def run_loop(self, on_notice: OnNotice) -> None:
        """Watches forever; calls ``on_notice`` once per new or earlier notice.

        A handler that raises is logged and its notice handed on again after
        the next round.
        """
        log.info(
            "preemption.watching",
            provider=self.source.provider,
            interval_s=self.interval_s,
        )
        try:
            while True:
                for notice in await self.poll_once():
                    await self._deliver(notice, on_notice)
                await asyncio.sleep(self.next_delay_s())
        finally:
            await asyncio.shield(self.source.aclose())

    async def _deliver(self, notice: PreemptionNotice, on_notice: OnNotice) -> None:
        log.warning(
            "preemption.notice",
            provider=notice.provider,
            kind=notice.kind,
            action=notice.action,
            key=notice.key,
            deadline=format_time(notice.deadline_s),
            evacuate=notice.evacuate,
        )
        try:
            await on_notice(notice)
        except Exception:
            log.exception("preemption.handler_failed", key=notice.key)
            self._forget(notice)

    def _news(self, notice: PreemptionNotice) -> PreemptionNotice | None:
        """The notice to hand on, or None when it says nothing new.

        Invariant: ``_delivered[key]`` holds the earliest deadline handed on
        for that key, so a later poll can never push a deadline back.
        """
        known = self._delivered.get(notice.key)
        if known is not None:
            if notice.deadline_s is None or (
                known.deadline_s is not None and notice.deadline_s >= known.deadline_s
            ):
                return None
            notice = dataclasses.replace(notice, detected_at_s=known.detected_at_s)
        self._delivered[notice.key] = notice
        self.notices_total += 1
        return notice

    def _forget(self, notice: PreemptionNotice) -> None:
        if self._delivered.get(notice.key) is notice:
            del self._delivered[notice.key]
            self.notices_total -= 1

    def _update_health(self) -> None:
        health = self.source.health
        if not health.round_failed:
            if not self.healthy:
                log.info(
                    "preemption.metadata_recovered",
                    provider=self.source.provider,
                    failed_rounds=self.consecutive_failures,
                )
            self.consecutive_failures = 0
            self.healthy = True
            self._auth_reported = False
            return
        self.consecutive_failures += 1
        if health.round_auth_failed and not self._auth_reported:
            self._auth_reported = True
            log.error(
                "preemption.metadata_auth_failing",
                provider=self.source.provider,
                auth_failures_total=health.auth_failures_total,
                hint="IMDS refuses fresh tokens; check the instance's "
                "metadata options (hop limit, http-tokens)",
            )
        if self.healthy and self.consecutive_failures >= UNHEALTHY_AFTER_ROUNDS:
            self.healthy = False
            log.warning(
                "preemption.metadata_unhealthy",
                provider=self.source.provider,
                failed_rounds=self.consecutive_failures,
                error=health.last_error,
            )
        elif self.consecutive_failures % 60 == 0:
            log.warning(
                "preemption.metadata_still_failing",
                provider=self.source.provider,
                repeats=self.consecutive_failures,
                error=health.last_error,
            )


def detect_source(
    identity_provider: str,
    *,
    aws_base: str = aws.DEFAULT_BASE,
    gcp_base: str = gcp.DEFAULT_BASE,
    azure_base: str = azure.DEFAULT_BASE,
    timeout_s: float = 1.0,
    clock: Clock = time.time,
    **options: Any,
) -> PreemptionSource | None:
    """The notice source for the cloud that identity discovery found.

    Args:
        identity_provider: ``HostIdentity.provider``: "aws", "gcp", "azure",
            or "" off-cloud.
        aws_base: AWS IMDS base URL.
        gcp_base: GCP metadata server base URL.
        azure_base: Azure IMDS base URL.
        timeout_s: deadline of each metadata request.
        clock: epoch-seconds clock.
        **options: passed to the source (``instance_id``, ``token_ttl_s``,
            ``rebalance_evacuate`` for AWS; ``wait_s`` for GCP; ``vm_name``,
            ``first_timeout_s`` for Azure).

    Returns:
        The source, or None off-cloud (no notices can come).
    """
    if identity_provider == "aws":
        return aws.AwsSource(aws_base, timeout_s=timeout_s, clock=clock, **options)
    if identity_provider == "gcp":
        return gcp.GcpSource(gcp_base, timeout_s=timeout_s, clock=clock, **options)
    if identity_provider == "azure":
        return azure.AzureSource(
            azure_base, timeout_s=timeout_s, clock=clock, **options
        )
    return None
