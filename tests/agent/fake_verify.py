"""A stand-in for ``python -m gpufleet.kernels.verify`` in the agent's tests.

Usage: fake_verify.py MODE RECORD ENTRY.json [verifier options...]

MODE says what to do: ``accept``, ``refuse`` (an out-of-resources verdict),
``crash`` (a traceback, exit 1), ``garbage`` (a line that is not a verdict),
``hang`` (sleep past any test's timeout) or ``noisy`` (log lines on stdout
before the verdict). Each run appends one JSON line with its arguments, the
kernel variables of its environment and its start and end times to RECORD.
"""

from __future__ import annotations

import json
import os
import sys
import time

VERDICTS = {
    "accept": {"accepted": True, "reason": "", "entry_ms": 1.5, "default_ms": 2.0},
    "refuse": {
        "accepted": False,
        "reason": "out-of-resources: needs 163840 bytes of shared memory, "
        "this GPU allows 101376",
        "entry_ms": 0.0,
        "default_ms": 0.0,
    },
}


def main() -> int:
    mode, record, *args = sys.argv[1:]
    started = time.monotonic()
    with open(args[0]) as handle:
        entry = json.load(handle)
    if mode == "hang":
        time.sleep(60)
    time.sleep(0.05)
    if mode == "crash":
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if mode == "garbage":
        print("Segmentation fault (core dumped)?")
    else:
        if mode == "noisy":
            print("triton: compiling kernel")
        print(json.dumps(VERDICTS["refuse" if mode == "refuse" else "accept"]))
    env = {k: v for k, v in os.environ.items() if "KERNEL" in k or "TRITON" in k}
    line = {
        "args": args,
        "env": env,
        "slot_key": entry["slot_key"],
        "started": started,
        "ended": time.monotonic(),
    }
    with open(record, "a") as handle:
        handle.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
