"""Tests of the AWS notice source against the local IMDSv2 server (cases 01-03)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gpufleet.agent.preemption import NoticeWatcher, parse_time
from gpufleet.agent.preemption.aws import AwsSource
from gpufleet.dev.metadata_server import MetadataServer

CASES = Path(__file__).resolve().parents[1] / "cases"
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "aws"
SPOT = "/latest/meta-data/spot/instance-action"
SCHEDULED = "/latest/meta-data/events/maintenance/scheduled"
T0_S = 1_796_299_200.0  # 2026-12-03T12:00:00Z


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, now_s: float = T0_S) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
async def aws() -> AsyncIterator[MetadataServer]:
    server = MetadataServer("aws", instance_id="i-0123456789abcdef0")
    server.start()
    yield server
    server.stop()


async def test_aws_case01_token_renewed_before_ttl_and_notice_seen_by_t62() -> None:
    """Case 01: 60 s tokens, notice at t=61; no request carries a stale token."""
    case = json.loads((CASES / "01-aws-imdsv2-token-expiry-401.json").read_text())
    ttl_s = case["token_ttl_requested_s"]
    clock = FakeClock()
    server = MetadataServer("aws", clock=clock)
    server.start()
    source = AwsSource(server.url, token_ttl_s=ttl_s, clock=clock)
    watcher = NoticeWatcher(source, clock=clock)
    server.schedule_notice("spot-interruption", in_s=61.0)
    times = sorted({*map(float, range(63)), 59.925, 60.5})
    detected_t = None
    try:
        for t in times:
            clock.now_s = T0_S + t
            if await watcher.poll_once():
                detected_t = t
                break
    finally:
        await source.aclose()
        server.stop()

    assert detected_t is not None
    assert detected_t <= case["expect"]["notice_detected_by_t"]
    ages = [r.token_age_s for r in server.requests if r.token_age_s is not None]
    assert max(ages) < 0.9 * ttl_s
    assert all(r.status != 401 for r in server.requests)
    assert source.tokens_issued_total >= 2
    assert watcher.healthy


async def test_aws_source_on_401_renews_and_retries_in_same_poll(
    aws: MetadataServer,
) -> None:
    """A token the server dropped early (case 01's 59.925 s) costs no round."""
    source = AwsSource(aws.url, token_ttl_s=60)
    assert await source.poll() == []
    aws.expire_tokens()
    aws.schedule_notice("spot-interruption")

    notices = await source.poll()
    await source.aclose()

    assert [n.kind for n in notices] == ["spot-interruption"]
    spot = [(r.method, r.status) for r in aws.requests if r.path in (SPOT,)]
    assert spot[-2:] == [("GET", 401), ("GET", 200)]
    assert source.health.auth_failures_total == 0
    assert not source.health.round_failed


async def test_aws_watcher_repeated_401_reports_auth_failing_and_recovers(
    aws: MetadataServer,
) -> None:
    """Case 01: 401s with fresh tokens: health event, backoff, never an exit."""
    source = AwsSource(aws.url, token_ttl_s=60, instance_id="i-0123456789abcdef0")
    watcher = NoticeWatcher(source, interval_s=0.01)
    aws.set_fault("unauthorized")
    with capture_logs() as logs:
        for _ in range(4):
            assert await watcher.poll_once() == []
    delay_s = watcher.next_delay_s()

    assert watcher.auth_failures_total == 4
    assert not watcher.healthy
    assert delay_s > watcher.interval_s
    events = [entry["event"] for entry in logs]
    assert events.count("preemption.metadata_auth_failing") == 1
    assert "preemption.metadata_unhealthy" in events

    aws.set_fault("ok")
    aws.schedule_notice("spot-interruption")
    notices = await watcher.poll_once()
    await source.aclose()
    assert len(notices) == 1
    assert watcher.healthy


async def test_aws_case02_moving_time_gives_one_notice_with_earliest_deadline(
    aws: MetadataServer,
) -> None:
    case = json.loads((CASES / "02-aws-spot-itn-moving-time.json").read_text())
    source = AwsSource(aws.url, token_ttl_s=60)
    watcher = NoticeWatcher(source)
    notices = []
    for response in case["responses"]:
        aws.set_raw(SPOT, json.dumps(response["body"]), response["status"])
        notices += await watcher.poll_once()
    await source.aclose()

    assert len(notices) == case["expect"]["notices_raised"]
    assert notices[0].key == f"{case['instance_id']}:spot:terminate"
    earliest_s = parse_time("2020-04-28T23:02:46.243Z")
    assert notices[0].deadline_s == pytest.approx(earliest_s)
    assert watcher._delivered[notices[0].key].deadline_s == pytest.approx(earliest_s)


async def test_aws_mock_style_moving_time_never_pushes_deadline_back(
    aws: MetadataServer,
) -> None:
    aws.schedule_notice("spot-interruption", moving_time=True)
    source = AwsSource(aws.url, token_ttl_s=60)
    watcher = NoticeWatcher(source)
    notices = []
    for _ in range(3):
        notices += await watcher.poll_once()
    await source.aclose()

    assert len(notices) == 1


@pytest.mark.parametrize("not_after", [None, ""])
async def test_aws_case03_instance_stop_without_notafter_is_one_evacuation(
    aws: MetadataServer, not_after: str | None
) -> None:
    body = (CASES / "03-aws-scheduled-instance-stop-no-notafter.json").read_text()
    if not_after is not None:
        events = json.loads(body)
        events[0]["NotAfter"] = not_after
        body = json.dumps(events)
    aws.set_raw(SCHEDULED, body)
    source = AwsSource(aws.url, token_ttl_s=60)
    watcher = NoticeWatcher(source)
    notices = []
    for _ in range(3):
        notices += await watcher.poll_once()
    await source.aclose()

    assert len(notices) == 1
    notice = notices[0]
    assert (notice.kind, notice.action, notice.evacuate) == (
        "maintenance",
        "instance-stop",
        True,
    )
    assert notice.deadline_s == parse_time("2021-02-25T02:00:00Z")
    assert "to none" in notice.detail
    assert source.health.failures_total == 0


async def test_aws_scheduled_event_from_server_round_trips(aws: MetadataServer) -> None:
    scheduled = aws.schedule_notice("maintenance", action="system-reboot")
    source = AwsSource(aws.url, token_ttl_s=60)
    notices = await source.poll()
    await source.aclose()

    assert [(n.action, n.evacuate) for n in notices] == [("system-reboot", True)]
    assert notices[0].deadline_s == pytest.approx(scheduled.deadline_s, abs=1.0)


async def test_aws_rebalance_is_information_by_default(aws: MetadataServer) -> None:
    aws.set_raw(
        "/latest/meta-data/events/recommendations/rebalance",
        (SAMPLES / "imds_rebalance_recommendation.json").read_text(),
    )
    source = AwsSource(aws.url, token_ttl_s=60)
    notices = await source.poll()
    await source.aclose()

    assert [(n.kind, n.evacuate, n.deadline_s) for n in notices] == [
        ("rebalance-recommendation", False, None)
    ]


async def test_aws_spot_sample_payload_parses(aws: MetadataServer) -> None:
    aws.set_raw(SPOT, (SAMPLES / "imds_spot_instance_action.json").read_text())
    source = AwsSource(aws.url, token_ttl_s=60)
    notices = await source.poll()
    await source.aclose()

    assert notices[0].deadline_s == parse_time("2025-03-31T16:34:24Z")
    assert notices[0].action == "terminate"


async def test_aws_404_html_page_means_no_notice(aws: MetadataServer) -> None:
    aws.set_raw(SPOT, (SAMPLES / "imds_spot_path_404_not_found.html").read_text(), 404)
    source = AwsSource(aws.url, token_ttl_s=60)
    assert await source.poll() == []
    await source.aclose()
    assert source.health.failures_total == 0


@pytest.mark.parametrize(
    "body",
    ['{"action": "terminate", "time": ', "<html><body>oops</body></html>", "\x00\x01"],
    ids=["bad-json", "html", "binary"],
)
async def test_aws_garbled_spot_answer_is_counted_not_raised(
    aws: MetadataServer, body: str
) -> None:
    aws.set_raw(SPOT, body)
    source = AwsSource(aws.url, token_ttl_s=60)
    assert await source.poll() == []
    await source.aclose()
    assert source.health.garbled_total == 1
