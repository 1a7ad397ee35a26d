"""Tests of the mTLS material: files, and a real grpc.aio server that uses it."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from gpufleet.broker.tls import (
    channel_credentials,
    init_certs,
    peer_common_name,
    server_credentials,
)
from gpufleet.errors import ConfigError
from gpufleet.proto import pb, rpc

RPC_TIMEOUT_S = 5.0


class _Admin(rpc.AdminServiceServicer):
    """Answers ListHosts with one host named after the caller's certificate."""

    async def ListHosts(
        self, request: pb.ListHostsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListHostsResponse:
        caller = peer_common_name(context) or ""
        return pb.ListHostsResponse(
            hosts=[pb.HostView(identity=pb.HostIdentity(host_id=caller))]
        )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return init_certs(
        tmp_path_factory.mktemp("pki"),
        broker_names=["broker.lab.example", "10.1.2.3"],
        agent_names=["gpu-a1", "gpu-b2"],
    )


@pytest.fixture
async def broker_port(certs: dict[str, Path]) -> AsyncIterator[int]:
    server = grpc.aio.server()
    rpc.add_AdminServiceServicer_to_server(_Admin(), server)
    creds = server_credentials(
        certs["ca_cert"], certs["broker_cert"], certs["broker_key"]
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


async def _list_hosts(port: int, creds: grpc.ChannelCredentials) -> str:
    async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
        reply = await rpc.AdminServiceStub(channel).ListHosts(
            pb.ListHostsRequest(), timeout=RPC_TIMEOUT_S
        )
    return str(reply.hosts[0].identity.host_id)


def test_tls_init_certs_writes_keys_private_and_certs_readable(
    certs: dict[str, Path],
) -> None:
    assert set(certs) >= {"ca_cert", "broker_key", "admin_cert", "agent:gpu-b2:key"}
    for role, path in certs.items():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if role.endswith("key") else 0o644), role


def test_tls_broker_cert_names_localhost_loopback_and_given_names(
    certs: dict[str, Path],
) -> None:
    cert = x509.load_pem_x509_certificate(certs["broker_cert"].read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "broker.lab.example",
        "localhost",
    }
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {
        "10.1.2.3",
        "127.0.0.1",
    }


def test_tls_agent_cert_common_name_is_agent_name(certs: dict[str, Path]) -> None:
    cert = x509.load_pem_x509_certificate(certs["agent:gpu-a1:cert"].read_bytes())

    common_name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert common_name[0].value == "gpu-a1"


async def test_tls_client_with_ca_signed_cert_is_served(
    certs: dict[str, Path], broker_port: int
) -> None:
    creds = channel_credentials(
        certs["ca_cert"], certs["agent:gpu-a1:cert"], certs["agent:gpu-a1:key"]
    )

    assert await _list_hosts(broker_port, creds) == "gpu-a1"


async def test_tls_admin_cert_is_served_as_admin(
    certs: dict[str, Path], broker_port: int
) -> None:
    creds = channel_credentials(
        certs["ca_cert"], certs["admin_cert"], certs["admin_key"]
    )

    assert await _list_hosts(broker_port, creds) == "admin"


async def test_tls_client_without_cert_is_refused(
    certs: dict[str, Path], broker_port: int
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _list_hosts(broker_port, channel_credentials(certs["ca_cert"]))

    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_client_cert_from_other_ca_is_refused(
    certs: dict[str, Path], broker_port: int, tmp_path: Path
) -> None:
    other = init_certs(tmp_path / "other", broker_names=[], agent_names=["gpu-a1"])
    creds = channel_credentials(
        certs["ca_cert"], other["agent:gpu-a1:cert"], other["agent:gpu-a1:key"]
    )

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _list_hosts(broker_port, creds)

    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_init_certs_refuses_to_overwrite_without_force(
    certs: dict[str, Path],
) -> None:
    out_dir = certs["ca_cert"].parent

    with pytest.raises(ConfigError, match=r"ca\.pem exists") as info:
        init_certs(out_dir, broker_names=[], agent_names=["gpu-a1"])

    assert "--force" in (info.value.hint or "")


def test_tls_init_certs_force_replaces_the_ca(tmp_path: Path) -> None:
    first = init_certs(tmp_path, broker_names=[], agent_names=[])
    old_ca = first["ca_cert"].read_bytes()

    second = init_certs(tmp_path, broker_names=[], agent_names=[], force=True)

    assert second["ca_cert"].read_bytes() != old_ca
    assert not list(tmp_path.glob(".*.tmp"))


def test_tls_init_certs_bad_names_are_all_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        init_certs(
            tmp_path,
            broker_names=["bad name"],
            agent_names=["../etc", "admin", "gpu-a1", "gpu-a1"],
        )

    assert len(info.value.problems) == 4
    assert not any(tmp_path.iterdir())


def test_tls_missing_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        channel_credentials(tmp_path / "ca.pem")
