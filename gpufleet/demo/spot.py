"""``gpufleet demo spot``: a fleet that starts empty and buys its own hosts.

A broker process with the spot market and provisioning on, against moto's
EC2 (offline, standing in for AWS). A PyTorch training job is submitted
with the gpufleet policy and a deadline; no host exists, so the broker
launches the best spot offer. The demo plays EC2's machines
(``machines.Datacenter``): each launched instance runs its real startup
script, which installs nothing (gpufleet is preinstalled here), writes the
agent's configuration and starts it. Part way in, the job's instance gets a
spot interruption notice: the broker launches the replacement in another
zone at once, the job checkpoints and resumes there, and every instance is
terminated once no job needs it. The demo fails unless no step is lost, the
zone changed and nothing is left running.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from gpufleet.demo import fleet as demo
from gpufleet.demo.machines import Datacenter
from gpufleet.demo.migrate import train_argv, wait_for
from gpufleet.errors import GpufleetError

REGION = "us-east-1"
FLEET = "demo-spot"
POLICY = f"fleet: {FLEET}\ndefault: {{action: notify}}\n"


def _broker_config(
    work: Path, endpoint: str, addr: str, token: str, image: str, pod: str
) -> Path:
    traces = demo.find_traces(None)
    config = {
        "listen": addr,
        "metrics_listen": f"127.0.0.1:{demo.free_port()}",
        "state_dir": str(work / "broker"),
        "admin_token": token,
        "policy_file": str(work / "policy.yaml"),
        "aws_endpoint_url": endpoint,
        "heartbeat_interval_s": 1.0,
        "market": {
            "enabled": True,
            "aws": {"regions": [REGION], "instance_types": ["g5.xlarge"]},
        },
        "provisioning": {
            "enabled": True,
            "broker_address": addr,
            "agent_package": "gpufleet[agent]",
            "max_instances": 3,
            "idle_release_s": 5,
            "enroll_timeout_s": 120,
            "aws": {"images": {REGION: image}},
            "agent_config": {
                "collector": "replay",
                "interval_s": 0.5,
                "replay": {
                    "duty_csv": str(traces / "pod_gpu_duty_cycle_sample.csv"),
                    "pods": [pod],
                    "loop": True,
                },
                "preemption": {"poll_interval_s": 0.2},
                "kernels": {"enabled": False},
            },
        },
    }
    (work / "policy.yaml").write_text(POLICY)
    path = work / "broker.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_spot_demo(*, steps: int = 300, out_dir: Path | None = None) -> int:
    """Runs the demo; returns 0 when it went as it must."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise GpufleetError(
            "the spot demo needs PyTorch for its training job: torch is not installed",
            hint="pip install 'gpufleet[job]' (make demo installs it)",
        ) from None
    from gpufleet.cli.client import AdminClient, ClientOptions
    from gpufleet.demo.machines import ec2_client

    console = Console()
    work = demo.work_dir(out_dir)
    addr = f"127.0.0.1:{demo.free_port()}"
    token = f"demo-{addr.rsplit(':', 1)[1]}"
    console.print(
        "[bold]gpufleet demo spot[/]: an empty fleet, a training job with a "
        f"deadline, and a broker that buys spot hosts in moto's EC2; work dir {work}"
    )
    with demo.moto_ec2() as endpoint:
        env = demo.base_env()
        ec2 = ec2_client(endpoint, REGION)
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        pods, _ = demo.pods_in(demo.find_traces(None), 1)
        config = _broker_config(work, endpoint, addr, token, image, pods[0])
        broker = demo.spawn(
            ["broker", "serve"],
            dict(env, GPUFLEET_BROKER_CONFIG=str(config)),
            work / "broker.log",
        )
        machines = Datacenter(endpoint, REGION, FLEET, work / "machines", env=env)
        client = AdminClient(ClientOptions(broker=addr, token=token, timeout_s=5.0))
        try:
            machines.start()
            result = _play(console, client, work, machines, steps)
            left = _left_running(ec2)
        finally:
            client.close()
            machines.stop()
            codes = demo.stop_all([broker])
    ok = _summary(console, result, left, machines.errors)
    console.print(f"broker exited with {codes[0]}; logs in {work}")
    return 0 if ok else 1


def _play(
    console: Console, client: Any, work: Path, machines: Datacenter, steps: int
) -> dict[str, Any]:
    from gpufleet.proto import pb

    def offers() -> Any:
        try:
            return client.call(
                "ListOffers",
                pb.ListOffersRequest(accelerator="a10g", provider="aws", limit=4),
            )
        except GpufleetError:
            return None

    listing = wait_for("the broker answering", offers, 60)
    table = Table(title="The broker's best A10G offers (gpufleet prices)")
    for column in ("zone", "type", "lifecycle", "USD/h", "risk/h", "score"):
        table.add_column(column)
    for o in listing.offers:
        table.add_row(
            o.zone or o.region,
            o.instance_type,
            o.lifecycle,
            f"{o.usd_per_hour:.5f}",
            f"{o.hourly_risk:.5f}",
            f"{o.score:.5f}",
        )
    console.print(table)
    console.print(
        "  (spot prices are moto's answers to describe_spot_price_history; "
        "on-demand from the shipped table)"
    )
    spec = pb.JobSpec(
        name="train-mlp",
        gpus=1,
        argv=train_argv(steps, 0.08, "--progress"),
        checkpoint_url=str(work / "checkpoints"),
        policy="gpufleet",
        deadline_s=time.time() + 2 * 3600,
        work_hours=0.05,
        accelerator="a10g",
    )
    submitted = time.time()
    job_id = client.call("SubmitJob", pb.SubmitJobRequest(spec=spec)).job_id
    console.print(f"submitted {job_id} (policy gpufleet, deadline in 2 h); no host yet")

    def view() -> Any:
        return client.call("GetJob", pb.JobRequest(job_id=job_id))

    first = wait_for(
        "the job running on a launched host",
        lambda: (v := view()).state == "RUNNING" and v,
        120,
    )
    launched = _instances(client)
    console.print(
        f"{time.time() - submitted:.1f} s after submission the job runs on "
        f"{first.host_id} ({first.lifecycle}, {_zone(launched, first.host_id)}), "
        "an instance the broker launched and whose startup script enrolled it"
    )
    wait_for(f"step {steps // 3}", lambda: view().step >= steps // 3, 120)
    machine = machines.machines[first.host_id]
    notice = machine.imds.schedule_notice("spot-interruption")
    console.print(
        f"step {view().step}: EC2 announces a spot interruption of {first.host_id}"
    )

    def moved() -> Any:
        v = view()
        if v.state in ("FAILED", "CANCELLED"):
            raise GpufleetError(f"the demo's job ended {v.state}: {v.detail}")
        return v.attempt >= 2 and v.state in ("RUNNING", "SUCCEEDED") and v

    second = wait_for("the job resuming on a new host", moved, 120)
    resumed_s = time.time() - notice.at_s
    console.print(
        f"the job runs again on {second.host_id} "
        f"({_zone(_instances(client), second.host_id)}), {resumed_s:.1f} s after "
        "the notice"
    )
    done = wait_for(
        "the job finishing",
        lambda: (v := view()).state in ("SUCCEEDED", "FAILED", "CANCELLED") and v,
        60 + steps * 0.2,
    )
    console.print(f"the job {done.state.lower()}; waiting for idle hosts to go")
    wait_for(
        "every launched instance released",
        lambda: all(v.state in ("released", "failed") for v in _instances(client)),
        60,
    )
    return {
        "done": done,
        "first": first,
        "second": second,
        "instances": _instances(client),
        "resumed_s": resumed_s,
    }


def _instances(client: Any) -> list[Any]:
    from gpufleet.proto import pb

    resp = client.call("ListInstances", pb.ListInstancesRequest(include_released=True))
    return list(resp.instances)


def _zone(instances: list[Any], host_id: str) -> str:
    for v in instances:
        if v.host_id == host_id or v.instance_id == host_id:
            return v.zone
    return "?"


def _left_running(ec2: Any) -> list[str]:
    reply = ec2.describe_instances(
        Filters=[{"Name": "tag:gpufleet:fleet", "Values": [FLEET]}]
    )
    return [
        i["InstanceId"]
        for r in reply["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] not in ("terminated", "shutting-down")
    ]


def _summary(
    console: Console, r: dict[str, Any], left: list[str], errors: dict[str, str]
) -> bool:
    done, first, second = r["done"], r["first"], r["second"]
    history = [line.kind for line in done.history]
    for line in done.history:
        console.print(f"  {line.kind:<26} {line.detail}")
    zone_a = _zone(r["instances"], first.host_id)
    zone_b = _zone(r["instances"], second.host_id)
    # The replacement is asked for on the notice, before the checkpoint the
    # notice triggered is saved (periodic saves before the notice aside).
    preplaced = False
    if "job.checkpointing" in history and "job.preplacing" in history:
        start = history.index("job.checkpointing")
        saves = [
            i
            for i, kind in enumerate(history)
            if kind == "job.checkpoint-saved" and i > start
        ]
        preplaced = bool(saves) and history.index("job.preplacing") < saves[0]
    checks = {
        "job succeeded": done.state == "SUCCEEDED",
        "steps lost is 0": done.steps_lost == 0,
        "replacement in another zone": zone_a != zone_b,
        "replacement asked for before the checkpoint was saved": preplaced,
        "no instance left running": not left,
        "every machine booted": not errors,
    }
    table = Table(
        title="Summary: spot capacity bought and given back", show_header=False
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    for v in r["instances"]:
        table.add_row(
            f"instance {v.instance_id}",
            f"{v.lifecycle} {v.instance_type} in {v.zone}: {v.state}",
        )
    table.add_row("notice to training resumed", f"{r['resumed_s']:.1f} s")
    table.add_row("steps lost", str(done.steps_lost))
    table.add_row("job cost (at moto's spot price)", f"{done.cost_usd:.6f} USD")
    for what, ok in checks.items():
        table.add_row(what, "yes" if ok else "NO")
    console.print(table)
    for iid, err in errors.items():
        console.print(f"[red]boot of {iid} failed[/]: {err}")
    return all(checks.values())
