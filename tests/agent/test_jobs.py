"""Tests of the agent's job supervisor with real child processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpufleet.agent.jobs import GONE_DETAIL, JobSupervisor, _read_stat
from gpufleet.proto import pb

WAIT_S = 3.0

# A job that writes "<name>.ready" once its SIGUSR1 handler is in place, then
# "<name>.signalled" when the signal comes; argv[1] is the marker folder and
# argv[2] the name. With argv[3] == "fork" it first starts a copy of itself
# named "child" in the same process group.
SIGNAL_SCRIPT = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    folder, name = sys.argv[1], sys.argv[2]
    def mark(suffix):
        with open(os.path.join(folder, name + suffix), "w") as fh:
            fh.write(str(os.getpid()))
    signal.signal(signal.SIGUSR1, lambda *_: mark(".signalled"))
    if "ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "fork" in sys.argv:
        subprocess.Popen([sys.executable, sys.argv[0], folder, "child"])
    mark(".ready")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.01)
    """
)


class Recorder:
    """Collects the JobUpdates a supervisor reports."""

    def __init__(self) -> None:
        self.updates: list[pb.JobUpdate] = []

    def __call__(self, update: pb.JobUpdate) -> None:
        self.updates.append(update)

    def events(self) -> list[str]:
        return [u.event for u in self.updates if u.event]

    def states(self) -> list[str]:
        return [u.state for u in self.updates]


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir whose job process groups are killed after the test."""
    folder = tmp_path / "state"
    yield folder
    for record in folder.glob("jobs/*/*/job.json"):
        try:
            data = json.loads(record.read_text())
        except ValueError:
            continue
        stat = _read_stat(data["pid"]) if data["pid"] > 1 else None
        if stat is not None and stat[2] == data["start_ticks"]:
            with contextlib.suppress(OSError):
                os.killpg(data["pid"], signal.SIGKILL)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "signal_job.py"
    path.write_text(SIGNAL_SCRIPT)
    return path


def make(state_dir: Path, **kwargs: object) -> tuple[JobSupervisor, Recorder]:
    recorder = Recorder()
    sup = JobSupervisor(state_dir, recorder, poll_interval_s=0.02, **kwargs)  # type: ignore[arg-type]
    return sup, recorder


def start_cmd(
    job_id: str, argv: list[str], *, attempt: int = 1, **spec: object
) -> pb.StartJob:
    return pb.StartJob(
        job_id=job_id,
        attempt=attempt,
        spec=pb.JobSpec(argv=argv, **spec),  # type: ignore[arg-type]
    )


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


async def until(sup: JobSupervisor, done: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not done():
        assert loop.time() < deadline, "condition not reached in time"
        await sup.poll()
        await asyncio.sleep(0.01)


async def wait_file(path: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not await asyncio.to_thread(path.exists):
        assert loop.time() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.01)


def signal_job(script: Path, folder: Path, name: str, *flags: str) -> list[str]:
    return [sys.executable, str(script), str(folder), name, *flags]


async def test_start_sets_environment_and_captures_output(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUFLEET_BROKER", "broker.example:50051")
    sup, rec = make(state_dir)
    code = """
        import json, os, sys
        keys = ["GPUFLEET_JOB_ID", "GPUFLEET_CHECKPOINT_URL", "GPUFLEET_RESUME_FROM",
                "GPUFLEET_EVENTS_PATH", "GPUFLEET_CHECKPOINT_SIGNAL",
                "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "FOO",
                "GPUFLEET_BROKER"]
        print(json.dumps({k: os.environ.get(k) for k in keys} | {"cwd": os.getcwd()}))
        print("to stderr", file=sys.stderr)
    """
    cmd = start_cmd(
        "train-1",
        py(code),
        checkpoint_url="file:///ckpt/train-1",
        env={"FOO": "bar", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
    )
    cmd.gpu_uuids.extend(["GPU-a", "GPU-b"])
    cmd.resume_from = "file:///ckpt/train-1/step-5"

    result = await sup.start(cmd)
    assert result.status == pb.COMMAND_STATUS_DONE, result.detail
    await until(sup, lambda: "succeeded" in rec.states())

    folder = state_dir / "jobs" / "train-1" / "1"
    out = (folder / "output.log").read_text().splitlines()
    env = json.loads(out[0])
    assert env == {
        "GPUFLEET_JOB_ID": "train-1",
        "GPUFLEET_CHECKPOINT_URL": "file:///ckpt/train-1",
        "GPUFLEET_RESUME_FROM": "file:///ckpt/train-1/step-5",
        "GPUFLEET_EVENTS_PATH": str(folder / "events.jsonl"),
        "GPUFLEET_CHECKPOINT_SIGNAL": "SIGUSR1",
        "CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b",
        "HIP_VISIBLE_DEVICES": "GPU-a,GPU-b",
        "FOO": "bar",
        "GPUFLEET_BROKER": None,
        "cwd": str(folder),
    }
    assert "to stderr" in out
    assert rec.states() == ["running", "succeeded"]
    assert rec.updates[-1].exit_code == 0
    assert sup.running_gpus() == set()


async def test_start_with_workdir_runs_there(state_dir: Path, tmp_path: Path) -> None:
    sup, rec = make(state_dir)
    workdir = tmp_path / "work"
    workdir.mkdir()
    cmd = start_cmd("wd", py("import os; print(os.getcwd())"), workdir=str(workdir))
    await sup.start(cmd)
    await until(sup, lambda: "succeeded" in rec.states())
    log_text = (state_dir / "jobs" / "wd" / "1" / "output.log").read_text()
    assert log_text.strip() == str(workdir)


async def test_events_file_tailed_into_updates(state_dir: Path) -> None:
    sup, rec = make(state_dir)
    await sup.start(start_cmd("tail", py("import time; time.sleep(30)")))
    events = state_dir / "jobs" / "tail" / "1" / "events.jsonl"

    def append(text: str) -> None:
        with events.open("a") as fh:
            fh.write(text)

    append('{"event":"checkpoint.sa')
    await sup.poll()
    assert rec.events() == []
    append(
        'ved","step":5,"url":"file:///c/5","bytes":10,"duration_s":0.1,'
        '"requested":true}\n'
    )
    await sup.poll()
    saved = rec.updates[-1]
    assert (saved.event, saved.state) == ("checkpoint.saved", "checkpointed")
    assert (saved.checkpoint_url, saved.checkpoint_step, saved.step) == (
        "file:///c/5",
        5,
        5,
    )

    append("not json\n")
    append('{"event":"mystery","step":6}\n')
    append('{"event":"step.progress","step":"seven"}\n')
    append("x" * 100_000)
    await sup.poll()
    append('y"}\n{"event":"step.progress","step":7}\n')
    await sup.poll()
    assert rec.events() == ["checkpoint.saved", "step.progress"]
    assert rec.updates[-1].step == 7
    assert sup.events_skipped_total == 4

    [snap] = sup.snapshot()
    assert (snap.state, snap.step, snap.checkpoint_url) == ("running", 7, "file:///c/5")
    assert (await sup.stop(pb.StopJob(job_id="tail"))).status == pb.COMMAND_STATUS_DONE


async def test_events_written_before_exit_precede_final_state(state_dir: Path) -> None:
    """The last line may lack its newline; it still counts when it is whole."""
    sup, rec = make(state_dir)
    code = """
        import json, os
        with open(os.environ["GPUFLEET_EVENTS_PATH"], "a") as fh:
            fh.write(json.dumps({"event": "checkpoint.fallback", "bad_url": "u/9",
                                 "error": "bad checksum", "used_url": "u/8"}) + "\\n")
            fh.write(json.dumps({"event": "checkpoint.restored", "step": 8,
                                 "url": "u/8", "exact": True, "skipped": 0}) + "\\n")
            fh.write(json.dumps({"event": "job.exiting", "step": 9,
                                 "reason": "finished"}))
    """
    await sup.start(start_cmd("ev", py(code)))
    await until(sup, lambda: "succeeded" in rec.states())

    assert rec.events() == [
        "checkpoint.fallback",
        "checkpoint.restored",
        "job.exiting",
    ]
    assert "bad checksum" in rec.updates[1].detail
    final = rec.updates[-1]
    assert (final.state, final.step, final.checkpoint_url, final.checkpoint_step) == (
        "succeeded",
        9,
        "u/8",
        8,
    )


async def test_step_progress_reported_at_most_every_interval(state_dir: Path) -> None:
    now = [1000.0]
    sup, rec = make(state_dir, clock=lambda: now[0])
    await sup.start(start_cmd("prog", py("import time; time.sleep(30)")))
    events = state_dir / "jobs" / "prog" / "1" / "events.jsonl"
    for step, advance_s in ((1, 0.0), (2, 0.5), (3, 10.0)):
        now[0] += advance_s
        with events.open("a") as fh:
            fh.write(json.dumps({"event": "step.progress", "step": step}) + "\n")
        await sup.poll()
    assert [u.step for u in rec.updates if u.event] == [1, 3]
    await sup.stop(pb.StopJob(job_id="prog", term_timeout_s=1))


async def test_checkpoint_signal_reaches_forked_child(
    state_dir: Path, script: Path, tmp_path: Path
) -> None:
    sup, _ = make(state_dir)
    argv = signal_job(script, tmp_path, "parent", "fork")
    await sup.start(start_cmd("ck", argv))
    await wait_file(tmp_path / "parent.ready")
    await wait_file(tmp_path / "child.ready")

    result = await sup.checkpoint(pb.CheckpointJob(job_id="ck", reason="notice"))
    assert result.status == pb.COMMAND_STATUS_DONE, result.detail
    assert "SIGUSR1" in result.detail
    await wait_file(tmp_path / "parent.signalled")
    await wait_file(tmp_path / "child.signalled")
    await sup.stop(pb.StopJob(job_id="ck", term_timeout_s=1))


async def test_checkpoint_job_not_running_refused(state_dir: Path) -> None:
    sup, rec = make(state_dir)
    result = await sup.checkpoint(pb.CheckpointJob(job_id="nope"))
    assert result.status == pb.COMMAND_STATUS_REFUSED
    await sup.start(start_cmd("done", py("pass")))
    await until(sup, lambda: "succeeded" in rec.states())
    result = await sup.checkpoint(pb.CheckpointJob(job_id="done"))
    assert result.status == pb.COMMAND_STATUS_REFUSED
    assert "not running" in result.detail


async def test_stop_job_ignoring_sigterm_killed_after_timeout(
    state_dir: Path, script: Path, tmp_path: Path
) -> None:
    sup, rec = make(state_dir)
    await sup.start(start_cmd("stub", signal_job(script, tmp_path, "j", "ignore-term")))
    await wait_file(tmp_path / "j.ready")

    result = await sup.stop(pb.StopJob(job_id="stub", term_timeout_s=0.3, reason="x"))
    assert result.status == pb.COMMAND_STATUS_DONE
    assert "SIGKILL" in result.detail
    await until(sup, lambda: "stopped" in rec.states())
    assert rec.updates[-1].exit_code == -signal.SIGKILL
    assert sup.running_gpus() == set()


async def test_stop_job_ending_on_sigterm_reports_stopped(state_dir: Path) -> None:
    sup, rec = make(state_dir)
    cmd = start_cmd("soft", py("import time; time.sleep(30)"))
    cmd.gpu_uuids.append("GPU-x")
    await sup.start(cmd)
    assert sup.running_gpus() == {"GPU-x"}

    result = await sup.stop(pb.StopJob(job_id="soft", reason="cancelled"))
    assert result.status == pb.COMMAND_STATUS_DONE
    assert "after SIGTERM" in result.detail
    await until(sup, lambda: "stopped" in rec.states())
    assert rec.updates[-1].detail == "stopped: cancelled"
    again = await sup.stop(pb.StopJob(job_id="soft"))
    assert again.status == pb.COMMAND_STATUS_DONE
    assert "already stopped" in again.detail


async def test_exit_nonzero_reports_failed_with_log_tail(state_dir: Path) -> None:
    sup, rec = make(state_dir, log_tail_bytes=64)
    code = """
        import sys
        for i in range(50):
            print(f"line {i}", file=sys.stderr)
        sys.exit(3)
    """
    await sup.start(start_cmd("bad", py(code)))
    await until(sup, lambda: "failed" in rec.states())
    final = rec.updates[-1]
    assert (final.exit_code, final.detail) == (3, "exited with code 3")
    assert final.log_tail.endswith("line 49\n")
    assert final.log_tail.startswith("line ")
    assert len(final.log_tail.encode()) <= 64
    assert sup.snapshot()[0].log_tail == final.log_tail


async def test_start_duplicate_running_refused(state_dir: Path) -> None:
    sup, _ = make(state_dir)
    argv = py("import time; time.sleep(30)")
    assert (await sup.start(start_cmd("dup", argv))).status == pb.COMMAND_STATUS_DONE
    same = await sup.start(start_cmd("dup", argv))
    other_attempt = await sup.start(start_cmd("dup", argv, attempt=2))
    assert same.status == pb.COMMAND_STATUS_REFUSED
    assert other_attempt.status == pb.COMMAND_STATUS_REFUSED
    assert "attempt 1 is running" in same.detail
    await sup.stop(pb.StopJob(job_id="dup", term_timeout_s=1))


@pytest.mark.parametrize("job_id", ["../etc", "..", ".", "a/b", "", "x" * 65, "a b"])
async def test_start_bad_job_id_refused(state_dir: Path, job_id: str) -> None:
    sup, _ = make(state_dir)
    result = await sup.start(start_cmd(job_id, py("pass")))
    assert result.status == pb.COMMAND_STATUS_REFUSED
    assert "job ids must match" in result.detail
    assert not (state_dir / "jobs").exists() or not any((state_dir / "jobs").iterdir())


async def test_start_empty_argv_or_bad_signal_refused(state_dir: Path) -> None:
    sup, _ = make(state_dir)
    empty = await sup.start(start_cmd("e", []))
    assert empty.status == pb.COMMAND_STATUS_REFUSED
    assert "empty argv" in empty.detail
    bad_sig = start_cmd("s", py("pass"), env={"GPUFLEET_CHECKPOINT_SIGNAL": "KILL"})
    result = await sup.start(bad_sig)
    assert result.status == pb.COMMAND_STATUS_REFUSED


async def test_start_missing_program_fails_naming_it(state_dir: Path) -> None:
    sup, rec = make(state_dir)
    result = await sup.start(start_cmd("missing", ["/no/such/program", "--x"]))
    assert result.status == pb.COMMAND_STATUS_FAILED
    assert "'/no/such/program'" in result.detail
    assert rec.updates == []
    retry = await sup.start(start_cmd("missing", py("pass")))
    assert retry.status == pb.COMMAND_STATUS_DONE


async def test_rediscovery_finds_running_job_and_controls_it(
    state_dir: Path, script: Path, tmp_path: Path
) -> None:
    first, _ = make(state_dir)
    cmd = start_cmd("keep", signal_job(script, tmp_path, "j"))
    cmd.gpu_uuids.append("GPU-k")
    await first.start(cmd)
    await wait_file(tmp_path / "j.ready")
    await first.close()

    second, rec = make(state_dir)
    [snap] = second.snapshot()
    assert (snap.job_id, snap.attempt, snap.state) == ("keep", 1, "running")
    assert second.running_gpus() == {"GPU-k"}
    result = await second.checkpoint(pb.CheckpointJob(job_id="keep"))
    assert result.status == pb.COMMAND_STATUS_DONE, result.detail
    await wait_file(tmp_path / "j.signalled")

    stop = await second.stop(pb.StopJob(job_id="keep", term_timeout_s=1))
    assert stop.status == pb.COMMAND_STATUS_DONE, stop.detail
    await until(second, lambda: "stopped" in rec.states())


async def test_rediscovery_reports_gone_job_failed(state_dir: Path) -> None:
    """Events the job wrote while no agent watched are reported before the end."""
    first, _ = make(state_dir)
    code = """
        import json, os
        print("last words")
        with open(os.environ["GPUFLEET_EVENTS_PATH"], "a") as fh:
            fh.write(json.dumps({"event": "checkpoint.saved", "step": 4,
                                 "url": "u/4"}) + "\\n")
    """
    await first.start(start_cmd("gone", py(code)))
    record = json.loads((state_dir / "jobs/gone/1/job.json").read_text())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while (_read_stat(record["pid"]) or ("Z",))[0] != "Z":
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    await first.close()

    second, rec = make(state_dir)
    [snap] = second.snapshot()
    assert (snap.state, snap.detail) == ("failed", GONE_DETAIL)
    assert (snap.checkpoint_url, snap.checkpoint_step) == ("u/4", 4)
    assert "last words" in snap.log_tail
    assert rec.updates == []
    task = asyncio.create_task(second.run_loop())
    await until(second, lambda: len(rec.updates) == 2)
    await second.close()
    await asyncio.wait_for(task, WAIT_S)
    assert [(u.event, u.state) for u in rec.updates] == [
        ("checkpoint.saved", "checkpointed"),
        ("", "failed"),
    ]

    third, _ = make(state_dir)
    assert [u.detail for u in third.snapshot()] == [GONE_DETAIL]


async def test_rediscovery_reused_pid_never_signalled(
    state_dir: Path, script: Path, tmp_path: Path
) -> None:
    first, _ = make(state_dir)
    await first.start(start_cmd("reuse", signal_job(script, tmp_path, "j")))
    await wait_file(tmp_path / "j.ready")
    await first.close()
    path = state_dir / "jobs/reuse/1/job.json"
    record = json.loads(path.read_text())
    record["start_ticks"] += 1
    path.write_text(json.dumps(record))
    try:
        await check_reused_pid_not_signalled(state_dir, tmp_path, record["pid"])
    finally:
        os.killpg(record["pid"], signal.SIGKILL)


async def check_reused_pid_not_signalled(
    state_dir: Path, tmp_path: Path, pid: int
) -> None:

    second, _ = make(state_dir)
    assert second.snapshot()[0].state == "failed"
    result = await second.checkpoint(pb.CheckpointJob(job_id="reuse"))
    assert result.status == pb.COMMAND_STATUS_REFUSED
    stop = await second.stop(pb.StopJob(job_id="reuse", term_timeout_s=0.1))
    assert "already failed" in stop.detail
    await asyncio.sleep(0.05)
    stat = _read_stat(pid)
    assert stat is not None
    assert stat[0] not in "ZX"
    assert not (tmp_path / "j.signalled").exists()


async def test_rediscovery_skips_invalid_record(state_dir: Path) -> None:
    folder = state_dir / "jobs" / "evil" / "1"
    folder.mkdir(parents=True)
    record = {"job_id": "evil", "attempt": 1, "pid": 0, "start_ticks": 1}
    record |= {"boot_id": "", "started_at_s": 0.0, "signal_name": "SIGUSR1"}
    (folder / "job.json").write_text(json.dumps(record))
    (state_dir / "jobs" / "junk" / "1").mkdir(parents=True)
    (state_dir / "jobs" / "junk" / "1" / "job.json").write_text("{not json")
    sup, _ = make(state_dir)
    assert sup.snapshot() == []


async def test_close_stops_loop_and_leaves_job_running(state_dir: Path) -> None:
    sup, rec = make(state_dir)
    task = asyncio.create_task(sup.run_loop())
    await sup.start(start_cmd("live", py("import time; time.sleep(30)")))
    await sup.close()
    await asyncio.wait_for(task, WAIT_S)
    record = json.loads((state_dir / "jobs/live/1/job.json").read_text())
    await asyncio.sleep(0.05)
    stat = _read_stat(record["pid"])
    assert stat is not None
    assert stat[0] not in "ZX"
    assert rec.states() == ["running"]


async def test_report_callback_error_does_not_stop_polling(state_dir: Path) -> None:
    calls: list[str] = []

    def flaky(update: pb.JobUpdate) -> None:
        calls.append(update.state)
        raise RuntimeError("outbox closed")

    sup = JobSupervisor(state_dir, flaky, poll_interval_s=0.02)
    await sup.start(start_cmd("flaky", py("pass")))
    await until(sup, lambda: "succeeded" in calls)


async def test_rediscovered_job_exiting_later_reported_failed(state_dir: Path) -> None:
    """A job the new supervisor did not start leaves no exit code: "failed"."""
    first, _ = make(state_dir)
    await first.start(start_cmd("later", py("import time; time.sleep(0.3)")))
    await first.close()
    second, rec = make(state_dir)
    assert second.snapshot()[0].state == "running"
    await until(second, lambda: "failed" in rec.states())
    assert rec.updates[-1].detail == GONE_DETAIL
