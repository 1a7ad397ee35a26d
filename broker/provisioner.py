"""Launching hosts for jobs that have none, and releasing them afterwards.

Owned by the broker process. The job manager asks for a host when a pending
or migrating job fits no connected one; the provisioner ranks the market
catalog's offers for the job (price and risk, the zone just preempted
avoided), launches the best one through the cloud's SDK with a startup
script that installs and enrolls the agent, and falls through to the next
offer when a cloud answers "no capacity", "quota" or "price too low". The
job itself is placed by the job manager once the new agent connects.

Every launch is written to the store before the cloud call, carries its
launch id as a tag or label, and ends released: an instance whose agent
never enrolls, whose host was lost, or that ran no job for
``idle_release_s`` is terminated. At start the broker sweeps each configured
region for instances tagged with its fleet that it has no record of.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gpufleet.broker import instancestore as st
from gpufleet.broker.fleet import LIVE, HostState
from gpufleet.broker.instancestore import InstanceStore
from gpufleet.broker.provisioning_config import ProvisioningConfig
from gpufleet.errors import CloudActionError, GpufleetError
from gpufleet.proto import pb

log = structlog.stdlib.get_logger(__name__)

# The label a launched agent carries (written by its startup script); the
# broker matches it to the launch record.
LAUNCH_LABEL = "gpufleet.launch-id"
# How long a zone where a launched instance got a notice is left out.
NOTICED_ZONE_S = 600.0
# A host of a launched instance that is not connected for this long is
# taken as gone (a reclaimed spot instance, a crashed machine) and released.
LOST_RELEASE_S = 120.0
# After every spot offer failed for a job, its policy sees no spot for this
# long (it may then choose on-demand); spot capacity returns within minutes
# to hours, the SkyPilot traces show.
SPOT_RETRY_S = 600.0
# After this many launched instances in a row never enrolled, launching
# pauses, from retry_after_s doubling up to PAUSE_MAX_S.
NEVER_ENROLLED_MAX = 3
PAUSE_MAX_S = 3600.0
# How often the configured regions and zones are searched for instances of
# the fleet that no live record holds (the first search is at start).
SWEEP_INTERVAL_S = 600.0
# Offers tried for one request before the job waits for the next round.
MAX_OFFERS_PER_REQUEST = 8
_LAUNCH_ID = re.compile(r"^[a-z][a-z0-9-]{0,40}$")


@dataclass
class _Wanted:
    """A job's outstanding request for a host."""

    job_id: str
    spec: pb.JobSpec
    lifecycles: tuple[str, ...]
    avoid_zone: str
    reason: str


@dataclass(frozen=True)
class _Failure:
    """One offer's failed launch: what happened, and whether to stop trying
    the other offers of the round (an error every offer would meet)."""

    what: str
    stop: bool


@dataclass(frozen=True)
class _HostIndex:
    """Launched hosts by host id: the lifecycle each was launched with (live
    ones), and those being or already terminated."""

    lifecycles: dict[str, str]
    going: frozenset[str]


class ProvisionError(GpufleetError):
    """A launch could not be asked for; the message says why."""


class Provisioner:
    """Launches and releases instances; see the module docstring.

    Args:
        cfg: the provisioning section.
        catalog: the market catalog (``market.MarketCatalog``) to rank
            offers from.
        store: where launch records live.
        clouds: provider -> cloud actions with ``launch_instance``,
            ``list_launched`` and ``terminate_instance``.
        events: the broker's event bus (``emit``).
        spawn: runs a coroutine as a task the broker owns.
        fleet: the fleet's name, tagged on every instance.
        places: (provider, region or zone, project) searched for orphans.
    """

    def __init__(
        self,
        cfg: ProvisioningConfig,
        catalog: Any,
        store: InstanceStore,
        *,
        clouds: Callable[[str], Any],
        events: Any,
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
        fleet: str,
        metrics: Any = None,
        clock: Callable[[], float] = time.time,
        places: Iterable[tuple[str, str, str]] = (),
    ) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.store = store
        self._clouds = clouds
        self._events = events
        self._spawn = spawn
        self.fleet = fleet
        self._metrics = metrics
        self._clock = clock
        self.instances: dict[str, pb.LaunchedInstance] = {}
        self._next_try: dict[str, float] = {}
        self._idle_since: dict[str, float] = {}
        self._away_since: dict[str, float] = {}
        self._launching: set[str] = set()
        # Launch ids whose cloud call is in flight: the sweep leaves them be.
        self._inflight: set[str] = set()
        self._release_why: dict[str, str] = {}
        self._spot_failed: dict[str, float] = {}
        # Enrolled instances a job has run on: no longer waiting for their job.
        self._used: set[str] = set()
        self._index: _HostIndex | None = None
        # Zones where a launched instance was announced for reclaiming, when.
        self._noticed_zones: dict[str, float] = {}
        self._release_retry_at: dict[str, float] = {}
        # Instances in a row whose agent never enrolled, and the pause of
        # launching that follows.
        self._never_enrolled = 0
        self._paused_until_s = 0.0
        self._has_offer: dict[tuple[Any, ...], bool] = {}
        # Where to look for instances of this fleet that no record holds.
        self.places = list(places)
        self._next_sweep_s = 0.0
        self._sweeping = False
        self._script_cache: dict[str, str] = {}

    async def load(self) -> None:
        self.instances = await self.store.load_all()
        # A launch in flight when the broker stopped is booting now or never
        # started; the enroll timeout and the sweep settle which.
        for launch_id, view in self.instances.items():
            if view.state == st.LAUNCHING:
                view.state = st.BOOTING
                view.detail = "the broker restarted during the launch call"
                await self.store.save(launch_id, view)

    # ------------------------------------------------------------- queries

    def live(self) -> list[pb.LaunchedInstance]:
        return [v for v in self.instances.values() if v.state in st.LIVE_STATES]

    def _instances_in_use(self) -> int:
        """Live instances, and launches that have no instance record yet
        (one whose cloud call is under way has one, and counts once)."""
        live = self.live()
        return len(live) + len(self._launching - {v.job_id for v in live})

    def pending_for(self, job_id: str) -> pb.LaunchedInstance | None:
        """A launch for the job that the job has not used yet: booting, or
        enrolled and still idle (the job lands there on the next tick)."""
        for view in self.instances.values():
            if view.job_id != job_id:
                continue
            if view.state in (st.LAUNCHING, st.BOOTING):
                return view
            if view.state == st.ENROLLED and view.launch_id not in self._used:
                return view
        return None

    def reservations(self) -> dict[str, str]:
        """Enrolled launched hosts by host id, each with the job it was
        launched for."""
        return {
            v.host_id: v.job_id
            for v in self.instances.values()
            if v.state == st.ENROLLED and v.host_id
        }

    def _host_index(self) -> _HostIndex:
        """What placement asks of launched hosts on every tick, for every
        host: worked out once and kept until a record changes (``_set``)."""
        if self._index is None:
            lifecycles: dict[str, str] = {}
            going: set[str] = set()
            for v in self.instances.values():
                if not v.host_id:
                    continue
                if v.state in (st.RELEASING, *st.DONE_STATES):
                    going.add(v.host_id)
                if v.lifecycle and v.state in st.LIVE_STATES:
                    lifecycles[v.host_id] = v.lifecycle
            self._index = _HostIndex(lifecycles, frozenset(going))
        return self._index

    def lifecycle_of(self, host_id: str) -> str | None:
        """The lifecycle the broker launched a host with ("spot" or
        "on-demand"), or None for a host it did not launch."""
        return self._host_index().lifecycles.get(host_id)

    def going(self) -> frozenset[str]:
        """Host ids of launched instances being or already terminated: no
        job may start there, though their agent may still be connected."""
        return self._host_index().going

    def reserved_for(self, host_id: str) -> str:
        """The job an enrolled launched host was started for, or ""."""
        for view in self.instances.values():
            if view.host_id == host_id and view.state == st.ENROLLED:
                return view.job_id
        return ""

    def view_of(self, host: HostState) -> pb.LaunchedInstance | None:
        """The launch record of a host, matched by the instance id its agent
        read from the cloud's metadata service.

        The launch label alone proves nothing: any agent may carry it, and a
        host made from an image of a launched one keeps it. A host whose
        label names a launch but whose instance id is another's gets nothing
        (and its record is not touched).
        """
        instance_id = host.identity.instance_id
        if not instance_id:
            return None
        launch_id = host.labels.get(LAUNCH_LABEL, "")
        view = self.instances.get(launch_id)
        if view is not None and view.instance_id == instance_id:
            return view
        for view in self.instances.values():
            if view.instance_id == instance_id:
                return view
        return None

    def spot_failed_recently(self, job_id: str) -> bool:
        """Whether every spot offer failed for the job lately: its policy
        then sees no spot capacity until SPOT_RETRY_S has passed."""
        return self._clock() - self._spot_failed.get(job_id, -1e18) < SPOT_RETRY_S

    def has_offer(self, spec: pb.JobSpec, lifecycles: tuple[str, ...]) -> bool:
        """Whether the catalog has an offer this broker could launch
        (remembered until the next tick: jobs alike ask alike)."""
        key = (
            max(spec.gpus, 1),
            spec.accelerator,
            spec.max_usd_per_hour,
            lifecycles,
        )
        found = self._has_offer.get(key)
        if found is None:
            found = bool(self._offers(_Wanted("", spec, lifecycles, "", "")))
            self._has_offer[key] = found
        return found

    # ------------------------------------------------------------ requests

    async def request(
        self,
        job_id: str,
        spec: pb.JobSpec,
        *,
        lifecycles: Iterable[str],
        avoid_zone: str = "",
        reason: str = "",
    ) -> str:
        """Starts a launch for the job unless one is under way.

        Returns what happened, for the job's history: ``launching``,
        ``pending`` (a launch for it is under way), ``backoff``,
        ``at-limit: ...`` or ``no-offer: ...``.
        """
        lifecycles = tuple(
            lc for lc in lifecycles if lc == "spot" or self.cfg.on_demand
        )
        if self.pending_for(job_id) is not None or job_id in self._launching:
            return "pending"
        now = self._clock()
        if self._next_try.get(job_id, 0.0) > now:
            return "backoff"
        wanted = _Wanted(
            job_id,
            spec,
            lifecycles,
            avoid_zone if self.cfg.avoid_preempted_zone else "",
            reason,
        )
        # No offer at all is said first: a pause or the limit would hide it.
        offers = self._offers(wanted)
        if not offers:
            self._next_try[job_id] = now + self.cfg.retry_after_s
            return f"no-offer: {self._no_offer_reason(wanted)}"
        used = self._instances_in_use()
        if used >= self.cfg.max_instances:
            return (
                f"at-limit: {used} instance(s) live or launching, "
                f"provisioning.max_instances is {self.cfg.max_instances}"
            )
        if now < self._paused_until_s:
            return (
                f"paused: the last {self._never_enrolled} launched instances never "
                "enrolled; check provisioning.broker_address (new hosts must reach "
                "it), the image (python3 >= 3.11) and the instances' startup log "
                "/var/log/gpufleet-startup.log"
            )
        self._launching.add(job_id)
        self._spawn(self._launch(wanted, offers), f"launch-{job_id}")
        return "launching"

    def _offers(self, w: _Wanted) -> list[Any]:
        if not w.lifecycles:
            return []
        avoid = {w.avoid_zone} - {""}
        now = self._clock()
        noticed = {
            zone
            for zone, at in self._noticed_zones.items()
            if now - at < NOTICED_ZONE_S
        }

        providers = self._providers()
        # Zones where a launched instance was just announced for reclaiming
        # are left out while any other zone has an offer.
        ranked = (
            self._rank(w, avoid | noticed, providers)
            if self.cfg.avoid_preempted_zone
            else []
        )
        if not ranked:
            ranked = self._rank(w, avoid, providers)
        # Spot before on-demand when both are allowed: the order of
        # ``lifecycles`` is the policy's preference, the score ranks within.
        order = {lc: i for i, lc in enumerate(w.lifecycles)}
        offers = [o for _, o in ranked if self._launchable(o)]
        offers.sort(key=lambda o: order.get(o.lifecycle, len(order)))
        return offers[:MAX_OFFERS_PER_REQUEST]

    def _providers(self) -> tuple[str, ...]:
        out = []
        if self.cfg.aws.images:
            out.append("aws")
        if self.cfg.gcp.project and self.cfg.gcp.image:
            out.append("gcp")
        return tuple(out)

    def _launchable(self, offer: Any) -> bool:
        if offer.provider == "aws":
            return offer.region in self.cfg.aws.images
        return offer.provider == "gcp" and bool(offer.zone)

    def _rank(
        self, w: _Wanted, avoid_zones: set[str], providers: Iterable[str] = ()
    ) -> list[tuple[float, Any]]:
        """The catalog's offers that suit the request, best first; every
        cloud's unless ``providers`` names some."""
        return self.catalog.rank(
            self.catalog.offers(),
            gpus=max(w.spec.gpus, 1),
            accelerator=w.spec.accelerator,
            lifecycles=w.lifecycles,
            max_usd_per_hour=w.spec.max_usd_per_hour,
            avoid_zones=avoid_zones,
            providers=providers,
        )

    def _no_offer_reason(self, w: _Wanted) -> str:
        if not w.lifecycles:
            return "on-demand launches are off (provisioning.on_demand: false)"
        parts = [f"{max(w.spec.gpus, 1)} GPU(s)", "/".join(w.lifecycles)]
        if w.spec.accelerator:
            parts.append(f"accelerator {w.spec.accelerator}")
        if w.spec.max_usd_per_hour:
            parts.append(f"at most {w.spec.max_usd_per_hour:g} USD/h")
        if w.avoid_zone:
            parts.append(f"outside {w.avoid_zone}")
        asked = ", ".join(parts)
        fitting = [offer for _, offer in self._rank(w, {w.avoid_zone} - {""})]
        if not fitting:
            return f"no offer in the catalog has {asked}"
        return (
            f"the catalog has {len(fitting)} offer(s) with {asked}, but none "
            "this broker can launch: " + "; ".join(self._unlaunchable(fitting))
        )

    def _unlaunchable(self, offers: list[Any]) -> list[str]:
        """Why each cloud's offers cannot be launched, naming the setting
        that would change it."""
        providers = self._providers()
        why: list[str] = []
        for provider in sorted({o.provider for o in offers}):
            mine = [o for o in offers if o.provider == provider]
            regions = _some(sorted({o.region for o in mine}))
            count = f"{len(mine)} on {provider.upper()}"
            if provider == "aws" and provider not in providers:
                why.append(
                    f"{count} (in {regions}), which has no provisioning.aws "
                    "section: set provisioning.aws.images (an AMI per region)"
                )
            elif provider == "aws":
                why.append(
                    f"{count}, in {regions}, which has no AMI in "
                    "provisioning.aws.images"
                )
            elif provider == "gcp" and provider not in providers:
                why.append(
                    f"{count} (in {regions}), which has no provisioning.gcp "
                    "section: set provisioning.gcp.project (or market.gcp.project) "
                    "and provisioning.gcp.image"
                )
            elif provider == "gcp":
                why.append(
                    f"{count}, priced per region ({regions}): list zones of "
                    "these regions in market.gcp.zones to launch there"
                )
            else:
                why.append(f"{count}: the broker cannot launch on {provider}")
        for provider in ("aws", "gcp"):
            if provider in providers and not any(
                o.provider == provider for o in offers
            ):
                why.append(f"{provider.upper()} has none")
        return why

    # ------------------------------------------------------------- launching

    async def _launch(self, w: _Wanted, offers: list[Any]) -> None:
        tried: list[str] = []
        try:
            for offer in offers:
                failure = await self._try_offer(w, offer)
                if failure is None:
                    return
                tried.append(failure.what)
                if failure.stop:
                    break
            self._next_try[w.job_id] = self._clock() + self.cfg.retry_after_s
            if w.lifecycles and w.lifecycles[0] == "spot":
                self._spot_failed[w.job_id] = self._clock()
            await self._events.emit(
                "instance.launch-failed",
                cause=w.job_id,
                detail="; ".join(tried)[:2000],
            )
            log.warning("instance.launch_failed", job_id=w.job_id, tried=tried)
        finally:
            self._launching.discard(w.job_id)

    async def _try_offer(self, w: _Wanted, offer: Any) -> _Failure | None:
        """Launches one offer; None on success, else what went wrong."""
        from gpufleet.broker.clouds.launch import LaunchRequest

        now = self._clock()
        launch_id = new_launch_id(w.job_id)
        where = _where(offer)
        view = pb.LaunchedInstance(
            launch_id=launch_id,
            provider=offer.provider,
            region=offer.region,
            zone=offer.zone,
            instance_type=offer.instance_type,
            lifecycle=offer.lifecycle,
            usd_per_hour=offer.usd_per_hour,
            state=st.LAUNCHING,
            job_id=w.job_id,
            launched_at_s=now,
            updated_at_s=now,
            project=self.cfg.gcp.project if offer.provider == "gcp" else "",
            detail=w.reason,
        )
        self.instances[launch_id] = view
        await self.store.save(launch_id, view)
        try:
            user_data = self._script(launch_id)
        except (OSError, GpufleetError) as exc:
            await self._set(view, st.FAILED, f"cannot build the startup script: {exc}")
            return _Failure(f"{where}: cannot build the startup script: {exc}", True)
        request = LaunchRequest(
            provider=offer.provider,
            region=offer.region,
            zone=offer.zone,
            instance_type=offer.instance_type,
            lifecycle=offer.lifecycle,
            launch_id=launch_id,
            fleet=self.fleet,
            job_id=w.job_id,
            user_data=user_data,
            max_usd_per_hour=w.spec.max_usd_per_hour,
            project=view.project,
        )
        self._inflight.add(launch_id)
        try:
            cloud = self._clouds(offer.provider)
            ref = await cloud.launch_instance(request, self._template(offer))
        except Exception as exc:
            return await self._launch_failed(view, offer, exc)
        finally:
            self._inflight.discard(launch_id)
        view.instance_id = ref.instance_id
        view.name = ref.name
        view.zone = ref.zone or view.zone
        await self._set(view, st.BOOTING, f"launched for {w.job_id}")
        self._count(offer, "launched")
        await self._events.emit(
            "instance.launched",
            cause=w.job_id,
            provider=offer.provider,
            zone=view.zone or offer.region,
            instance_type=offer.instance_type,
            lifecycle=offer.lifecycle,
            instance_id=ref.instance_id,
            usd_per_hour=float(f"{offer.usd_per_hour:.6g}"),
            launch_id=launch_id,
        )
        log.info(
            "instance.launched",
            job_id=w.job_id,
            launch_id=launch_id,
            instance_id=ref.instance_id,
            where=where,
            lifecycle=offer.lifecycle,
        )
        return None

    async def _launch_failed(
        self, view: pb.LaunchedInstance, offer: Any, exc: Exception
    ) -> _Failure:
        """Records a failed launch call, saying which launch failed and
        whether it failed or ran out of time."""
        from gpufleet.broker.clouds.launch import LaunchError

        where = _where(offer)
        if isinstance(exc, LaunchError):
            kind, stop, reason = exc.kind, not exc.next_offer, exc.reason
        elif isinstance(exc, GpufleetError):
            kind, stop = "error", True
            reason = exc.reason if isinstance(exc, CloudActionError) else str(exc)
        else:
            # A reply the SDK or our parsing did not expect: the instance may
            # exist; the sweep terminates it if so (its launch id is tagged).
            log.error("instance.launch_error", launch_id=view.launch_id, exc_info=exc)
            kind, stop, reason = "error", True, f"unexpected error: {exc!r}"
        timed_out = _timed_out(exc)
        what = (
            f"launch of {offer.lifecycle} {where} "
            f"{'timed out' if timed_out else 'failed'}: {reason}"
        )
        await self._set(view, st.FAILED, f"{'timeout' if timed_out else kind}: {what}")
        self._count(offer, kind)
        if timed_out:
            what += (
                "; an instance the cloud started anyway is terminated by the next sweep"
            )
        return _Failure(what if stop else f"{where}: {kind}", stop)

    def _template(self, offer: Any) -> Any:
        from gpufleet.broker.clouds.launch import LaunchTemplate

        if offer.provider == "aws":
            aws = self.cfg.aws
            return LaunchTemplate(
                image=aws.images[offer.region],
                subnet_ids=dict(aws.subnet_ids),
                security_group_ids=list(aws.security_group_ids),
                iam_instance_profile=aws.iam_instance_profile,
                key_name=aws.key_name,
                disk_gb=aws.disk_gb,
            )
        gcp = self.cfg.gcp
        return LaunchTemplate(
            image=gcp.image,
            network=gcp.network,
            subnetwork=gcp.subnetwork,
            service_account=gcp.service_account,
            disk_gb=gcp.disk_gb,
        )

    def _script(self, launch_id: str) -> str:
        from gpufleet.broker.clouds.launch import render_startup_script

        cfg = self.cfg

        def read(path: Path | None) -> str:
            return Path(path).read_text() if path else ""

        return render_startup_script(
            broker=cfg.broker_address,
            package=cfg.agent_package,
            launch_id=launch_id,
            fleet=self.fleet,
            labels=dict(cfg.labels),
            agent_config=dict(cfg.agent_config or {}),
            ca_pem=read(cfg.tls_ca),
            cert_pem=read(cfg.tls_cert),
            key_pem=read(cfg.tls_key),
        )

    def _count(self, offer: Any, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.instance_launches.labels(
                offer.provider, offer.lifecycle, outcome
            ).inc()

    async def _set(self, view: pb.LaunchedInstance, state: str, detail: str) -> None:
        self._index = None
        view.state = state
        view.detail = detail[:500]
        view.updated_at_s = self._clock()
        await self.store.save(view.launch_id, view)
        if self._metrics is not None:
            counts: dict[str, int] = {}
            for v in self.instances.values():
                counts[v.state] = counts.get(v.state, 0) + 1
            for state_name in (*st.LIVE_STATES, *st.DONE_STATES):
                self._metrics.instances.labels(state_name).set(
                    counts.get(state_name, 0)
                )

    # ------------------------------------------------------------ upkeep

    async def tick(
        self,
        hosts: Mapping[str, HostState],
        busy: Callable[[str], bool],
        job_ended: Callable[[str], bool] = lambda job_id: False,
    ) -> None:
        """Enrolls new agents and releases what is no longer needed.

        One record's trouble (a cloud answering nonsense) never stops the
        others, nor the job manager's tick that calls this.

        Args:
            hosts: the fleet's hosts by id.
            busy: whether a job holds (or is starting on) a host.
            job_ended: whether a job is over (or unknown): an instance
                launched for it and never used is released at once.
        """
        now = self._clock()
        self._has_offer.clear()
        self._maybe_sweep(now)
        enrolled_hosts = set()
        for host in hosts.values():
            view = self.view_of(host)
            if view is None:
                continue
            enrolled_hosts.add(view.launch_id)
            if view.state in (st.LAUNCHING, st.BOOTING):
                await self._guarded(view, self._enroll(view, host, now))
        for view in list(self.instances.values()):
            await self._guarded(
                view, self._upkeep(view, hosts, busy, job_ended, enrolled_hosts, now)
            )

    async def _guarded(
        self, view: pb.LaunchedInstance, step: Coroutine[Any, Any, None]
    ) -> None:
        try:
            await step
        except Exception:
            log.exception("instance.upkeep_failed", launch_id=view.launch_id)
            self._release_retry_at[view.launch_id] = (
                self._clock() + self.cfg.retry_after_s
            )

    async def _never_enrolled_once(self, view: pb.LaunchedInstance, now: float) -> None:
        """Counts an instance whose agent never came; after NEVER_ENROLLED_MAX
        in a row, launching pauses (doubling each time, at most an hour): a
        bad image or an unreachable broker address must not buy hosts
        forever."""
        self._never_enrolled += 1
        if self._never_enrolled < NEVER_ENROLLED_MAX:
            return
        pause_s = min(
            PAUSE_MAX_S,
            self.cfg.retry_after_s * 2 ** (self._never_enrolled - NEVER_ENROLLED_MAX),
        )
        self._paused_until_s = now + pause_s
        log.warning(
            "instance.launches_paused",
            never_enrolled=self._never_enrolled,
            pause_s=pause_s,
            broker_address=self.cfg.broker_address,
        )
        await self._events.emit(
            "instance.launches-paused",
            cause=view.job_id,
            never_enrolled=self._never_enrolled,
            pause_s=pause_s,
            detail="launched instances did not enroll; check "
            "provisioning.broker_address and the image",
        )

    async def _enroll(
        self, view: pb.LaunchedInstance, host: HostState, now: float
    ) -> None:
        self._never_enrolled = 0
        self._paused_until_s = 0.0
        view.host_id = host.host_id
        said = "spot" if host.identity.spot else "on-demand"
        if view.lifecycle and said != view.lifecycle:
            # What the broker launched (and pays for) wins over what the
            # host's metadata says; the difference is worth a look.
            log.warning(
                "instance.lifecycle_mismatch",
                launch_id=view.launch_id,
                launched=view.lifecycle,
                metadata=said,
            )
            await self._events.emit(
                "instance.lifecycle-mismatch",
                host_id=host.host_id,
                cause=view.job_id,
                launch_id=view.launch_id,
                detail=f"launched {view.lifecycle}, its metadata says {said}; "
                f"placement and cost use {view.lifecycle}",
            )
        await self._set(view, st.ENROLLED, f"agent {host.host_id} enrolled")
        await self._events.emit(
            "instance.enrolled",
            host_id=host.host_id,
            cause=view.job_id,
            launch_id=view.launch_id,
            took_s=round(now - view.launched_at_s, 1),
        )

    async def _upkeep(
        self,
        view: pb.LaunchedInstance,
        hosts: Mapping[str, HostState],
        busy: Callable[[str], bool],
        job_ended: Callable[[str], bool],
        enrolled_hosts: set[str],
        now: float,
    ) -> None:
        unused = view.launch_id not in self._used
        if view.state == st.BOOTING and view.launch_id not in enrolled_hosts:
            if view.job_id and job_ended(view.job_id):
                await self.release(view, f"job {view.job_id} ended before it started")
            elif now - view.launched_at_s > self.cfg.enroll_timeout_s:
                await self.release(
                    view,
                    f"its agent did not enroll within "
                    f"{self.cfg.enroll_timeout_s:.0f} s",
                )
                await self._never_enrolled_once(view, now)
        elif view.state == st.ENROLLED:
            if (
                unused
                and view.job_id
                and job_ended(view.job_id)
                and not (busy(view.host_id))
            ):
                await self.release(view, f"job {view.job_id} ended before it started")
            else:
                await self._check_enrolled(view, hosts.get(view.host_id), busy, now)
        elif view.state == st.RELEASING and now >= self._release_retry_at.get(
            view.launch_id, 0.0
        ):
            await self.release(view, self._release_why.get(view.launch_id, "release"))

    async def _check_enrolled(
        self,
        view: pb.LaunchedInstance,
        host: HostState | None,
        busy: Callable[[str], bool],
        now: float,
    ) -> None:
        if host is None or host.status != LIVE:
            away = self._away_since.setdefault(view.launch_id, now)
            if now - away > LOST_RELEASE_S:
                await self.release(view, "its host is gone")
            return
        self._away_since.pop(view.launch_id, None)
        if busy(view.host_id):
            self._idle_since.pop(view.launch_id, None)
            self._used.add(view.launch_id)
            return
        if host.leaving:
            # The cloud announced it takes the instance back and no job runs
            # there: it is of no use, and its zone is left out for a while.
            if view.zone:
                self._noticed_zones[view.zone] = now
            await self.release(view, "its cloud announced it will take it back")
            return
        idle = self._idle_since.setdefault(view.launch_id, now)
        if now - idle > self.cfg.idle_release_s:
            await self.release(
                view, f"no job ran on it for {self.cfg.idle_release_s:.0f} s"
            )

    async def release(self, view: pb.LaunchedInstance, why: str) -> None:
        """Terminates a launched instance; a failed call is retried after
        ``retry_after_s``. An instance the cloud no longer knows is gone."""
        if view.state in st.DONE_STATES:
            return
        self._release_why.setdefault(view.launch_id, why)
        why = self._release_why[view.launch_id]
        if view.state != st.RELEASING:
            await self._set(view, st.RELEASING, why)
        if not view.instance_id:
            await self._find(view)
        if not view.instance_id:
            await self._set(view, st.FAILED, f"{why}; the cloud never named it")
            return
        try:
            cloud = self._clouds(view.provider)
            state = await cloud.terminate_instance(identity_of(view))
        except Exception as exc:
            log.warning(
                "instance.release_failed", launch_id=view.launch_id, error=str(exc)
            )
            view.detail = f"{why}; terminate failed, retrying: {exc}"[:500]
            await self.store.save(view.launch_id, view)
            self._release_retry_at[view.launch_id] = (
                self._clock() + self.cfg.retry_after_s
            )
            return
        self._idle_since.pop(view.launch_id, None)
        self._away_since.pop(view.launch_id, None)
        self._release_why.pop(view.launch_id, None)
        # The event first: whoever sees the state "released" finds its event.
        await self._events.emit(
            "instance.released",
            host_id=view.host_id,
            cause=view.job_id,
            launch_id=view.launch_id,
            instance_id=view.instance_id,
            detail=why,
        )
        await self._set(view, st.RELEASED, f"{why}; {state}")

    async def _find(self, view: pb.LaunchedInstance) -> None:
        """Looks a launch without an instance id up by its tag or label (a
        broker that stopped during the launch call never heard the id)."""
        try:
            cloud = self._clouds(view.provider)
            if view.provider == "aws":
                refs = await cloud.list_launched(view.region, self.fleet)
            elif view.zone:
                refs = await cloud.list_launched(view.project, view.zone, self.fleet)
            else:
                return
        except Exception as exc:
            log.warning("instance.lookup_failed", launch_id=view.launch_id, error=exc)
            return
        for ref in refs:
            if ref.launch_id == view.launch_id and ref.instance_id:
                view.instance_id = ref.instance_id
                view.name = ref.name
                view.zone = ref.zone or view.zone
                await self.store.save(view.launch_id, view)
                return

    async def sweep(self, places: Iterable[tuple[str, str, str]]) -> list[str]:
        """Terminates running instances tagged with this fleet that no live
        record holds: launched by a broker that died before it stored them,
        or whose launch call timed out after the cloud had started them.

        Args:
            places: (provider, region or zone, project) to look in.

        Returns what was terminated, as launch ids.
        """
        from gpufleet.broker.clouds.base import InstanceState

        swept = []
        for provider, where, project in places:
            try:
                cloud = self._clouds(provider)
                if provider == "aws":
                    refs = await cloud.list_launched(where, self.fleet)
                else:
                    refs = await cloud.list_launched(project, where, self.fleet)
            except Exception as exc:
                log.warning("instance.sweep_failed", where=where, error=str(exc))
                continue
            for ref in refs:
                launch_id = ref.launch_id or ref.name or ref.instance_id
                if await self._owned(launch_id, ref):
                    continue
                if ref.state in InstanceState.GONE:
                    continue
                known = self.instances.get(launch_id)
                view = pb.LaunchedInstance(
                    launch_id=launch_id,
                    provider=provider,
                    region=ref.region,
                    zone=ref.zone,
                    project=ref.project,
                    instance_id=ref.instance_id,
                    name=ref.name,
                    lifecycle=ref.lifecycle,
                    instance_type=known.instance_type if known else "",
                    job_id=known.job_id if known else "",
                    state=st.BOOTING,
                    launched_at_s=known.launched_at_s if known else self._clock(),
                )
                self.instances[launch_id] = view
                why = (
                    "running though its launch was recorded as failed"
                    if known
                    else "found without a record (orphan)"
                )
                await self._guarded(view, self.release(view, why))
                swept.append(launch_id)
        return swept

    async def _owned(self, launch_id: str, ref: Any) -> bool:
        """Whether a listed instance belongs to a live record (checked now,
        not when the listing started: a launch may have finished since).
        A live record that never heard its instance id adopts it."""
        if launch_id in self._inflight:
            return True
        view = self.instances.get(launch_id)
        if view is not None and view.state in st.LIVE_STATES:
            if not view.instance_id and ref.instance_id:
                view.instance_id = ref.instance_id
                view.name = ref.name
                view.zone = ref.zone or view.zone
                await self.store.save(launch_id, view)
            return True
        return any(
            v.instance_id == ref.instance_id and v.state in st.LIVE_STATES
            for v in self.instances.values()
        )

    def _maybe_sweep(self, now: float) -> None:
        """Starts a sweep of the configured places every SWEEP_INTERVAL_S."""
        if not self.places or self._sweeping or now < self._next_sweep_s:
            return
        self._next_sweep_s = now + SWEEP_INTERVAL_S
        self._sweeping = True

        async def run() -> None:
            try:
                swept = await self.sweep(self.places)
                if swept:
                    log.warning("instance.orphans_terminated", launch_ids=swept)
            except Exception:
                log.exception("instance.sweep_failed")
            finally:
                self._sweeping = False

        self._spawn(run(), "instance-sweep")


def _where(offer: Any) -> str:
    """``aws us-east-1a g5.xlarge``: an offer in logs and job histories."""
    return f"{offer.provider} {offer.zone or offer.region} {offer.instance_type}"


def _timed_out(exc: BaseException) -> bool:
    """Whether a cloud call failed by running out of time: our own bound
    (``asyncio.timeout``, raised on as an error ``from None``), or the SDK's
    connect or read timeout."""
    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, TimeoutError) or "Timeout" in name:
            return True
        if name == "DeadlineExceeded":  # google.api_core
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _some(names: list[str], most: int = 4) -> str:
    """``a, b, c, d and 3 more``: a list that stays one line."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:most])} and {len(names) - most} more"


def identity_of(view: pb.LaunchedInstance) -> pb.HostIdentity:
    """The host identity the cloud actions address the instance by."""
    return pb.HostIdentity(
        host_id=view.host_id or view.instance_id,
        hostname=view.name,
        provider=view.provider,
        region=view.region,
        zone=view.zone,
        instance_id=view.name if view.provider == "gcp" else view.instance_id,
        instance_type=view.instance_type,
        spot=view.lifecycle == "spot",
        project=view.project,
    )


def new_launch_id(job_id: str) -> str:
    """A launch id: a valid GCE name and EC2 client token, naming the job."""
    stem = re.sub(r"[^a-z0-9-]", "-", job_id.lower()).strip("-")[:24] or "job"
    if not stem[0].isalpha():
        stem = "j" + stem[:23]
    launch_id = f"gf-{stem}-{uuid.uuid4().hex[:8]}"
    assert _LAUNCH_ID.match(launch_id), launch_id
    return launch_id
