"""How a job's placement policy drives the job manager; part of JobManager.

Owned by the broker process. Each tick the manager asks a job's policy
(``spot_policy``, through ``job_policy``) what the job should run on: which
lifecycles a pending or migrating job may start on, whether a running job
should move to on-demand or back to spot, and, with a provisioner, which
hosts to launch when none fits. It also adds up each running job's time and
cost, and feeds the market catalog the spot hours and preemptions it sees.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from gpufleet.broker import job_policy
from gpufleet.broker.fleet import LIVE, HostState
from gpufleet.broker.jobstore import JobRecord
from gpufleet.broker.spot_policy import Choice

if TYPE_CHECKING:
    from gpufleet.broker.jobs import JobManager

log = structlog.stdlib.get_logger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


class PlacementMixin:
    """The policy side of ``jobs.JobManager``; it owns the state used here."""

    async def _preplace(self: JobManager, record: JobRecord, zone: str) -> None:
        """Starts the replacement host during the notice, for policies that
        use it: the launch overlaps the checkpoint instead of following it."""
        policy = job_policy.policy_of(record.view.spec)
        m = record.migration
        if policy is None or not policy.uses_notice or m is None:
            return
        if self.provisioner is None:
            return
        choice, fallback = self._choose(record, Choice.WAIT)
        allowed = job_policy.lifecycles(choice, fallback=fallback)
        exclude = frozenset({m["from"]})
        if not allowed or self._target(
            record.view.spec,
            exclude,
            zone,
            "",
            "",
            lifecycles=allowed,
            job_id=record.view.job_id,
        ):
            return
        outcome = await self.provisioner.request(
            record.view.job_id,
            record.view.spec,
            lifecycles=allowed,
            avoid_zone=zone,
            reason="pre-placed on the notice",
        )
        await self._note(record, "job.preplacing", outcome)

    def _account(self: JobManager, now: float) -> None:
        """Adds the time since the last tick to running jobs' run time, to
        the cost of jobs holding a host (at its price), and to the catalog's
        spot hours."""
        dt = now - self._last_tick_s if self._last_tick_s else 0.0
        self._last_tick_s = now
        if not 0 < dt < 60:
            return
        for record in self.jobs.values():
            view = record.view
            if view.state not in ("RUNNING", "CHECKPOINTING", "MIGRATING"):
                continue
            host = self.core.fleet.hosts.get(view.host_id)
            if host is None or host.status != LIVE:
                # A lost or disconnected host is no longer the job's: its
                # instance is gone or stopped serving it. Its run time stops
                # too: the policies count it as progress, which is not known.
                continue
            if view.state == "RUNNING":
                view.run_seconds += dt
            # The host is paid for while the job checkpoints and restores too.
            view.cost_usd += dt / 3600.0 * self._price(host)
            if view.state != "RUNNING":
                continue
            ident = host.identity
            if self.catalog is not None and self._is_spot(host) and ident.provider:
                self.catalog.note_hours(
                    ident.provider,
                    ident.region,
                    ident.zone,
                    ident.instance_type,
                    dt / 3600.0,
                )

    def _is_spot(self: JobManager, host: HostState) -> bool:
        """Whether a host is spot: as launched, for a host the broker
        launched; as its metadata says, for any other."""
        if self.provisioner is not None:
            launched = self.provisioner.lifecycle_of(host.host_id)
            if launched is not None:
                return launched == "spot"
        return host.identity.spot

    def _price(self: JobManager, host: HostState) -> float:
        ident = host.identity
        if self.catalog is not None:
            offer = self.catalog.price_of(
                ident.provider,
                ident.region,
                ident.zone,
                ident.instance_type,
                "spot" if self._is_spot(host) else "on-demand",
            )
            if offer is not None:
                return float(offer.usd_per_hour)
        return self.prices.price_for(ident).usd_per_hour

    def _spot_available(
        self: JobManager, record: JobRecord, exclude: frozenset[str]
    ) -> bool:
        """Whether the job could get a spot host now: a connected one that
        fits, or (with provisioning) a spot offer in the catalog."""
        spec = record.view.spec
        if self._target(
            spec, exclude, "", "", "", lifecycles=("spot",), job_id=record.view.job_id
        ):
            return True
        if self.provisioner is None or self.catalog is None:
            return False
        if self.provisioner.spot_failed_recently(record.view.job_id):
            return False
        return self.provisioner.has_offer(spec, ("spot",))

    def _choose(
        self: JobManager, record: JobRecord, current: Choice, notice: bool = False
    ) -> tuple[Choice, bool]:
        """The job's policy choice now, and whether a failed spot launch may
        fall through to on-demand (when the policy would run on-demand rather
        than wait if there were no spot at all)."""
        policy = job_policy.policy_of(record.view.spec)
        assert policy is not None
        now = time.time()
        exclude = (
            frozenset({record.view.host_id})
            if current == Choice.WAIT
            else (frozenset())
        )
        host = self.core.fleet.hosts.get(record.view.host_id)
        if current == Choice.SPOT and host is not None and not host.leaving:
            # The job's own spot host is spot capacity it has: the policy's
            # "available" means "can run on spot now", not "another is free".
            available = True
        else:
            available = self._spot_available(record, exclude)
        kwargs = {
            "now_s": now,
            "restart_s": self.restart_s,
            "current": current,
            "notice": notice,
        }
        choice = job_policy.decide(
            policy, record.view, spot_available=available, **kwargs
        )
        without = job_policy.decide(policy, record.view, spot_available=False, **kwargs)
        return choice, without == Choice.ON_DEMAND

    async def _apply_policies(self: JobManager, now: float) -> None:
        """Moves running jobs whose policy now wants the other lifecycle:
        to on-demand when the slack says so, back to spot when ahead."""
        for record in list(self.jobs.values()):
            view = record.view
            if view.state != "RUNNING" or record.migration is not None:
                continue
            if job_policy.policy_of(view.spec) is None:
                continue
            if not view.spec.checkpoint_url:
                # Without a shared checkpoint a move would restart the job
                # from scratch: its policy places it, but never moves it.
                continue
            host = self.core.fleet.hosts.get(view.host_id)
            if host is None or host.leaving:
                continue
            if now - self._switched_at.get(view.job_id, 0.0) < (
                job_policy.MIN_SWITCH_INTERVAL_S
            ):
                continue
            current = job_policy.choice_of(self._is_spot(host))
            choice, _ = self._choose(record, current)
            if choice in (current, Choice.WAIT):
                continue
            allowed = job_policy.lifecycles(choice, fallback=False)
            exclude = frozenset({view.host_id})
            target = self._target(
                view.spec,
                exclude,
                "",
                "",
                "",
                lifecycles=allowed,
                job_id=view.job_id,
            )
            if target is None:
                if self.provisioner is not None:
                    outcome = await self.provisioner.request(
                        view.job_id,
                        view.spec,
                        lifecycles=allowed,
                        reason=f"policy chose {choice}",
                    )
                    await self._note_once(
                        record, "job.policy-launch", f"{choice}: {outcome}"
                    )
                continue
            self._switched_at[view.job_id] = now
            await self.migrate(
                view.job_id, to_host_id=target.host_id, reason=f"policy-{choice}"
            )

    async def _note_once(
        self: JobManager, record: JobRecord, kind: str, detail: str
    ) -> None:
        """Notes a waiting reason once, not on every tick."""
        key = f"{kind}:{detail}"
        if self._waiting_noted.get(record.view.job_id) == key:
            return
        self._waiting_noted[record.view.job_id] = key
        await self._note(record, kind, detail)

    async def _allowed(self: JobManager, record: JobRecord) -> tuple[str, ...]:
        """The lifecycles a job between hosts may start on now, best first;
        empty while its policy chooses to wait for spot."""
        if job_policy.policy_of(record.view.spec) is None:
            return ("on-demand", "spot")
        choice, fallback = self._choose(record, Choice.WAIT)
        allowed = job_policy.lifecycles(choice, fallback=fallback)
        if not allowed:
            await self._note_once(
                record, "job.waiting-for-spot", "its policy waits for spot capacity"
            )
        return allowed

    async def _provision(
        self: JobManager,
        record: JobRecord,
        allowed: tuple[str, ...],
        avoid_zone: str,
        why: str,
    ) -> None:
        """Asks the provisioner for a host; notes the outcome once."""
        if self.provisioner is None:
            return
        if job_policy.policy_of(record.view.spec) is None:
            # A plain job launches the cheaper spot capacity first when it
            # checkpoints (a preemption then moves it), on-demand otherwise
            # (a preemption would lose all its work).
            allowed = (
                ("spot", "on-demand")
                if record.view.spec.checkpoint_url
                else ("on-demand", "spot")
            )
        outcome = await self.provisioner.request(
            record.view.job_id,
            record.view.spec,
            lifecycles=allowed,
            avoid_zone=avoid_zone,
            reason=why,
        )
        if outcome not in ("pending", "backoff"):
            await self._note_once(record, "job.provisioning", outcome)

    def _needs_host(self: JobManager, job_id: str) -> bool:
        record = self.jobs.get(job_id)
        if record is None:
            return False
        view = record.view
        return (view.state == "PENDING" and not view.host_id) or (
            view.state == "MIGRATING"
            and record.migration is not None
            and record.migration.get("phase") == "restore"
        )

    def _job_ended(self: JobManager, job_id: str) -> bool:
        record = self.jobs.get(job_id)
        return record is None or record.view.state in TERMINAL

    async def _check_deadlines(self: JobManager, now: float) -> None:
        """Notes, once, each unfinished job whose deadline has passed."""
        for record in list(self.jobs.values()):
            view = record.view
            deadline = view.spec.deadline_s
            if not deadline or now <= deadline or view.state in TERMINAL:
                continue
            await self._note_once(
                record,
                "job.deadline-missed",
                f"{view.state.lower()} at the deadline, after "
                f"{view.run_seconds / 3600:.2f} h of {view.spec.work_hours:g} h",
            )
