"""The catalog's pure decision: which config a slot pushes, and its state."""

from __future__ import annotations

import dataclasses

import pytest

from gpufleet.broker.kernel_choice import cause_of, choose, settled
from gpufleet.broker.kernelstore import (
    REFUSED,
    TUNED,
    VERIFIED,
    PinRecord,
    ReportRecord,
)
from tests.broker.kernel_helpers import MATMUL, make_entry

X, Y, Z = MATMUL[1], MATMUL[2], MATMUL[3]
SLOT = make_entry(X).slot_key
# The config of X and Y that wins when nothing else tells them apart.
LOWER_HASH = min((X, Y), key=lambda c: make_entry(c).config_hash)


def tuned(
    host: str, config: dict[str, int], ms: float, at_s: float = 0.0
) -> ReportRecord:
    entry = make_entry(config, winner_ms=ms, tuned_by=host)
    return ReportRecord(
        slot_key=entry.slot_key,
        config_hash=entry.config_hash,
        host_id=host,
        role=TUNED,
        fingerprint_key=entry.fingerprint.key,
        kernel=entry.kernel,
        tuned_by=host,
        entry=entry,
        config=entry.config,
        entry_ms=ms,
        default_ms=ms * 2,
        at_s=at_s,
        reason="",
    )


def verdict(
    host: str, config: dict[str, int], tuner: str, *, ok: bool = True, ms: float = 0.0
) -> ReportRecord:
    entry = make_entry(config)
    return ReportRecord(
        slot_key=entry.slot_key,
        config_hash=entry.config_hash,
        host_id=host,
        role=VERIFIED if ok else REFUSED,
        fingerprint_key=entry.fingerprint.key,
        kernel=entry.kernel,
        tuned_by=tuner,
        entry=None,
        config={},
        entry_ms=ms,
        default_ms=ms * 2,
        at_s=1.0,
        reason="" if ok else "wrong-result: off",
    )


@pytest.mark.parametrize(
    ("reports", "flagged", "state", "config", "agreeing"),
    [
        pytest.param([tuned("a", X, 2.0)], set(), "agreed", X, 1, id="one-tuner"),
        pytest.param(
            [tuned("a", X, 2.0, at_s=1.0), tuned("b", Y, 1e-300, at_s=2.0)],
            set(),
            "disputed",
            X,
            1,
            id="first-report-breaks-a-tie-a-claimed-time-never-does",
        ),
        pytest.param(
            [tuned("a", X, 2.0, at_s=2.0), tuned("b", Y, 3.0, at_s=1.0)],
            set(),
            "disputed",
            Y,
            1,
            id="first-report-wins-whichever-config-it-is",
        ),
        pytest.param(
            [tuned("a", X, 1.0), tuned("b", Y, 2.0)],
            set(),
            "disputed",
            LOWER_HASH,
            1,
            id="config-hash-breaks-the-last-tie",
        ),
        pytest.param(
            [
                tuned("a", X, 1e-300, at_s=0.0),
                tuned("b", X, 1e-300, at_s=0.0),
                tuned("c", Y, 5.0, at_s=3.0),
                verdict("d", Y, "c", ms=4.0),
            ],
            set(),
            "disputed",
            Y,
            2,
            id="a-verified-time-beats-none",
        ),
        pytest.param(
            [tuned("a", X, 2.0), tuned("b", Y, 1.0), verdict("c", X, "a")],
            set(),
            "disputed",
            X,
            2,
            id="agreement-beats-speed",
        ),
        pytest.param(
            [
                tuned("a", X, 1.0),
                tuned("b", Y, 2.0),
                verdict("c", X, "a", ms=9.0),
                verdict("d", Y, "b", ms=3.0),
            ],
            set(),
            "disputed",
            Y,
            2,
            id="verified-time-beats-tuner-time",
        ),
        pytest.param(
            [
                tuned("a", X, 2.0, at_s=2.0),
                tuned("b", Y, 1.0, at_s=1.0),
                verdict("c", Y, "b", ok=False),
            ],
            set(),
            "disputed",
            Y,
            1,
            id="refused-verdict-is-no-vote",
        ),
        pytest.param(
            [tuned("a", X, 2.0), tuned("b", Y, 1.0), verdict("c", Y, "b")],
            {"c", "b"},
            "agreed",
            X,
            1,
            id="flagged-hosts-count-for-nothing",
        ),
        pytest.param(
            [tuned("a", X, 1.0), verdict("c", X, "a")],
            {"a"},
            "refused",
            None,
            0,
            id="only-a-flagged-tuner-left",
        ),
        pytest.param(
            [tuned("a", X, 1.0), tuned("b", X, 3.0, at_s=-1.0)],
            set(),
            "agreed",
            X,
            2,
            id="two-tuners-one-config",
        ),
    ],
)
def test_choose_picks_by_agreement_then_time(
    reports: list[ReportRecord],
    flagged: set[str],
    state: str,
    config: dict[str, int] | None,
    agreeing: int,
) -> None:
    choice = choose(SLOT, reports, None, flagged)
    assert choice is not None
    assert choice.state == state
    if config is None:
        assert choice.entry is None
        assert choice.template is not None
        return
    assert choice.entry is not None
    assert choice.entry.config == config
    assert choice.entry.agreeing_hosts == agreeing
    assert not choice.entry.pinned


def test_choose_entry_comes_from_the_first_tuner() -> None:
    choice = choose(
        SLOT, [tuned("a", X, 1.0, 5.0), tuned("b", X, 0.5, 2.0)], None, set()
    )
    assert choice is not None
    assert choice.entry is not None
    assert choice.entry.tuned_by == "b"


def test_choose_pin_beats_agreement_even_from_a_flagged_host() -> None:
    reports = [tuned("a", X, 1.0), verdict("c", X, "a"), tuned("b", Y, 9.0)]
    pin = PinRecord(
        SLOT, make_entry(Y).config_hash, "b", make_entry(Y, tuned_by="b"), 3.0
    )
    choice = choose(SLOT, reports, pin, {"b"})
    assert choice is not None
    assert choice.entry is not None
    assert choice.state == "pinned"
    assert choice.entry.config == Y
    assert choice.entry.pinned
    assert choice.entry.agreeing_hosts == 0  # b is flagged


def test_choose_without_reports_or_pin_is_none() -> None:
    assert choose(SLOT, [], None, set()) is None


def test_a_host_agrees_with_what_it_reported_last() -> None:
    """b verified X, then tuned Y: b runs Y now and no longer counts for X."""
    later = tuned("b", Y, 2.0, at_s=5.0)
    choice = choose(
        SLOT,
        [tuned("a", X, 1.0), tuned("c", Y, 3.0), verdict("b", X, "a", ms=1.0), later],
        None,
        set(),
    )
    assert choice is not None
    assert choice.entry is not None
    assert choice.entry.config == Y
    assert choice.entry.agreeing_hosts == 2
    assert choice.state == "disputed"


def test_only_a_real_refusal_settles_a_host() -> None:
    chosen = make_entry(X).config_hash
    refused = verdict("b", X, "a", ok=False)
    crashed = dataclasses.replace(refused, reason="verify-failed: the verifier hung")
    assert settled(chosen, refused)
    assert not settled(chosen, crashed)
    assert settled(chosen, verdict("b", X, "a"))
    assert not settled(chosen, tuned("b", Y, 1.0))
    assert not settled(chosen, None)


def test_a_pin_settles_only_a_host_that_runs_it() -> None:
    """A pinned config goes to refusers too: they verify it again."""
    chosen = make_entry(X).config_hash
    refused = verdict("b", X, "a", ok=False)
    assert not settled(chosen, refused, pinned=True)
    assert settled(chosen, verdict("b", X, "a"), pinned=True)
    assert settled(chosen, tuned("b", X, 1.0), pinned=True)
    assert not settled(chosen, tuned("b", Y, 1.0), pinned=True)


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        ("verify-failed: timed out", "verify-failed"),
        ("verify-failed-xyz: made up", "verify-failed-xyz"),
        ("verify-failedxyz", "verify-failedxyz"),
        (" sender-flagged : a1", "sender-flagged"),
        ("Verify-Failed: x", "unknown"),
        ("\x1b[2J: x", "unknown"),
        ("", "unknown"),
    ],
)
def test_cause_is_the_exact_word_before_the_colon(reason: str, cause: str) -> None:
    assert cause_of(reason) == cause


def test_a_cause_that_only_starts_like_verify_failed_is_a_real_refusal() -> None:
    chosen = make_entry(X).config_hash
    refused = verdict("b", X, "a", ok=False)
    for reason in ("verify-failed-xyz: x", "verify-failedx", "sender-flagged2: y"):
        assert settled(chosen, dataclasses.replace(refused, reason=reason)), reason
