"""The job manager: placement, job states, and migration on a notice.

Owned by the broker process. Jobs move PENDING -> RUNNING -> SUCCEEDED or
FAILED, or CANCELLED on request. On a preemption notice (or a lost host) a
running job goes CHECKPOINTING -> MIGRATING -> RUNNING on another host. The
migration in progress is stored with the job, so a broker restarted midway
finishes it; every step is an event and a line in the job's history.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog

from gpufleet.broker import job_policy
from gpufleet.broker.core import BrokerCore
from gpufleet.broker.fleet import LIVE, HostState
from gpufleet.broker.job_placement import TERMINAL, PlacementMixin
from gpufleet.broker.jobstore import JobRecord, JobStore
from gpufleet.broker.placement import Candidate, choose_host, hardware_key
from gpufleet.broker.prices import PriceTable
from gpufleet.errors import GpufleetError
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

ACTIVE = ("RUNNING", "CHECKPOINTING", "MIGRATING")
HISTORY_LINES = 200
# A restore that has not reported "running" after this long is retried on
# another host; a target that dies during restore is replaced sooner.
RESTORE_TIMEOUT_S = 120.0
MAX_ATTEMPTS = 5
STOP_TIMEOUT_S = 10.0
JOB_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class JobError(GpufleetError):
    """A job request cannot be carried out; the message says why."""


class InvalidJobError(JobError):
    """A submitted job's fields are wrong; ``problems`` names each flag."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("cannot submit the job: " + "; ".join(self.problems))


class JobManager(PlacementMixin):
    """Every job of the fleet; see the module docstring."""

    def __init__(
        self, core: BrokerCore, jobstore: JobStore, prices: PriceTable
    ) -> None:
        self.core = core
        self.store = jobstore
        self.prices = prices
        self.jobs: dict[str, JobRecord] = {}
        # Set by the broker when the spot market is configured: the market
        # catalog, and the provisioner that launches hosts for jobs.
        self.catalog: Any = None
        self.provisioner: Any = None
        self.restart_s = 900.0
        self._last_tick_s = 0.0
        self._switched_at: dict[str, float] = {}
        self._stale_stopped: set[tuple[str, str, int]] = set()
        self._waiting_noted: dict[str, str] = {}
        self._in_tick = False
        self._tick_candidates: list[Candidate] | None = None

    async def load(self) -> None:
        for record in await self.store.load_all():
            self.jobs[record.view.job_id] = record

    # ------------------------------------------------------------- requests

    async def submit(self, spec: pb.JobSpec) -> pb.JobView:
        problems = []
        if not spec.argv:
            problems.append("the command is empty: give it after --")
        if spec.gpus > 64:
            problems.append(f"--gpus {spec.gpus}: at most 64")
        problems.extend(job_policy.check_spec(spec))
        if problems:
            raise InvalidJobError(problems)
        now = time.time()
        name = re.sub(r"[^A-Za-z0-9._-]", "-", spec.name or "job")[:40]
        view = pb.JobView(
            job_id=f"{name}-{uuid.uuid4().hex[:8]}",
            spec=spec,
            state="PENDING",
            created_at_s=now,
            updated_at_s=now,
            step=-1,
            checkpoint_step=-1,
        )
        record = JobRecord(view)
        self.jobs[view.job_id] = record
        await self._note(
            record, "job.submitted", f"{spec.gpus} GPU(s): {' '.join(spec.argv)}"
        )
        left_s = spec.deadline_s - now
        if spec.deadline_s and spec.work_hours * 3600.0 + self.restart_s > left_s:
            await self._note(
                record,
                "job.deadline-at-risk",
                f"{spec.work_hours:g} h of work and {left_s / 3600.0:.2f} h to the "
                f"deadline leave less than one restart ({self.restart_s:.0f} s): "
                "it runs on on-demand, and any interruption makes it late",
            )
        await self.place_pending()
        return self.jobs[view.job_id].view

    def get(self, job_id: str) -> JobRecord:
        record = self.jobs.get(job_id)
        if record is None:
            raise JobError(
                f"no job {job_id!r}", hint="'gpufleet jobs list' shows the job ids"
            )
        return record

    async def cancel(self, job_id: str) -> pb.JobView:
        record = self.get(job_id)
        view = record.view
        if view.state in TERMINAL:
            return view
        host = self.core.fleet.hosts.get(view.host_id)
        view.state = "CANCELLED"
        record.migration = None
        if host is not None:
            await self._stop(host, job_id, "cancelled")
        await self._note(record, "job.cancelled", "by admin")
        return view

    async def checkpoint_now(self, job_id: str) -> pb.JobView:
        record = self.get(job_id)
        if record.view.state != "RUNNING":
            raise JobError(f"job {job_id} is {record.view.state}, not RUNNING")
        host = self.core.fleet.hosts.get(record.view.host_id)
        if host is None or host.outbox is None:
            raise JobError(
                f"job {job_id}'s host {record.view.host_id} is not connected"
            )
        await self._send(
            host,
            pb.Command(checkpoint_job=pb.CheckpointJob(job_id=job_id, reason="admin")),
        )
        await self._note(record, "job.checkpoint-requested", "by admin")
        return record.view

    async def migrate(
        self,
        job_id: str,
        *,
        to_host_id: str = "",
        reason: str = "admin",
        deadline_s: float = 0.0,
        avoid_zone: str = "",
        notice_at_s: float = 0.0,
    ) -> pb.JobView:
        """Checkpoints a running job and resumes it on another host.

        ``notice_at_s`` is when the cloud's notice was seen (on the agent),
        for the notice-to-checkpoint and notice-to-resume figures.
        """
        record = self.get(job_id)
        view = record.view
        if view.state != "RUNNING":
            raise JobError(f"job {job_id} is {view.state}; only a RUNNING job migrates")
        if to_host_id and to_host_id not in self.core.fleet.hosts:
            raise JobError(
                f"no host {to_host_id!r}", hint="'gpufleet hosts' lists them"
            )
        if to_host_id == view.host_id:
            raise JobError(f"job {job_id} already runs on {to_host_id}")
        if to_host_id and not self._target(view.spec, frozenset(), "", "", to_host_id):
            raise JobError(
                f"host {to_host_id} cannot take job {job_id} now: it is not "
                "connected, is leaving, or has too few free GPUs of the kind "
                "the job needs",
                hint="'gpufleet hosts' and 'gpufleet gpus' show what is free",
            )
        source = self.core.fleet.hosts.get(view.host_id)
        now = time.time()
        record.migration = {
            "from": view.host_id,
            "to": to_host_id,
            "reason": reason,
            "deadline_s": deadline_s,
            "started_at_s": now,
            "notice_at_s": notice_at_s or now,
            "step_at_start": view.step,
            "avoid_zone": avoid_zone,
            "phase": "checkpointing",
            "tried": [],
        }
        view.state = "CHECKPOINTING"
        if source is not None and source.outbox is not None:
            await self._send(
                source,
                pb.Command(
                    checkpoint_job=pb.CheckpointJob(
                        job_id=job_id, deadline_s=deadline_s, reason=reason
                    )
                ),
            )
        else:
            record.migration["phase"] = "restore"
        await self._note(
            record,
            "job.checkpointing",
            (
                f"{reason}; {max(0.0, deadline_s - now):.0f} s to the deadline"
                if deadline_s
                else reason
            ),
        )
        await self.drive(record)
        return view

    # ------------------------------------------------------------- reports

    async def on_update(self, host: HostState, update: pb.JobUpdate) -> None:
        record = self.jobs.get(update.job_id)
        if record is None:
            return
        m = record.migration
        if await self._stop_if_stale(record, host, update):
            return
        if update.attempt != record.view.attempt:
            # A late word from an earlier attempt: only how far it got
            # matters, for the steps a fallback loses.
            if m is not None and update.attempt == record.view.attempt - 1:
                m["step_at_restore"] = max(
                    int(m.get("step_at_restore", -1)), update.step
                )
            return
        view = record.view
        if host.host_id != view.host_id:
            return  # only the host the job runs on speaks for it
        if update.step >= 0:
            view.step = max(view.step, update.step)
        if update.log_tail:
            view.log_tail = update.log_tail[-16384:]
        if update.event == "checkpoint.saved" and update.checkpoint_url:
            view.checkpoint_url = update.checkpoint_url
            view.checkpoint_step = update.checkpoint_step
            await self._note(
                record,
                "job.checkpoint-saved",
                f"step {update.checkpoint_step} at {update.checkpoint_url}",
            )
        elif update.event in (
            "checkpoint.failed",
            "checkpoint.fallback",
            "checkpoint.restored",
        ):
            await self._note(record, f"job.{update.event}", update.detail)
        if host.host_id != view.host_id:
            return
        await self._on_state(record, host, update)

    async def _stop_if_stale(
        self, record: JobRecord, host: HostState, update: pb.JobUpdate
    ) -> bool:
        """Stops a copy of the job that runs where the job no longer is.

        A host that was lost and comes back may still run the attempt the
        job had there, while the job has moved on (or ended). Two copies
        would write the same checkpoints and hold two hosts' GPUs: the
        returning host is told to stop it. The source of a migration under
        way is left alone: it is being stopped already.
        """
        view = record.view
        if update.state in ("succeeded", "failed", "stopped"):
            return False
        # The job's own host and a migration's source were sent their stop
        # (cancel, migration) already.
        m = record.migration
        moving_from = m.get("from") if m else None
        if host.host_id in (view.host_id, moving_from):
            return False
        ended = view.state in TERMINAL
        key = (view.job_id, host.host_id, update.attempt)
        if key in self._stale_stopped or host.outbox is None:
            return True
        self._stale_stopped.add(key)
        where = "it has ended" if ended else f"it runs on {view.host_id or 'no host'}"
        await self._stop(host, view.job_id, "superseded")
        await self._note(
            record,
            "job.stale-copy-stopped",
            f"attempt {update.attempt} still ran on {host.host_id}, but {where}",
        )
        return True

    async def _on_state(
        self, record: JobRecord, host: HostState, u: pb.JobUpdate
    ) -> None:
        view = record.view
        m = record.migration
        # A resumed job has migrated once it says it restored (or trains);
        # a process that starts and dies in its restore has not.
        restored = u.event in ("checkpoint.restored", "step.progress") or (
            not view.checkpoint_url
        )
        restoring = m is not None and m.get("phase") == "restoring"
        if (
            u.state == "running"
            and view.state == "MIGRATING"
            and restoring
            and restored
        ):
            reached = int(m.get("step_at_restore", m.get("step_at_start", -1)))
            if not view.checkpoint_url:
                # No checkpoint to resume from: the job started over.
                lost = max(0, reached)
                lost_text = (
                    f"{lost} (started over: no checkpoint)"
                    if reached >= 0
                    else "unknown (started over: no checkpoint, no steps reported)"
                )
            else:
                lost = max(0, reached - max(view.checkpoint_step, 0))
                lost = lost if m.get("fallback") else 0
                lost_text = str(lost)
            view.steps_lost += lost
            took = time.time() - float(m["started_at_s"])
            metrics = self.core.metrics
            metrics.notice_to_resume.observe(
                max(0.0, time.time() - float(m.get("notice_at_s", m["started_at_s"])))
            )
            metrics.migrations.labels(m.get("reason", "?"), "resumed").inc()
            if lost:
                metrics.steps_lost.inc(lost)
            record.migration = None
            view.state = "RUNNING"
            await self._note(
                record,
                "job.migrated",
                f"to {host.host_id} in {took:.1f} s; steps lost {lost_text}",
            )
        elif u.state == "running" and view.state == "PENDING":
            view.state = "RUNNING"
            await self._note(record, "job.running", f"on {host.host_id}")
        elif u.state in ("succeeded", "failed") and view.state in (
            "RUNNING",
            "PENDING",
        ):
            view.state = "SUCCEEDED" if u.state == "succeeded" else "FAILED"
            await self._note(
                record, f"job.{u.state}", u.detail or f"exit code {u.exit_code}"
            )
        elif (
            u.state in ("succeeded", "failed", "stopped")
            and view.state == "CHECKPOINTING"
        ):
            # The job ended before the migration moved it: resume from the
            # newest checkpoint rather than losing it.
            if u.state == "succeeded":
                view.state = "SUCCEEDED"
                record.migration = None
                await self._note(record, "job.succeeded", "before it could migrate")
            else:
                assert m is not None
                m["phase"] = "restore"
                await self.drive(record)
        elif u.event == "checkpoint.saved" and view.state == "CHECKPOINTING" and m:
            self.core.metrics.notice_to_checkpoint.observe(
                max(0.0, time.time() - float(m.get("notice_at_s", m["started_at_s"])))
            )
            m["phase"] = "restore"
            await self.drive(record)
        await self._save(record)

    async def on_notice(
        self, host: HostState, notice: pb.PreemptionNoticeReport
    ) -> None:
        """Evacuates a host: no new jobs, and every job on it migrates."""
        if notice.key in host.notice_keys:
            return  # the same notice again: one migration per notice
        host.notice_keys.add(notice.key)
        await self.core.events.emit(
            "host.notice",
            host_id=host.host_id,
            cause=notice.kind,
            provider=notice.provider,
            action=notice.action,
            deadline_s=notice.deadline_s,
            evacuate=notice.evacuate,
            detail=notice.detail,
        )
        if not notice.evacuate:
            return
        host.leaving = True
        for record in list(self.jobs.values()):
            if record.view.host_id == host.host_id and record.view.state == "RUNNING":
                await self.migrate(
                    record.view.job_id,
                    reason=f"{notice.provider}-{notice.kind}",
                    deadline_s=notice.deadline_s,
                    avoid_zone=host.identity.zone,
                    notice_at_s=notice.detected_at_s,
                )
                await self._preplace(record, host.identity.zone)
        if self.catalog is not None and host.identity.provider:
            ident = host.identity
            self.catalog.note_preemption(
                ident.provider, ident.region, ident.zone, ident.instance_type
            )

    async def start_failed(
        self, host: HostState, job_id: str, attempt: int, state: str, detail: str
    ) -> None:
        """The agent could not start the job (its program cannot run, or the
        agent refused the start). A new job fails with the agent's reason; a
        job that was moving tries its next host."""
        record = self.jobs.get(job_id)
        if record is None:
            return
        view = record.view
        if view.attempt != attempt or view.host_id != host.host_id:
            return  # an older attempt's answer
        m = record.migration
        text = f"attempt {attempt} on {host.host_id} {state}: {detail}"
        if view.state == "PENDING":
            view.state = "FAILED"
            await self._note(record, "job.start-failed", text)
        elif view.state == "MIGRATING" and m and m.get("phase") == "restoring":
            await self._note(record, "job.start-failed", text)
            m["phase"] = "restore"
            await self.drive(record)

    async def host_gone(self, host: HostState) -> None:
        """A host was lost: its jobs resume elsewhere from their checkpoints."""
        for record in list(self.jobs.values()):
            view = record.view
            if view.host_id != host.host_id:
                continue
            if view.state == "RUNNING":
                await self.migrate(
                    view.job_id, reason="host-lost", avoid_zone=host.identity.zone
                )
            elif view.state in ("CHECKPOINTING", "MIGRATING") and record.migration:
                record.migration["phase"] = "restore"
                await self.drive(record)

    # ------------------------------------------------------------ driving

    async def tick(self) -> None:
        """Places pending jobs and moves migrations past their deadlines."""
        self._in_tick, self._tick_candidates = True, None
        try:
            await self._tick()
        finally:
            self._in_tick, self._tick_candidates = False, None

    async def _tick(self) -> None:
        now = time.time()
        self._account(now)
        if self.provisioner is not None:
            try:
                await self.provisioner.tick(
                    self.core.fleet.hosts, self.holds_host, self._job_ended
                )
            except Exception:
                # Placing and moving jobs must go on whatever a cloud answers.
                log.exception("jobs.provisioner_tick_failed")
        await self.place_pending()
        await self._apply_policies(now)
        await self._check_deadlines(now)
        for record in list(self.jobs.values()):
            m = record.migration
            if not m:
                continue
            deadline = float(m.get("deadline_s") or 0)
            if m["phase"] == "checkpointing" and deadline and now >= deadline:
                m["fallback"] = True
                m["phase"] = "restore"
                await self._note(
                    record,
                    "job.checkpoint-late",
                    "deadline passed; resuming from the newest checkpoint",
                )
                await self.drive(record)
            elif m["phase"] == "restore":
                await self.drive(record)  # waiting for a host that fits
            elif (
                m["phase"] == "restoring"
                and now - float(m.get("restore_at_s", now)) > RESTORE_TIMEOUT_S
            ):
                m["phase"] = "restore"
                await self.drive(record)

    async def drive(self, record: JobRecord) -> None:
        """Moves a migration in its 'restore' phase to a new host."""
        m = record.migration
        view = record.view
        if not m or m["phase"] != "restore":
            await self._save(record)
            return
        if len(m["tried"]) >= MAX_ATTEMPTS:
            view.state = "FAILED"
            record.migration = None
            self.core.metrics.migrations.labels(m.get("reason", "?"), "failed").inc()
            await self._note(
                record, "job.migration-failed", f"after {MAX_ATTEMPTS} targets"
            )
            return
        source = self.core.fleet.hosts.get(m["from"])
        if source is not None and source.outbox is not None and not m.get("stopped"):
            m["stopped"] = True
            await self._stop(source, view.job_id, "migrated")
        exclude = frozenset({m["from"], *m["tried"]})
        prefer = (
            hardware_key(
                source.gpus[u].info for u in view.gpu_uuids if u in source.gpus
            )
            if source
            else ""
        )
        allowed = await self._allowed(record)
        target = None
        if allowed:
            target = self._target(
                view.spec,
                exclude,
                m.get("avoid_zone", ""),
                prefer,
                m.get("to", ""),
                lifecycles=allowed,
                job_id=view.job_id,
            )
        if target is None:
            view.state = "MIGRATING"
            if not m.get("waiting"):
                m["waiting"] = True
                await self._note(record, "job.waiting-for-host", "no host fits yet")
            if allowed and not m.get("to"):
                await self._provision(
                    record, allowed, m.get("avoid_zone", ""), "migration"
                )
            return
        m.pop("waiting", None)
        m["tried"].append(target.host_id)
        m.setdefault("step_at_restore", view.step)
        m["phase"] = "restoring"
        m["restore_at_s"] = time.time()
        view.state = "MIGRATING"
        await self._start(record, target, resume_from=view.checkpoint_url)

    async def place_pending(self) -> None:
        for record in list(self.jobs.values()):
            if record.view.state != "PENDING" or record.view.host_id:
                continue
            allowed = await self._allowed(record)
            if not allowed:
                continue
            target = self._target(
                record.view.spec,
                frozenset(),
                "",
                "",
                "",
                lifecycles=allowed,
                job_id=record.view.job_id,
            )
            if target is not None:
                await self._start(record, target, resume_from="")
            elif self.provisioner is None:
                await self._note_once(
                    record, "job.waiting-for-host", self._why_no_fit(record, allowed)
                )
            else:
                await self._provision(record, allowed, "", "new job")

    def _target(
        self,
        spec: pb.JobSpec,
        exclude: frozenset[str],
        avoid_zone: str,
        prefer: str,
        wanted: str,
        *,
        lifecycles: tuple[str, ...] = ("on-demand", "spot"),
        job_id: str = "",
    ) -> Candidate | None:
        candidates = [
            c
            for c in self._candidates(job_id)
            if (not wanted or c.host_id == wanted)
            and ("spot" if c.spot else "on-demand") in lifecycles
            and (
                not spec.max_usd_per_hour
                or c.usd_per_hour <= 0
                or c.usd_per_hour <= spec.max_usd_per_hour
            )
        ]
        if lifecycles[:1] != ("spot",):
            # On-demand first, or no preference: placement ranks on-demand
            # hosts before spot ones itself.
            return choose_host(
                spec,
                candidates,
                exclude=exclude,
                avoid_zone=avoid_zone,
                prefer_hardware=prefer,
            )
        for spot in (True, False):
            chosen = choose_host(
                spec,
                [c for c in candidates if c.spot == spot],
                exclude=exclude,
                avoid_zone=avoid_zone,
                prefer_hardware=prefer,
            )
            if chosen is not None:
                return chosen
        return None

    def _why_no_fit(self, record: JobRecord, lifecycles: tuple[str, ...]) -> str:
        """Why no connected host takes a pending job, naming a host that
        would but for its price or its lifecycle."""
        spec = record.view.spec
        reason = _no_fit(spec)
        near = choose_host(spec, self._candidates(record.view.job_id))
        if near is None:
            return reason
        kind = "spot" if near.spot else "on-demand"
        if kind not in lifecycles:
            return (
                f"{reason}; {near.host_id} has them but is {kind}, and the "
                f"job's policy takes only {' or '.join(lifecycles)} now"
            )
        return (
            f"{reason}; {near.host_id} has them but costs {near.usd_per_hour:.4g} USD/h"
        )

    def _candidates(self, job_id: str = "") -> list[Candidate]:
        """Connected hosts with their free GPUs, minus hosts launched for
        another job that still waits for them.

        Within a tick the list is built once (a fleet of hundreds of jobs
        would otherwise rebuild it for every job); starting a job drops it.
        """
        if self._tick_candidates is None:
            self._tick_candidates = self._build_candidates()
            if not self._in_tick:
                candidates, self._tick_candidates = self._tick_candidates, None
            else:
                candidates = self._tick_candidates
        else:
            candidates = self._tick_candidates
        if self.provisioner is None:
            return candidates
        reserved = self.provisioner.reservations()
        going = self.provisioner.going()
        out = []
        for c in candidates:
            if c.host_id in going:
                continue
            # A host launched for a job waits for it while it needs one.
            owner = reserved.get(c.host_id, "")
            if owner and owner != job_id and self._needs_host(owner):
                continue
            out.append(c)
        return out

    def _build_candidates(self) -> list[Candidate]:
        # GPUs held per host: a started job holds its GPUs before its agent
        # reports it runs. Keyed by host too, since a UUID is only what an
        # agent reports (cloned or replayed hosts report the same ones).
        busy = {
            (r.view.host_id, u)
            for r in self.jobs.values()
            if r.view.state in ACTIVE or (r.view.state == "PENDING" and r.view.host_id)
            for u in r.view.gpu_uuids
        }
        out = []
        for h in self.core.fleet.hosts.values():
            if h.status != LIVE or h.outbox is None or h.leaving:
                continue
            free = tuple(
                u
                for u, g in sorted(h.gpus.items(), key=lambda kv: kv[1].info.index)
                if (h.host_id, u) not in busy
            )
            out.append(
                Candidate(
                    host_id=h.host_id,
                    zone=h.identity.zone,
                    spot=self._is_spot(h),
                    usd_per_hour=self._price(h),
                    labels=h.labels,
                    free_gpus=free,
                    gpu_infos={u: g.info for u, g in h.gpus.items()},
                    kernel_fingerprints=tuple(h.kernel_fingerprints.values()),
                )
            )
        return out

    async def _start(
        self, record: JobRecord, target: Candidate, *, resume_from: str
    ) -> None:
        self._tick_candidates = None  # its GPUs are taken now
        view = record.view
        view.attempt += 1
        view.host_id = target.host_id
        view.lifecycle = "spot" if target.spot else "on-demand"
        del view.gpu_uuids[:]
        view.gpu_uuids.extend(target.free_gpus[: max(view.spec.gpus, 0)])
        host = self.core.fleet.hosts[target.host_id]
        await self._send(
            host,
            pb.Command(
                start_job=pb.StartJob(
                    job_id=view.job_id,
                    spec=view.spec,
                    gpu_uuids=view.gpu_uuids,
                    resume_from=resume_from,
                    attempt=view.attempt,
                )
            ),
        )
        await self._note(
            record,
            "job.starting",
            f"attempt {view.attempt} on {target.host_id}"
            + (f" from {resume_from}" if resume_from else ""),
        )

    async def _stop(self, host: HostState, job_id: str, reason: str) -> None:
        """Asks a host to stop its process of the job (SIGTERM, then SIGKILL)."""
        stop = pb.StopJob(job_id=job_id, term_timeout_s=STOP_TIMEOUT_S, reason=reason)
        await self._send(host, pb.Command(stop_job=stop))

    async def _send(self, host: HostState, command: pb.Command) -> None:
        command.command_id = uuid.uuid4().hex[:16]
        command.issued_at_s = time.time()
        await self.core.send_command(host, command, action_id=None)

    async def _note(self, record: JobRecord, kind: str, detail: str) -> None:
        view = record.view
        view.updated_at_s = time.time()
        view.history.append(
            pb.JobHistoryLine(at_s=view.updated_at_s, kind=kind, detail=detail)
        )
        if len(view.history) > HISTORY_LINES:
            del view.history[: len(view.history) - HISTORY_LINES]
        await self._save(record)
        await self.core.events.emit(
            kind,
            host_id=view.host_id,
            cause=view.job_id,
            detail=detail,
            state=view.state,
        )
        log.info(kind, job_id=view.job_id, host_id=view.host_id, detail=detail)

    async def _save(self, record: JobRecord) -> None:
        await self.store.save(record)

    def holds_host(self, host_id: str) -> bool:
        """Whether a job runs, or is starting, on the host."""
        return any(
            r.view.host_id == host_id
            and (r.view.state in ACTIVE or r.view.state == "PENDING")
            for r in self.jobs.values()
        )

    def active_on(self, host_id: str) -> bool:
        """Whether a job holds GPUs of the host (the reaper leaves it alone)."""
        return any(
            r.view.host_id == host_id and r.view.state in ACTIVE
            for r in self.jobs.values()
        )

    def as_dict(self, job_id: str) -> dict[str, Any]:
        from google.protobuf import json_format

        return json_format.MessageToDict(
            self.get(job_id).view, preserving_proto_field_name=True
        )


def _no_fit(spec: pb.JobSpec) -> str:
    """Why a pending job has no host yet, in the words of its flags."""
    needs = [f"{max(spec.gpus, 0)} free GPU(s)"]
    if spec.labels:
        needs.append("labels " + ",".join(f"{k}={v}" for k, v in spec.labels.items()))
    if spec.hardware:
        needs.append(f"hardware {spec.hardware}")
    if spec.accelerator:
        needs.append(f"GPUs of model {spec.accelerator}")
    if spec.max_usd_per_hour:
        needs.append(f"at most {spec.max_usd_per_hour:g} USD/h")
    return "no connected host has " + ", ".join(needs)
