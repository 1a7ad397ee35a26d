"""The CLI's connection to the broker's admin API.

Resolves the broker address, the admin token and TLS files from flags and
environment, and turns gRPC failures into errors that say what to do.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import grpc

from gpufleet.errors import (
    AuthError,
    BrokerTimeoutError,
    BrokerUnavailableError,
    ConfigError,
    GpufleetError,
)
from gpufleet.proto import MAX_MESSAGE_BYTES, rpc

DEFAULT_BROKER = "127.0.0.1:50051"


@dataclass
class ClientOptions:
    """Global CLI options that every admin command needs."""

    broker: str = DEFAULT_BROKER
    token: str | None = None
    token_file: Path | None = None
    timeout_s: float = 10.0
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    json: bool = False
    debug: bool = False

    def resolve_token(self) -> str:
        if self.token:
            return self.token
        candidates = [self.token_file] if self.token_file else _default_token_files()
        for path in candidates:
            if path and path.is_file():
                try:
                    token = path.read_text().strip()
                except OSError as exc:
                    raise AuthError(
                        f"cannot read the admin token file {path}: {exc}",
                        hint="run as a user that may read it, or pass --token",
                    ) from None
                if token:
                    return token
        tried = ", ".join(str(p) for p in candidates if p)
        raise AuthError(
            f"no admin token: none given and none found in {tried}",
            hint="pass --token or --token-file, or set GPUFLEET_ADMIN_TOKEN; "
            "the broker writes one to <state_dir>/admin.token at first start",
        )


def _default_token_files() -> list[Path]:
    from gpufleet.broker.config import default_state_dir

    paths = []
    for name in ("GPUFLEET_STATE_DIR", "GPUFLEET_BROKER_STATE_DIR"):
        env_dir = os.environ.get(name)
        if env_dir:
            paths.append(Path(env_dir) / "admin.token")
    paths.append(default_state_dir() / "admin.token")
    paths.append(Path("/var/lib/gpufleet/admin.token"))
    return list(dict.fromkeys(paths))


class AdminClient:
    """A synchronous admin client; one per CLI invocation."""

    def __init__(self, opts: ClientOptions) -> None:
        self.opts = opts
        self._metadata = (("authorization", f"Bearer {opts.resolve_token()}"),)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES * 16)]
        if opts.tls_ca:
            creds = grpc.ssl_channel_credentials(
                root_certificates=opts.tls_ca.read_bytes(),
                private_key=opts.tls_key.read_bytes() if opts.tls_key else None,
                certificate_chain=opts.tls_cert.read_bytes() if opts.tls_cert else None,
            )
            self._channel = grpc.secure_channel(opts.broker, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(opts.broker, options=options)
        self._stub = rpc.AdminServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=self.opts.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise translate(exc, self.opts.broker) from None

    def stream(self, method: str, request: Any) -> Iterator[Any]:
        try:
            yield from getattr(self._stub, method)(request, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise translate(exc, self.opts.broker) from None


def translate(exc: grpc.RpcError, broker: str) -> GpufleetError:
    """Turns a gRPC error into one that names the cause and the remedy."""
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        kind = (
            BrokerTimeoutError
            if code == grpc.StatusCode.DEADLINE_EXCEEDED
            else BrokerUnavailableError
        )
        error = kind(broker, exc.details() or code.name)
        if (
            "Socket closed" in (exc.details() or "")
            or "ssl" in (exc.details() or "").lower()
        ):
            # A TLS broker closes the socket on a client without a valid
            # certificate; gRPC reports only that.
            error.hint = (
                "if the broker uses TLS, pass --tls-ca, --tls-cert and --tls-key "
                "(or GPUFLEET_TLS_CA/_CERT/_KEY) with the admin certificate from "
                "'gpufleet broker init-certs'"
            )
        return error
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(
            f"the broker at {broker} refused the admin token: {exc.details()}",
            hint="check --token / GPUFLEET_ADMIN_TOKEN against the broker's "
            "admin.token file",
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # The request itself is wrong: a usage error, as a bad flag is.
        return ConfigError("request", [exc.details() or code.name])
    return GpufleetError(
        f"the broker at {broker} answered {code.name}: {exc.details()}"
    )


def admin_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Lets ``--json``, ``--broker`` and ``--timeout`` follow the command too.

    ``gpufleet idle --json`` then works as ``gpufleet --json idle`` does.
    """

    @functools.wraps(func)
    def wrapper(
        *args: Any,
        as_json: bool = False,
        broker_addr: str | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> Any:
        opts = click.get_current_context().obj
        if as_json:
            opts.json = True
        if broker_addr:
            opts.broker = broker_addr
        if timeout_s:
            opts.timeout_s = timeout_s
        return func(*args, **kwargs)

    options = (
        click.option(
            "--json", "as_json", is_flag=True, help="Print one JSON document."
        ),
        click.option("--broker", "broker_addr", help="Broker address HOST:PORT."),
        click.option("--timeout", "timeout_s", type=float, help="Seconds to wait."),
    )
    for option in options:
        wrapper = option(wrapper)
    return wrapper
