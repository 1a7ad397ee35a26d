"""Shared fixtures: state-store URLs (SQLite and PostgreSQL) and the MQTT URL.

PostgreSQL comes from ``GPUFLEET_TEST_POSTGRES_URL`` (default: the local
server on 127.0.0.1:5432), else from testcontainers where Docker runs. Each
test gets a fresh database that is dropped afterwards, so runs never clash.
Where ``CI`` is set, a missing service fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy.engine import make_url

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
# One prefix per test run, so that two runs on one server never share a
# database and a crashed run's leftovers are easy to spot and drop.
RUN_PREFIX = f"gpufleet_test_{secrets.token_hex(4)}"
PROBE_TIMEOUT_S = 3.0


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this service must run)")
    pytest.skip(reason)


def _port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _asyncpg_dsn(sqlalchemy_url: str) -> str:
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def _admin(dsn: str, sql: str) -> None:
    """Runs one SQL statement on the server as an administrator.

    It runs on its own loop in a thread, so any fixture may call it whether
    or not an event loop already runs on this thread.
    """
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=PROBE_TIMEOUT_S)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result()


def _docker_runs() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(
            ["docker", "info"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A SQLAlchemy URL of a PostgreSQL server whose user may create databases."""
    explicit = os.environ.get("GPUFLEET_TEST_POSTGRES_URL")
    url = explicit or DEFAULT_POSTGRES_URL
    try:
        _admin(_asyncpg_dsn(url), "SELECT 1")
    except Exception as exc:
        if explicit:
            pytest.fail(f"GPUFLEET_TEST_POSTGRES_URL does not answer: {exc}")
        reason = f"no PostgreSQL at {make_url(url).render_as_string()}: {exc}"
    else:
        yield url
        return
    if not _docker_runs():
        _unavailable(f"{reason}; and Docker is not running for testcontainers")
    try:
        from testcontainers.postgres import PostgresContainer
    except ImportError:
        _unavailable(f"{reason}; and testcontainers is not installed")
    with PostgresContainer("postgres:16-alpine", driver="asyncpg") as container:
        yield container.get_connection_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL with an empty database: a SQLite file, or a new PG database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    server_url = request.getfixturevalue("postgres_server_url")
    name = f"{RUN_PREFIX}_{secrets.token_hex(4)}"
    admin_dsn = _asyncpg_dsn(server_url)
    _admin(admin_dsn, f'CREATE DATABASE "{name}"')
    try:
        yield (
            make_url(server_url)
            .set(database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        _admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def mqtt_url() -> str:
    """The URL of a running MQTT broker (Mosquitto on loopback by default)."""
    url = os.environ.get("GPUFLEET_TEST_MQTT_URL", DEFAULT_MQTT_URL)
    parts = urlsplit(url)
    default_port = 8883 if parts.scheme == "mqtts" else 1883
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    if not _port_answers(host, port):
        _unavailable(f"no MQTT broker answers at {host}:{port}")
    return url


@pytest.fixture(scope="session", autouse=True)
def _logs_on_stderr() -> None:
    """Logs go to stderr as in the daemons, so stdout holds only CLI output."""
    from gpufleet import logs

    logs.configure("debug")
