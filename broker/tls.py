"""mTLS material for the broker and its agents, made with ``cryptography``.

``init_certs`` makes a private CA, the broker's server certificate, one client
certificate per agent (CN = agent name) and an ``admin`` client certificate
for the CLI. ``server_credentials`` and ``channel_credentials`` turn them into
gRPC credentials; the server always requires a client certificate signed by
the CA. The broker's CLI (``gpufleet broker init-certs``) runs this module.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpufleet.errors import ConfigError

log = structlog.stdlib.get_logger(__name__)

# 825 days is the longest leaf validity that Apple and the CA/Browser forum
# baseline accepted; the CA outlives its leaves so they can be re-issued.
LEAF_DAYS = 825
CA_DAYS = 3650
# Clocks on fresh hosts drift; backdating avoids "not yet valid" at boot.
BACKDATE = dt.timedelta(minutes=5)
ADMIN_NAME = "admin"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256 ECDSA: supported by every gRPC TLS stack, and fast to generate.
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gpufleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    )


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = _name("gpufleet CA")
    cert = (
        _builder("gpufleet CA", name, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(
    common_name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    days: int,
    *,
    server_names: list[str] | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate when ``server_names`` is given, else a client one."""
    key = _new_key()
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH
        if server_names
        else (ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    sans: list[x509.GeneralName] = []
    for name in server_names or [common_name]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        _builder(common_name, ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Writes atomically with ``mode`` set before any byte lands on disk."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _check_names(broker_names: list[str], agent_names: list[str]) -> list[str]:
    problems = []
    for name in agent_names:
        if not _NAME.fullmatch(name):
            problems.append(
                f"agent name {name!r}: use letters, digits, '.', '_' or '-' "
                "(at most 63), starting with a letter or digit"
            )
        elif name == ADMIN_NAME:
            problems.append(f"agent name {name!r} is reserved for the CLI")
    for name in sorted({n for n in agent_names if agent_names.count(n) > 1}):
        problems.append(f"agent name {name!r} is given twice")
    for name in broker_names:
        if not name or any(c.isspace() or c in "/,\\" for c in name):
            problems.append(f"broker name {name!r} is not a DNS name or IP address")
    return problems


def init_certs(
    out_dir: Path,
    *,
    broker_names: list[str],
    agent_names: list[str],
    days: int = LEAF_DAYS,
    force: bool = False,
) -> dict[str, Path]:
    """Makes a CA, the broker's server certificate and the client certificates.

    Files: ``ca.pem``/``ca.key``, ``broker.pem``/``broker.key`` (SANs:
    ``broker_names`` plus localhost and 127.0.0.1), ``admin.pem``/
    ``admin.key`` and ``agent-NAME.pem``/``agent-NAME.key``. Keys are 0600.

    Returns:
        Paths by role: ``ca_cert``, ``ca_key``, ``broker_cert``,
        ``broker_key``, ``admin_cert``, ``admin_key``, and for each agent
        ``agent:NAME:cert`` and ``agent:NAME:key``.

    Raises:
        ConfigError: a name is invalid, or a file exists and ``force`` is
            False.
    """
    source = f"certificate directory {out_dir}"
    problems = _check_names(broker_names, agent_names)
    if days < 1:
        problems.append(f"days={days}: certificates must be valid for >= 1 day")
    if problems:
        raise ConfigError(source, problems)

    # (common name, file stem, key of the cert path, key of the key path)
    leaves = [
        ("broker", "broker", "broker_cert", "broker_key"),
        (ADMIN_NAME, ADMIN_NAME, "admin_cert", "admin_key"),
    ] + [(n, f"agent-{n}", f"agent:{n}:cert", f"agent:{n}:key") for n in agent_names]
    paths = {"ca_cert": out_dir / "ca.pem", "ca_key": out_dir / "ca.key"}
    for _, stem, cert_role, key_role in leaves:
        paths[cert_role] = out_dir / f"{stem}.pem"
        paths[key_role] = out_dir / f"{stem}.key"
    existing = sorted(str(p) for p in paths.values() if p.exists())
    if existing and not force:
        raise ConfigError(
            source,
            [f"{path} exists" for path in existing],
            hint="pass --force to replace them (every host then needs the new "
            "files), or choose another directory",
        )

    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca(max(CA_DAYS, days))
    _write(paths["ca_key"], _key_pem(ca_key), 0o600)
    _write(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    server_names = list(dict.fromkeys([*broker_names, "localhost", "127.0.0.1"]))
    for name, _, cert_role, key_role in leaves:
        key, cert = _make_leaf(
            name,
            ca_key,
            ca_cert,
            days,
            server_names=server_names if cert_role == "broker_cert" else None,
        )
        _write(paths[key_role], _key_pem(key), 0o600)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        _write(paths[cert_role], pem, 0o644)
    log.info(
        "tls.certs_written",
        out_dir=str(out_dir),
        agents=len(agent_names),
        broker_names=",".join(server_names),
        days=days,
    )
    return paths


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            "TLS files",
            [f"{what} {path}: cannot read it: {exc}"],
            hint="make them with 'gpufleet broker init-certs' and check the "
            "GPUFLEET_TLS_* settings",
        ) from exc


def server_credentials(ca: Path, cert: Path, key: Path) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate signed by ``ca``."""
    return grpc.ssl_server_credentials(
        [(_read(key, "server key"), _read(cert, "server certificate"))],
        root_certificates=_read(ca, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials trusting ``ca``, presenting ``cert`` and ``key``.

    Without ``cert`` and ``key`` the channel presents no client certificate,
    and a broker with mTLS refuses it.
    """
    if (cert is None) != (key is None):
        raise ConfigError(
            "TLS files", ["a client certificate needs its key, and a key its cert"]
        )
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(key, "client key") if key else None,
        certificate_chain=_read(cert, "client certificate") if cert else None,
    )


def peer_common_name(context: grpc.aio.ServicerContext) -> str | None:
    """The CN of the client certificate of an RPC, None without mTLS."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None
