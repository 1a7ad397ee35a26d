"""The catalog's pure decision: which config a slot pushes, and its state."""

from __future__ import annotations

import dataclasses

import pytest

from gpufleet.broker.kernel_choice import choose
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
            [tuned("a", X, 2.0), tuned("b", Y, 1.0)],
            set(),
            "disputed",
            Y,
            1,
            id="speed-breaks-a-tie",
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
            [tuned("a", X, 2.0), tuned("b", Y, 1.0), verdict("c", Y, "b", ok=False)],
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
    from gpufleet.broker.kernel_choice import settled

    chosen = make_entry(X).config_hash
    refused = verdict("b", X, "a", ok=False)
    crashed = dataclasses.replace(refused, reason="verify-failed: the verifier hung")
    assert settled(chosen, refused)
    assert not settled(chosen, crashed)
    assert settled(chosen, verdict("b", X, "a"))
    assert not settled(chosen, tuned("b", Y, 1.0))
    assert not settled(chosen, None)
