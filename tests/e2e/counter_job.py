"""A tiny job that speaks the agent's job contract without torch.

It counts steps, saves {"step": N} as a checkpoint when it receives the
checkpoint signal, and resumes from GPUFLEET_RESUME_FROM.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

events = Path(os.environ["GPUFLEET_EVENTS_PATH"])
ckpt_dir = Path(os.environ.get("GPUFLEET_CHECKPOINT_URL", "."))
resume = os.environ.get("GPUFLEET_RESUME_FROM", "")
total = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
requested = False


def emit(event: str, **fields: object) -> None:
    line = {
        "event": event,
        "at_s": time.time(),
        "job_id": os.environ["GPUFLEET_JOB_ID"],
    }
    line.update(fields)
    with events.open("a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()


def on_signal(signum: int, frame: object) -> None:
    global requested
    requested = True


signal.signal(signal.SIGUSR1, on_signal)
step = 0
if resume:
    # A slow restore, for tests that kill the target while it restores.
    time.sleep(float(os.environ.get("COUNTER_RESUME_DELAY_S", "0")))
    step = json.loads(Path(resume).read_text())["step"]
    emit("checkpoint.restored", step=step, url=resume, exact=True, skipped=[])
print(f"start step={step}", flush=True)
while step < total:
    step += 1
    if step % 10 == 0:
        emit("step.progress", step=step)
    if requested:
        requested = False
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / f"step_{step}.json"
        path.write_text(json.dumps({"step": step}))
        emit(
            "checkpoint.saved",
            step=step,
            url=str(path),
            bytes=10,
            duration_s=0.0,
            requested=True,
        )
    time.sleep(0.02)
print(f"done step={step}", flush=True)
