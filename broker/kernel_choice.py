"""The catalog's decision for one kernel slot, apart from any I/O.

Given the reports on a slot (who tuned which config, who verified or
refused it), the administrator's pin and the flagged hosts, ``choose`` says
which config the fleet runs there and in what state the slot is.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections.abc import Iterable, Mapping

from gpufleet.broker.kernelstore import (
    REFUSED,
    TUNED,
    VERIFIED,
    PinRecord,
    ReportRecord,
)
from gpufleet.kernels.entry import KernelEntry

PINNED = "pinned"
AGREED = "agreed"
DISPUTED = "disputed"
NO_CHOICE = "refused"
SLOT_STATES = (PINNED, AGREED, DISPUTED, NO_CHOICE)
# A verifier that could not reach a verdict (it crashed or timed out) says
# nothing against the tuner, and a host refusing a tuner it flagged earlier
# reported that refusal already: neither flags anyone, and the host is sent
# the entry again when it reconnects.
NON_FLAGGING_CAUSES = frozenset({"verify-failed", "sender-flagged"})
_ROLE_RANK = {REFUSED: 0, VERIFIED: 1, TUNED: 2}
_CAUSE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")


def cause_of(reason: str) -> str:
    """The kebab-case cause at the start of a ``cause: detail`` reason.

    The whole text before the first colon is the cause, compared exactly:
    ``verify-failed-xyz`` is not ``verify-failed``. Anything that is not a
    kebab-case word reads ``unknown``.
    """
    cause = reason.split(":", 1)[0].strip()
    return cause if _CAUSE.match(cause) else "unknown"


def latest_by_host(reports: Iterable[ReportRecord]) -> dict[str, ReportRecord]:
    """Each host's latest report on a slot: what that host runs there now."""
    latest: dict[str, ReportRecord] = {}
    for r in reports:
        current = latest.get(r.host_id)
        if current is None or (r.at_s, _ROLE_RANK.get(r.role, 0)) > (
            current.at_s,
            _ROLE_RANK.get(current.role, 0),
        ):
            latest[r.host_id] = r
    return latest


def settled(
    choice_config_hash: str | None,
    latest: ReportRecord | None,
    *,
    pinned: bool = False,
) -> bool:
    """Whether a host needs no push of the chosen config.

    It runs that config (tuned or verified it last), or refused it for a
    reason that a second try would not change. A pinned config settles only
    a host that runs it: the operator's pin goes to refusers too, which
    verify it again (and run it when it passes).
    """
    if latest is None or choice_config_hash is None:
        return False
    if latest.config_hash != choice_config_hash:
        return False
    if latest.role in (TUNED, VERIFIED):
        return True
    if pinned:
        return False
    return cause_of(latest.reason) not in NON_FLAGGING_CAUSES


@dataclasses.dataclass(frozen=True)
class Choice:
    """What the catalog pushes for one slot, and why.

    ``entry`` is None in state ``refused``: no config is left that counts.
    ``template`` is any tuned entry of the slot, for its descriptive fields.
    """

    slot_key: str
    fingerprint_key: str
    kernel: str
    state: str
    entry: KernelEntry | None
    template: KernelEntry | None

    @property
    def config_hash(self) -> str | None:
        return None if self.entry is None else self.entry.config_hash

    @property
    def pinned(self) -> bool:
        return self.state == PINNED


def _rank(
    chash: str,
    agreeing: Mapping[str, set[str]],
    counting: list[ReportRecord],
    tuned: Mapping[str, list[ReportRecord]],
) -> tuple[int, bool, float, float, str]:
    """The sort key of a config: the lowest is chosen.

    A tuner's own ``winner_ms`` is not in it: a host can claim any time for
    its own winner, so only times that other hosts measured count.
    """
    verified = [
        r.entry_ms
        for r in counting
        if r.config_hash == chash and r.role == VERIFIED and r.entry_ms > 0
    ]
    return (
        -len(agreeing.get(chash, ())),
        not verified,
        statistics.fmean(verified) if verified else 0.0,
        min(r.at_s for r in tuned[chash]),
        chash,
    )


def choose(
    slot_key: str,
    reports: Iterable[ReportRecord],
    pin: PinRecord | None,
    flagged: Mapping[str, object] | set[str],
) -> Choice | None:
    """Chooses a slot's config: pinned, else most agreeing hosts, else fastest.

    Agreement counts distinct hosts whose latest report on the slot tuned or
    accepted a config (what they run now); flagged hosts count for nothing,
    and a config only a flagged host tuned is never chosen (its entry would
    come from that host). Ties in agreement go, in this order, to a config
    that another host verified with a time, to the lower mean verified
    ``entry_ms``, to the config whose first tuned report reached the broker
    earliest (``at_s``), then to the lower config hash. The tuners' own
    ``winner_ms`` never decides: it is whatever the tuner claims.

    Returns:
        None when the slot has neither reports nor a pin.
    """
    reports = list(reports)
    if not reports and pin is None:
        return None
    # A host agrees with the config it runs now: its latest report.
    counting = [
        r
        for r in latest_by_host(reports).values()
        if r.host_id not in flagged and r.role in (TUNED, VERIFIED)
    ]
    agreeing: dict[str, set[str]] = {}
    for r in counting:
        agreeing.setdefault(r.config_hash, set()).add(r.host_id)
    tuned: dict[str, list[ReportRecord]] = {}
    for r in reports:
        if r.host_id not in flagged and r.role == TUNED and r.entry is not None:
            tuned.setdefault(r.config_hash, []).append(r)
    templates = [r.entry for r in reports if r.entry is not None]
    template = templates[0] if templates else (pin.entry if pin else None)
    fingerprint_key = reports[0].fingerprint_key if reports else ""
    kernel = reports[0].kernel if reports else ""
    if pin is not None:
        hosts = len(agreeing.get(pin.config_hash, ()))
        entry = pin.entry.with_agreement(hosts, pinned=True)
        return Choice(
            slot_key,
            entry.fingerprint.key,
            entry.kernel,
            PINNED,
            entry,
            template,
        )
    if not tuned:
        return Choice(slot_key, fingerprint_key, kernel, NO_CHOICE, None, template)
    best = min(tuned, key=lambda c: _rank(c, agreeing, counting, tuned))
    first = min(tuned[best], key=lambda r: (r.at_s, r.host_id))
    assert first.entry is not None
    entry = first.entry.with_agreement(len(agreeing.get(best, ())), pinned=False)
    state = AGREED if len(agreeing) <= 1 else DISPUTED
    return Choice(slot_key, fingerprint_key, kernel, state, entry, template)
