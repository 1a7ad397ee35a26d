#!/usr/bin/env bash
# GPU check: the NVML collector against a real NVIDIA GPU (e.g. an H200).
#
# Run from anywhere on a machine with an NVIDIA GPU and driver:
#
#     bench/gpu_check.sh                 # the whole check, about 4-7 minutes
#     bench/gpu_check.sh --fetch-wheels  # on a networked machine: fetch wheels
#
# Sections: 0 GPU present, 1 install gpufleet with the agent, broker and
# nvidia extras into a virtual environment, 2 the GPU-marked NVML test,
# 3 ten rounds of the NVML collector (util, SM activity from GPM, memory,
# power, processes per GPU), 4 the same sampling while torch keeps the GPU
# busy, 5 bench/kernel_reuse.py: tune the Triton matmul once, time it against
# its default config and torch.matmul, and reuse the tuned config in a fresh
# process (4 and 5 only where torch with CUDA, and for 5 Triton, are already
# importable: this script never installs them).
#
# The machine may have no package index (the H200 device machine has none):
# then the dependencies its python lacks must travel as wheels in .whl/ at
# the repository root; --fetch-wheels downloads them for CPython 3.12 on
# x86-64 Linux; torch and Triton are not among them (their CUDA wheels are
# gigabytes): the venv sees the packages of the python that made it, through a
# .pth file, and with GPU_CHECK_SYSTEM_TORCH=1 also the base interpreter's
# system and user site-packages (venv --system-site-packages), for a host
# where torch is installed there. Output is also written to
# $OUT/gpu_check.log when OUT is set, and the kernel figures to
# $OUT/kernel_reuse.json.
# Exit codes: 0 done, 2 no NVIDIA GPU here, other: a step failed.
#
# Environment: PYTHON (default python3), GPU_CHECK_VENV (default
# /tmp/gpufleet-gpu-venv), GPU_CHECK_ROUNDS (default 10), GPU_CHECK_WHEELS
# (default .whl), GPU_CHECK_SYSTEM_TORCH=1 (see above), GPU_CHECK_KERNEL_SHAPES
# (default 1024x1024x1024,4096x4096x4096,8192x8192x4096), GPU_CHECK_KERNEL_DTYPE
# (default float16), GPU_CHECK_KERNEL_TIMEOUT (seconds for section 5, default
# 240), GPU_CHECK_FORCE=1 runs past a missing GPU (to test the script itself
# on a machine without one).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-/tmp/gpufleet-gpu-venv}
ROUNDS=${GPU_CHECK_ROUNDS:-10}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SYSTEM_TORCH=${GPU_CHECK_SYSTEM_TORCH:-0}
KERNEL_SHAPES=${GPU_CHECK_KERNEL_SHAPES:-1024x1024x1024,4096x4096x4096,8192x8192x4096}
KERNEL_DTYPE=${GPU_CHECK_KERNEL_DTYPE:-float16}
KERNEL_TIMEOUT=${GPU_CHECK_KERNEL_TIMEOUT:-240}
# What the check installs besides the project: the test runner and plugins.
TEST_DEPS=(pytest pytest-asyncio pytest-timeout)

section() { printf '\n===== %s =====\n' "$*"; }

fetch_wheels() {
    section "fetch wheels for CPython 3.12, manylinux x86-64, into $WHEELS"
    local platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
        manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64; do
        platforms+=(--platform "$p")
    done
    "$PYTHON" -m pip download --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$WHEELS" \
        "grpcio>=1.85.1" "protobuf>=7.35" structlog click rich pyyaml httpx \
        nvidia-ml-py "sqlalchemy[asyncio]" aiosqlite prometheus-client aiomqtt \
        cryptography setuptools wheel "${TEST_DEPS[@]}"
    du -sh "$WHEELS"
    echo "carry '$WHEELS' with the run; keep it out of git (.git/info/exclude)."
}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    fetch_wheels
    exit 0
fi
TMP=$(mktemp -d)
TEE_PID=""
cleanup() {
    rm -rf "$TMP"
    if [[ -n "$TEE_PID" ]]; then
        # Let tee write the last lines before the command returns.
        exec >&- 2>&-
        wait "$TEE_PID" || true
    fi
}
trap cleanup EXIT
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
    TEE_PID=$!
fi

section "0. NVIDIA GPU present?"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here: nvidia-smi is missing or lists no GPU." \
        "Run this on a machine with an NVIDIA GPU and driver (the H200 device" \
        "machine, say); nothing was installed or run." >&2
    if [[ "${GPU_CHECK_FORCE:-0}" != "1" ]]; then
        exit 2
    fi
    echo "GPU_CHECK_FORCE=1: going on without a GPU to test the script itself."
else
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit \
        --format=csv
fi

section "1. install gpufleet[agent,broker,nvidia] into $VENV"
"$PYTHON" --version
VENV_ARGS=()
if [[ "$SYSTEM_TORCH" == "1" ]]; then
    # For a torch installed in the base interpreter's system or user
    # site-packages, which the .pth file below does not cover.
    echo "GPU_CHECK_SYSTEM_TORCH=1: the venv also sees the system site-packages"
    VENV_ARGS+=(--system-site-packages)
fi
"$PYTHON" -m venv ${VENV_ARGS[@]+"${VENV_ARGS[@]}"} "$VENV"
# The new environment also sees the base python's packages (torch on the
# device machine), after its own, through a .pth file.
BASE_SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
VENV_SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$BASE_SITE" >"$VENV_SITE/_gpu_check_base_site.pth"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [[ -d "$WHEELS" ]]; then
    echo "installing from the wheels in $WHEELS (no package index)"
    PIP+=(--no-index --find-links "$WHEELS" --no-build-isolation)
    # The editable build needs setuptools >= 69 in the environment itself.
    "${PIP[@]}" setuptools wheel
else
    # Fail fast where no index answers, rather than retrying for minutes.
    PIP+=(--retries 1 --timeout 10)
fi
"${PIP[@]}" -e ".[agent,broker,nvidia]" "${TEST_DEPS[@]}"
"$VENV/bin/python" -c 'import gpufleet, grpc, pynvml; print("gpufleet", gpufleet.__version__, "grpcio", grpc.__version__)'

section "2. pytest -m gpu tests/agent/test_nvml.py"
"$VENV/bin/python" -m pytest -m gpu -q -p no:cacheprovider tests/agent/test_nvml.py

# The sampler: opens the NVML collector, prints the inventory, then one line
# per GPU per round. A field the GPU does not report prints as "-".
cat >"$TMP/sample.py" <<'PY'
import sys
import time

from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.proto import pb


def opt(sample, name, scale=1.0, fmt="{:.2f}"):
    return fmt.format(getattr(sample, name) * scale) if sample.HasField(name) else "-"


rounds = int(sys.argv[1])
collector = NvmlCollector()
infos = collector.open()
for info in infos:
    print(
        f"GPU {info.index}: {info.name} {info.uuid} "
        f"mem {info.mem_total_bytes / 2**30:.0f} GiB, driver {info.driver_version}, "
        f"cc {info.compute_capability}, GPM {info.sm_activity_supported}"
    )
print("round gpu util sm_active mem_used_GiB power_W temp_C sm_MHz health procs")
try:
    for r in range(rounds):
        for info in infos:
            for s in collector.sample(info.uuid):
                procs = ",".join(
                    f"{p.pid}:{p.name}:{p.used_mem_bytes / 2**20:.0f}MiB"
                    for p in s.processes
                )
                state = pb.ProcessListState.Name(s.process_state)
                print(
                    r, info.index, opt(s, "util_ratio"), opt(s, "sm_active_ratio"),
                    opt(s, "mem_used_bytes", 2**-30, "{:.1f}"),
                    opt(s, "power_w", fmt="{:.0f}"),
                    opt(s, "temperature_c", fmt="{:.0f}"),
                    opt(s, "sm_clock_hz", 1e-6, "{:.0f}"),
                    pb.GpuHealth.Name(s.health), f"{state}[{procs}]",
                    flush=True,
                )
        time.sleep(1.0)
finally:
    collector.close()
PY

# The burst: bf16 matrix products on GPU 0 for the given seconds.
cat >"$TMP/burst.py" <<'PY'
import sys
import time

import torch

seconds = float(sys.argv[1])
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
products, started = 0, time.perf_counter()
while time.perf_counter() - started < seconds:
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    products += 20
elapsed = time.perf_counter() - started
print(
    f"burst: {products} bf16 8192^3 products in {elapsed:.1f} s, "
    f"{products * 2 * 8192**3 / elapsed / 1e12:.0f} TFLOP/s",
    flush=True,
)
PY

section "3. NVML collector, $ROUNDS rounds at 1 s, GPU left alone"
"$VENV/bin/python" "$TMP/sample.py" "$ROUNDS"

section "4. NVML collector while torch keeps GPU 0 busy"
if ! "$VENV/bin/python" -c 'import torch; assert torch.cuda.is_available()' \
    2>/dev/null; then
    echo "torch with CUDA is not installed here: burst skipped (not installed by" \
        "this script; GPU_CHECK_SYSTEM_TORCH=1 lets the venv see a system torch)."
else
    BURST_S=$((ROUNDS + 6))
    "$VENV/bin/python" "$TMP/burst.py" "$BURST_S" &
    BURST_PID=$!
    sleep 4 # CUDA start-up and the first products
    "$VENV/bin/python" "$TMP/sample.py" "$ROUNDS"
    wait "$BURST_PID"
    echo "expected: util and sm_active near 1 on GPU 0 during the burst, the burst's"
    echo "python process in its process list, power and SM clock up."
fi

section "5. kernel reuse: tune a Triton matmul once, reuse it in a fresh process"
if ! "$VENV/bin/python" -c \
    'import torch, triton; assert torch.cuda.is_available()' 2>/dev/null; then
    echo "torch with CUDA and Triton are not both importable here: kernel_reuse" \
        "skipped (not installed by this script; GPU_CHECK_SYSTEM_TORCH=1 lets the" \
        "venv see a system torch)."
else
    KERNEL_ARGS=(--shapes "$KERNEL_SHAPES" --dtype "$KERNEL_DTYPE")
    if [[ -n "${OUT:-}" ]]; then
        KERNEL_ARGS+=(--out "$OUT/kernel_reuse.json")
    fi
    # Bounded: each shape tunes its 11 NVIDIA candidates twice (in the
    # script and in a cold process, each compiling afresh), so the shapes
    # set the time; kernel_reuse.py ends its fresh processes when stopped.
    KERNEL_RC=0
    timeout "$KERNEL_TIMEOUT" "$VENV/bin/python" bench/kernel_reuse.py \
        "${KERNEL_ARGS[@]}" || KERNEL_RC=$?
    if [[ "$KERNEL_RC" == "124" ]]; then
        echo "gpu_check: kernel_reuse.py ran past ${KERNEL_TIMEOUT} s" \
            "(GPU_CHECK_KERNEL_TIMEOUT); pass fewer or smaller" \
            "GPU_CHECK_KERNEL_SHAPES." >&2
    fi
    if [[ "$KERNEL_RC" != "0" ]]; then
        exit "$KERNEL_RC"
    fi
fi
section "done"
