"""The gpufleet CLI against a real broker: output, errors and exit codes."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from gpufleet.agent.collectors.nvml import NvmlCollector
from gpufleet.cli.main import main
from tests.e2e.conftest import TOKEN, agent_config, eventually
from tests.fakes.nvml import FakeNvml, a10g, h100_idle

POLICY = """\
fleet: cli
default:
  grace_window_s: 1
  warn_before_s: 0.5
  debounce_observations: 1
  action: notify
"""


async def run_cli(*args: str) -> int:
    return await asyncio.to_thread(main, list(args))


@pytest.fixture
async def fleet(tmp_path: Path, broker_factory, agent_factory):
    broker = await broker_factory(policy=POLICY)
    cfg = agent_config(tmp_path, broker.addr, "node-a")
    gpus = [a10g(uuid="GPU-busy", util_pct=90), h100_idle(uuid="GPU-idle")]
    await agent_factory(cfg, NvmlCollector(FakeNvml(gpus)))
    return broker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_cli_hosts_json_is_one_document_with_snake_case_keys(
    fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    await eventually(lambda: _host_listed(fleet.addr, capsys))
    code = await run_cli("--broker", fleet.addr, "--token", TOKEN, "--json", "hosts")
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    host = out["hosts"][0]
    assert host["identity"]["host_id"] == "node-a"
    assert host["status"] == "connected"
    assert "last_seen_s" in host


async def _host_listed(addr: str, capsys: pytest.CaptureFixture[str]) -> bool:
    await run_cli("--broker", addr, "--token", TOKEN, "--json", "gpus")
    data = json.loads(capsys.readouterr().out)
    return len(data["gpus"]) == 2 and all("last_sample" in g for g in data["gpus"])


async def test_cli_gpus_table_counts_healthy(fleet, capsys) -> None:
    await eventually(lambda: _host_listed(fleet.addr, capsys))
    code = await run_cli("--broker", fleet.addr, "--token", TOKEN, "gpus")
    captured = capsys.readouterr()
    assert code == 0
    assert "NVIDIA A10G" in captured.out
    assert "2 GPUs: 2 healthy, 0 lost" in captured.err


async def test_cli_idle_lists_only_the_idle_gpu_with_action(fleet, capsys) -> None:
    async def idle_listed() -> bool:
        await run_cli("--broker", fleet.addr, "--token", TOKEN, "--json", "idle")
        return bool(json.loads(capsys.readouterr().out)["idle"])

    await eventually(idle_listed)
    await run_cli("--broker", fleet.addr, "--token", TOKEN, "--json", "idle")
    idle = json.loads(capsys.readouterr().out)["idle"]
    assert [row["gpu_uuid"] for row in idle] == ["GPU-idle"]
    # The host's other GPU is busy, so nothing will happen, and the row says why.
    assert idle[0]["reason"].startswith("other-gpu")
    assert idle[0]["action_at_s"] == 0


async def test_cli_policy_apply_invalid_file_names_fields_and_exits_2(
    fleet, tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("default:\n  grace_windw_s: 60\n  action: explode\n")
    code = await run_cli(
        "--broker", fleet.addr, "--token", TOKEN, "policy", "apply", str(bad)
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "default.grace_windw_s" in err
    assert "did you mean" in err
    assert "default.action" in err


async def test_cli_policy_apply_then_show_round_trips(
    fleet, tmp_path: Path, capsys
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(POLICY.replace("grace_window_s: 1", "grace_window_s: 42"))
    assert (
        await run_cli(
            "--broker", fleet.addr, "--token", TOKEN, "policy", "apply", str(good)
        )
        == 0
    )
    capsys.readouterr()
    assert (
        await run_cli(
            "--broker", fleet.addr, "--token", TOKEN, "--json", "policy", "show"
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert "grace_window_s: 42" in shown["yaml"]


async def test_cli_events_json_lists_connection(fleet, capsys) -> None:
    async def connection_listed() -> bool:
        code = await run_cli(
            "--broker", fleet.addr, "--token", TOKEN, "--json", "events"
        )
        events = json.loads(capsys.readouterr().out)["events"]
        assert code == 0
        return "host.connected" in [e["kind"] for e in events]

    await eventually(connection_listed)


async def test_cli_wrong_token_exits_2_with_hint(fleet, capsys) -> None:
    code = await run_cli("--broker", fleet.addr, "--token", "nope", "hosts")
    err = capsys.readouterr().err
    assert code == 2
    assert "refused the admin token" in err
    assert "hint:" in err


async def test_cli_unreachable_broker_exits_3(capsys) -> None:
    addr = f"127.0.0.1:{_free_port()}"
    code = await run_cli("--broker", addr, "--token", "x", "--timeout", "1", "hosts")
    err = capsys.readouterr().err
    assert code == 3
    assert f"cannot reach the broker at {addr}" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--deadline", "12h"), "--deadline needs --work-hours"),
        (("--work-hours", "3"), "--work-hours needs --deadline"),
        (("--deadline", "2h", "--work-hours", "5"), "cannot be done by the deadline"),
        (
            ("--deadline", "12h", "--work-hours", "0"),
            "'--work-hours': 0.0 is not in the range",
        ),
        (("--deadline", "2020-01-01T00:00Z", "--work-hours", "1"), "not in the future"),
    ],
)
async def test_cli_job_the_broker_refuses_is_a_usage_error_exiting_2(
    fleet, capsys, flags: tuple[str, ...], message: str
) -> None:
    code = await run_cli(
        "--broker", fleet.addr, "--token", TOKEN, "jobs", "submit", *flags, "--", "true"
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err


async def test_cli_usage_error_exits_2(capsys) -> None:
    assert await run_cli("hosts", "--no-such-flag") == 2


def test_cli_agent_bad_config_names_every_field(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("collector: quantum\ninterval_s: -1\nbrokr: x:1\n")
    code = main(["agent", "run", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2
    assert "brokr: unknown field; did you mean broker?" in err
    assert "collector: must be one of" in err
    assert "interval_s: must be a number > 0" in err


def test_cli_broker_refuses_public_listen_without_tls(tmp_path: Path, capsys) -> None:
    code = main(
        ["broker", "serve", "--listen", "0.0.0.0:50051", "--state-dir", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "not a loopback address and no TLS" in err


def test_cli_init_certs_writes_and_refuses_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "pki"
    assert main(["broker", "init-certs", str(out), "--agent", "a1"]) == 0
    assert (out / "ca.pem").exists() or any(out.iterdir())
    assert main(["broker", "init-certs", str(out), "--agent", "a1"]) != 0


async def test_cli_common_options_may_follow_the_command(fleet, capsys) -> None:
    code = await run_cli("hosts", "--json", "--broker", fleet.addr, "--token", TOKEN)
    assert code == 2  # --token is global only: a usage error, said as such
    capsys.readouterr()
    code = await run_cli("--token", TOKEN, "hosts", "--json", "--broker", fleet.addr)
    assert code == 0
    assert "hosts" in json.loads(capsys.readouterr().out)


async def test_cli_second_broker_on_a_taken_port_exits_2(fleet, tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "gpufleet",
            "broker",
            "serve",
            "--listen",
            fleet.addr,
            "--metrics-listen",
            f"127.0.0.1:{_free_port()}",
            "--state-dir",
            str(tmp_path / "second"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"cannot bind {fleet.addr}" in proc.stderr


async def test_cli_gpus_of_a_host_gone_away_show_the_host_not_the_last_sample(
    tmp_path: Path, broker_factory, agent_factory, capsys
) -> None:
    broker = await broker_factory(policy=POLICY)
    cfg = agent_config(tmp_path, broker.addr, "node-gone")
    agent = await agent_factory(cfg, NvmlCollector(FakeNvml([h100_idle(uuid="G1")])))
    await eventually(lambda: _gpu_count(broker.addr, capsys, 1))
    await agent.shutdown()
    code = await run_cli("--broker", broker.addr, "--token", TOKEN, "gpus")
    captured = capsys.readouterr()
    assert code == 0
    assert "host disconnected" in captured.out
    assert "idle" not in captured.out.split("host disconnected", 1)[1].split("\n")[0]
    assert "1 on hosts not connected" in captured.err


async def _gpu_count(addr: str, capsys: pytest.CaptureFixture[str], n: int) -> bool:
    await run_cli("--broker", addr, "--token", TOKEN, "--json", "gpus")
    return len(json.loads(capsys.readouterr().out)["gpus"]) == n


async def test_cli_broker_that_accepts_but_never_answers_is_a_timeout_exiting_3(
    capsys,
) -> None:
    """A listener that takes the connection and says nothing (a hung broker)
    is reported as not answering in time, not as absent."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        addr = f"127.0.0.1:{listener.getsockname()[1]}"
        code = await run_cli(
            "--broker", addr, "--token", "x", "--timeout", "1", "hosts"
        )
    err = capsys.readouterr().err
    assert code == 3
    assert f"the broker at {addr} did not answer in time" in err
    assert "--timeout" in err
