"""The broker process: wiring of the gRPC server, the store and the loops.

``serve`` is what ``gpufleet broker serve`` calls. One TaskGroup owns every
long-lived loop; SIGTERM or SIGINT stops the gRPC server with a grace period
and closes the store.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import structlog

import gpufleet
from gpufleet.agent import sdnotify
from gpufleet.broker.admin import AdminServicer, TokenInterceptor
from gpufleet.broker.agents import AgentServicer
from gpufleet.broker.config import BrokerConfig, split_addr
from gpufleet.broker.core import BrokerCore
from gpufleet.broker.events import EventBus
from gpufleet.broker.fleet import Fleet
from gpufleet.broker.instancestore import InstanceStore
from gpufleet.broker.jobs import JobManager
from gpufleet.broker.jobstore import JobStore
from gpufleet.broker.kernels import KernelCatalog
from gpufleet.broker.kernelstore import KernelStore
from gpufleet.broker.metrics import BrokerMetrics
from gpufleet.broker.mqtt import MqttPublisher
from gpufleet.broker.policy import FleetPolicy, default_policy, load_policy
from gpufleet.broker.prices import PriceTable
from gpufleet.broker.reaper import Reaper
from gpufleet.broker.store import Store
from gpufleet.errors import ConfigError
from gpufleet.proto import MAX_MESSAGE_BYTES, rpc

log = structlog.stdlib.get_logger(__name__)

# Agents ping every 20 s by default (agent/config.py). The server must
# permit at least that rate without data, or it answers GOAWAY
# "too_many_pings" and drops the streams of quiet hosts.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # gRPC sets SO_REUSEPORT by default, which lets a second broker bind the
    # same port and silently split the agents between the two.
    ("grpc.so_reuseport", 0),
]


class Shutdown(Exception):
    """Raised inside the task group to unwind it on a signal."""


def admin_token(cfg: BrokerConfig) -> str:
    """The admin token: configured, read from its file, or made once."""
    if cfg.admin_token:
        return cfg.admin_token
    path = cfg.token_path
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("admin.token_created", path=str(path))
    return token


async def _initial_policy(cfg: BrokerConfig, store: Store) -> tuple[FleetPolicy, float]:
    if cfg.policy_file is not None:
        path = Path(cfg.policy_file)
        text = await asyncio.to_thread(path.read_text)
        policy = load_policy(text, source=str(path))
        mtime = (await asyncio.to_thread(path.stat)).st_mtime
        await store.save_policy(text, mtime)
        return policy, mtime
    saved = await store.load_policy()
    if saved is not None:
        text, at_s = saved
        return load_policy(text, source="stored policy"), at_s
    return default_policy(), 0.0


def _market(cfg: BrokerConfig, metrics: BrokerMetrics) -> Any:
    """The market catalog, or None when the market is not configured."""
    if not cfg.market.enabled:
        return None
    from gpufleet.broker.market import MarketCatalog

    catalog = MarketCatalog(
        cfg.market, aws_endpoint_url=cfg.aws_endpoint_url, metrics=metrics
    )
    catalog.load_tables()
    return catalog


def _provisioner(
    cfg: BrokerConfig, core: BrokerCore, market: Any, store: Store, fleet: str
) -> Any:
    from gpufleet.broker.clouds import cloud_for
    from gpufleet.broker.provisioner import Provisioner

    clouds: dict[str, Any] = {}

    def cloud(provider: str) -> Any:
        if provider not in clouds:
            clouds[provider] = cloud_for(
                provider,
                aws_endpoint_url=cfg.aws_endpoint_url,
                gce_endpoint=cfg.gce_endpoint,
            )
        return clouds[provider]

    prov = cfg.provisioning
    if not prov.gcp.project:
        prov.gcp.project = cfg.market.gcp.project
    host = prov.broker_address.rpartition(":")[0].strip("[]")
    if host == "localhost" or host.startswith("127.") or host == "::1":
        log.warning(
            "provisioning.loopback_broker_address",
            broker_address=prov.broker_address,
            hint="launched hosts cannot reach a loopback address; set "
            "provisioning.broker_address to one they can dial",
        )
    return Provisioner(
        prov,
        market,
        InstanceStore(store),
        clouds=cloud,
        events=core.events,
        spawn=core.spawn,
        fleet=fleet,
        metrics=core.metrics,
        places=_places(cfg),
    )


# How long the broker waits for the market's first refresh before serving:
# launches need live spot prices, but a slow cloud must not hold the fleet.
FIRST_REFRESH_S = 30.0


async def _first_refresh(market: Any) -> None:
    try:
        async with asyncio.timeout(FIRST_REFRESH_S):
            warnings = await market.refresh()
    except TimeoutError:
        log.warning("market.first_refresh_slow", waited_s=FIRST_REFRESH_S)
        return
    for warning in warnings:
        log.warning("market.refresh_warning", detail=warning)


def _places(cfg: BrokerConfig) -> list[tuple[str, str, str]]:
    """Where the provisioner looks for instances of this fleet."""
    places = [("aws", region, "") for region in cfg.provisioning.aws.images]
    gcp = cfg.provisioning.gcp
    if gcp.project:
        places += [("gcp", zone, gcp.project) for zone in cfg.market.gcp.zones]
    return places


def _credentials(cfg: BrokerConfig) -> grpc.ServerCredentials | None:
    tls = cfg.tls
    if not (tls.cert and tls.key):
        return None
    root = Path(tls.ca).read_bytes() if tls.ca else None
    return grpc.ssl_server_credentials(
        [(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


async def serve(cfg: BrokerConfig, *, ready: asyncio.Event | None = None) -> None:
    """Runs the broker until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_broker(cfg, stop=stop, ready=ready)


async def run_broker(
    cfg: BrokerConfig,
    *,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    bound: dict[str, int] | None = None,
) -> None:
    """Runs the broker until ``stop`` is set (tests call this directly).

    ``bound`` receives the ports actually bound (useful with port 0).
    """
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(cfg.db_url)
    await store.open()
    policy, applied_at = await _initial_policy(cfg, store)
    fleet_name = cfg.fleet if cfg.fleet != "default" else policy.fleet
    publisher = MqttPublisher(cfg.mqtt_url, fleet=fleet_name) if cfg.mqtt_url else None
    events = EventBus(store, publisher=publisher, fleet=fleet_name)
    metrics = BrokerMetrics()
    fleet = Fleet(cfg.heartbeat_interval_s, cfg.lost_after_intervals)
    core = BrokerCore(
        store=store,
        events=events,
        metrics=metrics,
        fleet=fleet,
        policy=policy,
        policy_applied_at_s=applied_at,
        history_bucket_s=cfg.history_bucket_s,
    )
    await core.load_offline_hosts()
    await core.fail_interrupted_actions()
    prices = PriceTable.load(cfg.prices_file)
    core.jobs = JobManager(core, JobStore(store), prices)
    await core.jobs.load()
    core.kernels = KernelCatalog(core, KernelStore(store))
    await core.kernels.load()
    market = _market(cfg, metrics)
    core.market = market
    if market is not None:
        core.jobs.catalog = market
        core.jobs.restart_s = cfg.market.restart_overhead_s
    if market is not None:
        await _first_refresh(market)
    provisioner = None
    if cfg.provisioning.enabled:
        provisioner = _provisioner(cfg, core, market, store, fleet_name)
        await provisioner.load()
        core.jobs.provisioner = provisioner
    core.reaper = Reaper(
        core,
        prices=prices,
        aws_endpoint_url=cfg.aws_endpoint_url,
        gce_endpoint=cfg.gce_endpoint,
    )
    server = grpc.aio.server(
        interceptors=[TokenInterceptor(admin_token(cfg))], options=SERVER_OPTIONS
    )
    rpc.add_AgentServiceServicer_to_server(AgentServicer(core), server)
    rpc.add_AdminServiceServicer_to_server(AdminServicer(core), server)
    creds = _credentials(cfg)
    try:
        port = (
            server.add_secure_port(cfg.listen, creds)
            if creds
            else server.add_insecure_port(cfg.listen)
        )
    except RuntimeError as exc:
        await store.close()
        raise ConfigError(
            "broker configuration",
            [f"listen: cannot bind {cfg.listen}: {exc}"],
            hint="another broker may already listen there; stop it or choose "
            "another port with --listen",
        ) from None
    metrics_host, metrics_port = split_addr(cfg.metrics_listen)
    metrics_server = metrics.serve(host=metrics_host, port=metrics_port)
    if bound is not None:
        bound["grpc"] = port
        bound["metrics"] = metrics_server.port
    await server.start()
    try:
        async with asyncio.TaskGroup() as tg:

            def spawn(coro: Awaitable[None], name: str) -> None:
                tg.create_task(coro, name=name)  # type: ignore[arg-type]

            core.bind_spawn(spawn)
            if publisher is not None:
                tg.create_task(publisher.run(), name="mqtt")
            tg.create_task(core.monitor_loop(), name="heartbeats")
            tg.create_task(core.jobs_loop(), name="jobs")
            tg.create_task(core.history_loop(cfg.history_retention_s), name="history")
            if market is not None:
                tg.create_task(market.run(stop), name="market")
            await events.emit(
                "broker.started", cause="start", version=gpufleet.__version__
            )
            log.info(
                "broker.ready",
                listen=cfg.listen,
                port=port,
                metrics=f"{metrics_host}:{metrics_server.port}",
                database=store.safe_url,
                tls=cfg.tls.enabled,
                mqtt=bool(publisher),
            )
            sdnotify.notify("READY=1")
            if ready is not None:
                ready.set()
            await stop.wait()
            raise Shutdown
    except* Shutdown:
        sdnotify.notify("STOPPING=1")
    finally:
        # Agents reconnect to the next broker; a short grace lets streams
        # close cleanly instead of being cut.
        await server.stop(grace=2.0)
        try:
            await core.flush_history()
        finally:
            metrics_server.stop()
            await store.close()
        log.info("broker.stopped")
