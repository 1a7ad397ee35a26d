"""The catalog's decision for one kernel slot, apart from any I/O.

Given the reports on a slot (who tuned which config, who verified or
refused it), the administrator's pin and the flagged hosts, ``choose`` says
which config the fleet runs there and in what state the slot is.
"""

from __future__ import annotations

import dataclasses
import math
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


def cause_of(reason: str) -> str:
    """The kebab-case cause at the start of a ``cause: detail`` reason."""
    return reason.split(":", 1)[0].strip() or "unknown"


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


def settled(choice_config_hash: str | None, latest: ReportRecord | None) -> bool:
    """Whether a host needs no push of the chosen config.

    It runs that config (tuned or verified it last), or refused it for a
    reason that a second try would not change.
    """
    if latest is None or choice_config_hash is None:
        return False
    if latest.config_hash != choice_config_hash:
        return False
    if latest.role in (TUNED, VERIFIED):
        return True
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


def _time_ms(chash: str, counting: list[ReportRecord]) -> float:
    """Verified times where there are any, else the tuners' own."""
    mine = [r for r in counting if r.config_hash == chash]
    verified = [r.entry_ms for r in mine if r.role == VERIFIED and r.entry_ms > 0]
    if verified:
        return statistics.fmean(verified)
    tuned = [r.entry.winner_ms for r in mine if r.role == TUNED and r.entry]
    return min(tuned, default=math.inf)


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
    come from that host). Ties in agreement go to
    the lower time (mean verified ``entry_ms`` where hosts verified it, else
    the tuners' ``winner_ms``), then to the lower config hash.

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
    best = min(
        tuned,
        key=lambda c: (-len(agreeing.get(c, ())), _time_ms(c, counting), c),
    )
    first = min(tuned[best], key=lambda r: (r.at_s, r.host_id))
    assert first.entry is not None
    entry = first.entry.with_agreement(len(agreeing.get(best, ())), pinned=False)
    state = AGREED if len(agreeing) <= 1 else DISPUTED
    return Choice(slot_key, fingerprint_key, kernel, state, entry, template)
