"""What the broker needs to launch a GPU instance on any cloud, and its errors.

The broker's provisioner decides what to launch; the cloud backends
(``aws.py``, ``gcp.py``) take a ``LaunchRequest`` and a ``LaunchTemplate`` and
return a ``LaunchedRef``. ``render_startup_script`` writes the bash script
that installs the gpufleet agent on the new instance and enrolls it with the
broker, and ``LaunchError`` tells the provisioner whether the next offer may
succeed where this one failed.
"""

from __future__ import annotations

import re
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpufleet.config import load_config, require
from gpufleet.errors import CloudActionError, ConfigError

LIFECYCLES = ("spot", "on-demand")
LAUNCH_ERROR_KINDS = ("capacity", "quota", "price", "auth", "config", "other")
# Kinds for which another zone, region or instance type may succeed.
_NEXT_OFFER_KINDS = frozenset({"capacity", "quota", "price"})

# Tag and label names put on every instance the broker launches. GCE label
# keys allow no ':' or '.', so GCE gets the dashed spelling.
TAG_FLEET, TAG_LAUNCH_ID, TAG_JOB, TAG_MANAGED = (
    "gpufleet:fleet",
    "gpufleet:launch-id",
    "gpufleet:job",
    "gpufleet:managed",
)
AGENT_LABEL_LAUNCH_ID = "gpufleet.launch-id"
AGENT_LABEL_FLEET = "gpufleet.fleet"

# Where the script puts things on the instance (under $GPUFLEET_ROOT).
VENV_DIR = "/opt/gpufleet/venv"
ETC_DIR = "/etc/gpufleet"
TLS_DIR = "/etc/gpufleet/tls"
UNIT_PATH = "/etc/systemd/system/gpufleet-agent.service"
LOG_PATH = "/var/log/gpufleet-startup.log"

# A copy of packaging/systemd/gpufleet-agent.service and agent.env; a test
# checks that they are equal, byte for byte, to the packaged files.
AGENT_UNIT = """\
# gpufleet agent: streams this host's GPU telemetry to the broker and carries
# out its commands (kill processes, checkpoint and start jobs).
#
# It runs as root: it opens the GPU device nodes and signals other users'
# processes. Jobs it starts inherit this sandbox, so a job that writes
# checkpoints outside /var/lib/gpufleet needs ReadWritePaths= in a drop-in
# (systemctl edit gpufleet-agent), e.g. ReadWritePaths=/data /home.
# Configuration: /etc/gpufleet/agent.yaml, named in /etc/gpufleet/agent.env.

[Unit]
Description=gpufleet agent (GPU telemetry and actions)
Wants=network-online.target
After=network-online.target nvidia-persistenced.service

[Service]
Type=notify
NotifyAccess=main
EnvironmentFile=-/etc/gpufleet/agent.env
ExecStart=/opt/gpufleet/venv/bin/gpufleet agent run
Restart=on-failure
RestartSec=5s
TimeoutStartSec=60s
TimeoutStopSec=30s
# Only the agent itself is stopped on restart or stop: a training job it
# started must survive an agent crash, or the restart would lose its work.
KillMode=process

StateDirectory=gpufleet
StateDirectoryMode=0750
UMask=0027
# ProtectHome= below makes ~/.triton read-only, so Triton's compile cache
# lives in the state directory, for the kernel verifier the agent runs and
# for the jobs it starts (they inherit this environment). The kernel cache
# itself is /var/lib/gpufleet/kernels (kernels.cache_dir in agent.yaml).
Environment=TRITON_CACHE_DIR=/var/lib/gpufleet/triton

# Sandbox. Not PrivateDevices= and not ProtectProc=invisible: the agent must
# open /dev/nvidia*, /dev/kfd and /dev/dri, and see and signal every process.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
ProtectClock=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
# CAP_KILL signals other users' processes (kill-processes); CAP_SETUID and
# CAP_SETGID start jobs as their owner; CAP_SYS_PTRACE and
# CAP_DAC_READ_SEARCH read other users' /proc entries to map GPU processes.
CapabilityBoundingSet=CAP_KILL CAP_SETUID CAP_SETGID CAP_SYS_PTRACE CAP_DAC_READ_SEARCH CAP_DAC_OVERRIDE CAP_CHOWN CAP_FOWNER
# GPU device groups by their /proc/devices names, so the rules hold whatever
# major numbers the drivers got. Groups absent on this host are ignored.
DevicePolicy=closed
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw
DeviceAllow=char-nvidia-nvswitch rw
DeviceAllow=char-nvidia-nvlink rw
DeviceAllow=char-kfd rw
DeviceAllow=char-drm rw
DeviceAllow=char-infiniband_verbs rw
# Not MemoryDenyWriteExecute= or a SystemCallFilter=: the CUDA driver and
# Triton in the jobs the agent starts JIT-compile code into W+X memory.

[Install]
WantedBy=multi-user.target
"""  # noqa: E501

AGENT_ENV = """\
# Environment of gpufleet-agent.service, read by systemd (EnvironmentFile=).
# install.sh installs this file once as /etc/gpufleet/agent.env and never
# overwrites it afterwards; a newer version lands beside it as agent.env.new.
#
# The agent's settings live in the YAML file named here: broker address, TLS
# files (tls.ca, tls.cert, tls.key), collector, labels. Any setting can also
# be given as GPUFLEET_AGENT_<NAME> (e.g. GPUFLEET_AGENT_BROKER=broker:50051),
# which overrides the file; nested fields take a double underscore, e.g.
# GPUFLEET_AGENT_TLS__CA=/etc/gpufleet/tls/ca.pem.
GPUFLEET_AGENT_CONFIG=/etc/gpufleet/agent.yaml
"""


@dataclass(frozen=True)
class LaunchRequest:
    """One instance to launch: where, what, and whose.

    Attributes:
        zone: the availability zone; "" lets the cloud choose (AWS only).
        lifecycle: "spot" or "on-demand".
        launch_id: the broker's id for this launch; it is also a tag or
            label on the instance and the cloud's idempotency token, so a
            retried launch with the same id never starts a second instance.
        user_data: the startup script (``render_startup_script``).
        max_usd_per_hour: the spot max price; 0 caps it at the on-demand
            price, the cloud's default.
        project: the GCP project.
    """

    provider: str
    region: str
    zone: str
    instance_type: str
    lifecycle: str
    launch_id: str
    fleet: str
    job_id: str
    user_data: str
    max_usd_per_hour: float = 0.0
    project: str = ""

    def problems(self) -> list[str]:
        """Every invalid field, each named; empty when the request is valid."""
        p: list[str] = []
        require(
            p,
            self.lifecycle in LIFECYCLES,
            f"lifecycle: must be one of {', '.join(LIFECYCLES)}, "
            f"got {self.lifecycle!r}",
        )
        require(p, bool(self.launch_id), "launch_id: must not be empty")
        require(
            p,
            len(self.launch_id) <= 64 and self.launch_id.isascii(),
            f"launch_id: must be at most 64 ASCII characters, got {self.launch_id!r}",
        )
        require(p, bool(self.region), "region: must not be empty")
        require(p, bool(self.instance_type), "instance_type: must not be empty")
        require(p, bool(self.fleet), "fleet: must not be empty")
        require(
            p,
            self.max_usd_per_hour >= 0,
            f"max_usd_per_hour: must be >= 0, got {self.max_usd_per_hour}",
        )
        return p


@dataclass(frozen=True)
class LaunchTemplate:
    """One cloud's launch settings from the broker configuration.

    Attributes:
        image: the AMI id (AWS; AMIs are regional) or the GCE image or image
            family URL.
        subnet_ids: AWS: availability zone -> subnet id.
        security_group_ids: AWS security groups.
        iam_instance_profile: AWS instance profile name or ARN.
        key_name: AWS key pair.
        network: GCE network URL or name.
        subnetwork: GCE subnetwork URL or name.
        service_account: GCE service account email for the VM.
        gce_external_ip: GCE: give the VM an ephemeral external IP, so that it
            reaches PyPI and the broker without Cloud NAT.
        disk_gb: boot disk size.
        tags: extra tags (AWS) or labels (GCE, sanitized).
    """

    image: str
    subnet_ids: dict[str, str] = field(default_factory=dict)
    security_group_ids: list[str] = field(default_factory=list)
    iam_instance_profile: str = ""
    key_name: str = ""
    network: str = ""
    subnetwork: str = ""
    service_account: str = ""
    gce_external_ip: bool = True
    disk_gb: int = 100
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchedRef:
    """An instance the broker launched, as the cloud reports it.

    Attributes:
        instance_id: the EC2 instance id, or the GCE numeric id.
        name: the Name tag (AWS) or the VM name (GCE, which addresses VMs
            by name).
        lifecycle: "spot" or "on-demand".
        state: in the ``InstanceState`` vocabulary.
        launch_id: the broker's launch id read back from the tag or label.
    """

    provider: str
    region: str
    zone: str
    instance_id: str
    name: str
    project: str
    lifecycle: str
    state: str
    launch_id: str = ""


class LaunchError(CloudActionError):
    """A launch failed; ``kind`` says why and ``next_offer`` what to do next.

    Attributes:
        kind: "capacity", "quota", "price", "auth", "config" or "other".
        next_offer: True when another zone, region or instance type may
            succeed (capacity, price, regional quota, a type not offered in
            that zone); False when every offer would fail the same way.
        code: the cloud's own error code, e.g. ``InsufficientInstanceCapacity``.
    """

    def __init__(
        self,
        provider: str,
        launch_id: str,
        reason: str,
        *,
        kind: str,
        code: str = "",
        next_offer: bool | None = None,
        hint: str | None = None,
    ) -> None:
        if kind not in LAUNCH_ERROR_KINDS:
            raise ValueError(f"unknown launch error kind {kind!r}")
        super().__init__(provider, launch_id, reason)
        self.kind = kind
        self.code = code
        self.next_offer = (
            kind in _NEXT_OFFER_KINDS if next_offer is None else next_offer
        )
        if hint is not None:
            self.hint = hint


def render_startup_script(
    *,
    broker: str,
    package: str,
    launch_id: str,
    fleet: str,
    labels: dict[str, str],
    agent_config: dict[str, Any],
    ca_pem: str = "",
    cert_pem: str = "",
    key_pem: str = "",
) -> str:
    """Returns the bash script that installs and enrolls the agent.

    The script runs as root at boot (EC2 user data, GCE ``startup-script``),
    may run again at every boot, and puts every path under
    ``$GPUFLEET_ROOT`` (unset in production). Every value is embedded in
    quoted here-documents or ``shlex.quote`` strings, and the configuration
    is YAML written by ``yaml.safe_dump``, so no label or id can inject
    shell or YAML.

    Args:
        broker: the broker's address as the agent dials it, ``HOST:PORT``.
        package: the pip requirement to install, e.g. ``gpufleet[agent]==0.4``;
            skipped when the image already has ``/opt/gpufleet/venv``.
        launch_id: becomes the agent label ``gpufleet.launch-id``.
        fleet: becomes the agent label ``gpufleet.fleet``.
        labels: more agent labels; they win over ``agent_config["labels"]``.
        agent_config: further ``agent.yaml`` fields, merged under the
            broker, labels and TLS settings this function sets.
        ca_pem: the fleet CA; with ``cert_pem`` and ``key_pem`` it turns on
            mutual TLS (all three or none).

    Raises:
        ConfigError: listing every invalid argument, or the agent
            configuration that the agent would refuse.
    """
    config = agent_yaml(
        broker=broker,
        launch_id=launch_id,
        fleet=fleet,
        labels=labels,
        agent_config=agent_config,
        tls=bool(ca_pem),
    )
    problems = _script_problems(package, launch_id, ca_pem, cert_pem, key_pem)
    problems += _agent_config_problems(config)
    if problems:
        raise ConfigError(
            "startup script",
            problems,
            hint="fix the launch settings in the broker configuration",
        )

    files = [
        ("0600", f"{ETC_DIR}/agent.yaml", config, True),
        ("0644", UNIT_PATH, AGENT_UNIT, True),
        ("0640", f"{ETC_DIR}/agent.env", AGENT_ENV, False),
    ]
    if ca_pem:
        files += [
            ("0600", f"{TLS_DIR}/ca.pem", _with_newline(ca_pem), True),
            ("0600", f"{TLS_DIR}/cert.pem", _with_newline(cert_pem), True),
            ("0600", f"{TLS_DIR}/key.pem", _with_newline(key_pem), True),
        ]
    writes = "\n".join(_put_command(*f) for f in files)
    # The id sits in a comment line: only characters that cannot end it.
    header = _HEADER.replace("@LAUNCH_ID@", re.sub(r"[^\w.:-]", "?", launch_id))
    return (
        header
        + f"PACKAGE={shlex.quote(package)}\n"
        + _FUNCTIONS
        + _INSTALL
        + writes
        + "\n"
        + _ENABLE
    )


def agent_yaml(
    *,
    broker: str,
    launch_id: str,
    fleet: str,
    labels: dict[str, str],
    agent_config: dict[str, Any],
    tls: bool,
) -> str:
    """Returns the agent.yaml text the startup script writes."""
    config = dict(agent_config)
    merged_labels = {
        str(k): str(v) for k, v in dict(config.get("labels") or {}).items()
    }
    merged_labels.update({str(k): str(v) for k, v in labels.items()})
    merged_labels[AGENT_LABEL_LAUNCH_ID] = launch_id
    merged_labels[AGENT_LABEL_FLEET] = fleet
    config["broker"] = broker
    config["labels"] = merged_labels
    if tls:
        config["tls"] = {
            "ca": f"{TLS_DIR}/ca.pem",
            "cert": f"{TLS_DIR}/cert.pem",
            "key": f"{TLS_DIR}/key.pem",
        }
    text: str = yaml.safe_dump(config, sort_keys=True, allow_unicode=False)
    return "# Written by the gpufleet startup script at every boot.\n" + text


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _script_problems(
    package: str, launch_id: str, ca_pem: str, cert_pem: str, key_pem: str
) -> list[str]:
    p: list[str] = []
    require(p, bool(package.strip()), "package: must name what pip installs")
    require(
        p,
        not package.startswith("-"),
        f"package: must be a requirement, not a pip option, got {package!r}",
    )
    require(p, bool(launch_id), "launch_id: must not be empty")
    tls = (ca_pem, cert_pem, key_pem)
    require(
        p,
        all(tls) or not any(tls),
        "tls: give ca_pem, cert_pem and key_pem together (or none of them)",
    )
    for name, pem in zip(("ca_pem", "cert_pem", "key_pem"), tls, strict=True):
        require(
            p,
            not pem or pem.lstrip().startswith("-----BEGIN "),
            f"{name}: must be PEM text starting with '-----BEGIN '",
        )
    return p


def _agent_config_problems(text: str) -> list[str]:
    """What the agent would refuse in this agent.yaml, checked before launch.

    A configuration the agent refuses costs a GPU instance that never
    enrolls, so it is loaded here exactly as the agent will load it.
    """
    from gpufleet.agent.config import AgentConfig

    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpufleet-launch-") as tmp:
        path = Path(tmp) / "agent.yaml"
        path.write_text(text)
        cfg = load_config(AgentConfig, path=path, problems=problems)
        try:
            cfg.validate("agent.yaml", problems)
        except ConfigError as exc:
            return [f"agent_config: {q}" for q in exc.problems]
    return [f"agent_config: {q}" for q in problems]


def _put_command(mode: str, path: str, content: str, replace: bool) -> str:
    """A ``put`` call with ``content`` in a quoted here-document."""
    delimiter = "GPUFLEET_EOF"
    while delimiter in content.splitlines():
        delimiter += "_"
    verb = "put" if replace else "put_once"
    return (
        f"{verb} {mode} {shlex.quote(path)} <<'{delimiter}'\n"
        f"{_with_newline(content)}{delimiter}"
    )


_HEADER = """\
#!/bin/bash
# gpufleet startup script for launch @LAUNCH_ID@: installs the gpufleet agent,
# writes its configuration and systemd unit, and starts it. It runs as root
# at boot and is safe to run again: files are replaced only when they differ.
set -euo pipefail
umask 077
ROOT="${GPUFLEET_ROOT:-}"
LOG="$ROOT/var/log/gpufleet-startup.log"
VENV="$ROOT/opt/gpufleet/venv"
CHANGED=0
"""

_FUNCTIONS = """\
mkdir -p "$(dirname "$LOG")"

log() {
    printf '%s gpufleet-startup: %s\\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" |
        tee -a "$LOG" >&2
}

die() {
    log "error: $1"
    [[ $# -gt 1 ]] && log "hint: $2"
    exit 1
}

trap 'die "line $LINENO failed: $BASH_COMMAND" "see $LOG"' ERR

# put MODE PATH < content: installs the file unless it is already the same.
put() {
    local mode="$1" dest="$ROOT$2" tmp
    mkdir -p "$(dirname "$dest")"
    tmp="$(mktemp "$dest.XXXXXX")"
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f "$dest" ]] && cmp -s "$tmp" "$dest" &&
        [[ "$(stat -c %a "$dest")" == "${mode#0}" ]]; then
        rm -f "$tmp"
        return 0
    fi
    mv -f "$tmp" "$dest"
    CHANGED=1
    log "wrote $2"
}

# put_once MODE PATH < content: like put, but keeps a file already there.
put_once() {
    if [[ -e "$ROOT$2" ]]; then
        cat >/dev/null
        return 0
    fi
    put "$@"
}

if [[ -z "$ROOT" && $EUID -ne 0 ]]; then
    die "the startup script must run as root" "cloud-init and GCE run it so"
fi
"""

_INSTALL = """\
if [[ -x "$VENV/bin/gpufleet" ]]; then
    log "gpufleet is installed in $VENV"
else
    command -v python3 >/dev/null ||
        die "python3 is not installed" "use an image with Python >= 3.11"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "python3 is $(python3 -V 2>&1), gpufleet needs >= 3.11" \\
            "use an image with Python >= 3.11, or preinstall $VENV"
    log "installing $PACKAGE into $VENV"
    python3 -m venv "$VENV" >>"$LOG" 2>&1 ||
        die "python3 -m venv $VENV failed" "install python3-venv in the image"
    # The network may come up a little after boot: try pip three times.
    for attempt in 1 2 3; do
        if "$VENV/bin/pip" install --quiet "$PACKAGE" >>"$LOG" 2>&1; then
            break
        fi
        [[ $attempt -lt 3 ]] ||
            die "pip install $PACKAGE failed" \\
                "check that the instance reaches the package index; see $LOG"
        sleep $((attempt * 10))
    done
    [[ -x "$VENV/bin/gpufleet" ]] ||
        die "$PACKAGE installed no gpufleet command" "check the package name"
fi
mkdir -p "$ROOT/etc/gpufleet"
chmod 0755 "$ROOT/etc/gpufleet"
"""

_ENABLE = """\
systemctl daemon-reload ||
    die "systemctl daemon-reload failed" "the image must boot with systemd"
if [[ $CHANGED -eq 1 ]]; then
    # New configuration: restart an agent that an earlier boot started.
    systemctl enable gpufleet-agent
    systemctl restart gpufleet-agent
else
    systemctl enable --now gpufleet-agent
fi
log "gpufleet-agent is enabled and started"
"""


__all__ = [
    "AGENT_ENV",
    "AGENT_UNIT",
    "LAUNCH_ERROR_KINDS",
    "LIFECYCLES",
    "LaunchError",
    "LaunchRequest",
    "LaunchTemplate",
    "LaunchedRef",
    "agent_yaml",
    "render_startup_script",
]
