#!/usr/bin/env bash
# Installs the gpufleet agent or broker as a systemd service, from this
# checkout. Safe to run again: it upgrades the package and the unit, and
# never overwrites an environment file that is already there.
#
#   install.sh agent|broker [--extras nvidia,aws] [--prefix DIR] [--dry-run]
#                           [--python PYTHON] [--no-pip]
#
#   --extras   extras added to the role's own (agent: agent; broker: broker),
#              e.g. nvidia, amd, aws, gcp, postgres
#   --prefix   install under DIR instead of / (for tests and packaging);
#              systemctl is not called then
#   --dry-run  print the plan, change nothing
#   --python   interpreter for the virtual environment (default: python3)
#   --no-pip   install units and env files only (venv already there)
set -euo pipefail

usage() {
    sed -n '6,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() {
    echo "error: $1" >&2
    [[ $# -gt 1 ]] && echo "hint: $2" >&2
    exit 2
}

ROLE=""
EXTRAS=""
PREFIX=""
DRY_RUN=0
PYTHON="python3"
PIP=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        agent|broker) ROLE="$1" ;;
        --extras) [[ $# -ge 2 ]] || usage; EXTRAS="$2"; shift ;;
        --extras=*) EXTRAS="${1#*=}" ;;
        --prefix) [[ $# -ge 2 ]] || usage; PREFIX="${2%/}"; shift ;;
        --prefix=*) PREFIX="${1#*=}"; PREFIX="${PREFIX%/}" ;;
        --python) [[ $# -ge 2 ]] || usage; PYTHON="$2"; shift ;;
        --python=*) PYTHON="${1#*=}" ;;
        --dry-run) DRY_RUN=1 ;;
        --no-pip) PIP=0 ;;
        -h|--help) usage ;;
        *) die "unknown argument '$1'" "run '$0 --help'" ;;
    esac
    shift
done
[[ -n "$ROLE" ]] || die "say what to install: agent or broker" "run '$0 --help'"
if [[ -n "$EXTRAS" && ! "$EXTRAS" =~ ^[a-z0-9,_-]+$ ]]; then
    die "--extras '$EXTRAS' is not a comma-separated list of extras" \
        "e.g. --extras nvidia,aws"
fi

SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UNITS="$SOURCE/packaging/systemd"
VENV="$PREFIX/opt/gpufleet/venv"
UNIT_DIR="$PREFIX/etc/systemd/system"
ETC_DIR="$PREFIX/etc/gpufleet"
UNIT="gpufleet-$ROLE.service"
ALL_EXTRAS="$ROLE${EXTRAS:+,$EXTRAS}"

[[ -f "$SOURCE/pyproject.toml" && -f "$UNITS/$UNIT" ]] ||
    die "$SOURCE is not a gpufleet checkout" "run install.sh from its checkout"
if [[ -z "$PREFIX" && $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
    die "installing into / needs root" "run it with sudo, or pass --prefix DIR"
fi

# Runs a command, or only prints it with --dry-run.
run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ $DRY_RUN -eq 0 ]]; then
        "$@"
    fi
}

echo "gpufleet $ROLE: installing from $SOURCE into ${PREFIX:-/}"

if [[ $PIP -eq 1 ]]; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        run "$PYTHON" -m venv "$VENV"
    fi
    constraints=()
    if [[ -f "$SOURCE/constraints.txt" ]]; then
        constraints=(-c "$SOURCE/constraints.txt")
    fi
    run "$VENV/bin/pip" install --quiet --upgrade "${constraints[@]}" \
        "$SOURCE[$ALL_EXTRAS]"
fi

# The unit is ours: replace it. Local changes belong in drop-ins
# (systemctl edit), which survive this.
run install -D -m 0644 "$UNITS/$UNIT" "$UNIT_DIR/$UNIT"

# The env file is the operator's once installed: never overwrite it.
env_file="$ETC_DIR/$ROLE.env"
if [[ ! -e "$env_file" ]]; then
    run install -D -m 0640 "$UNITS/$ROLE.env" "$env_file"
elif cmp -s "$UNITS/$ROLE.env" "$env_file"; then
    echo "= $env_file is up to date"
else
    echo "= $env_file was edited: kept; the packaged version goes to $env_file.new"
    run install -m 0640 "$UNITS/$ROLE.env" "$env_file.new"
fi

if [[ -z "$PREFIX" && -d /run/systemd/system ]]; then
    run systemctl daemon-reload
    run systemctl enable "$UNIT"
    echo "next: write /etc/gpufleet/$ROLE.yaml, then 'systemctl start $UNIT'"
else
    echo "systemd is not running here (or --prefix is set): not enabling $UNIT"
fi
