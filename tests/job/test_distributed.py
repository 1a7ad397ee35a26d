"""Two CPU ranks (gloo) save and restore through Distributed Checkpoint."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gpufleet.job import Checkpointer, EventLog


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # replicated weights, as DDP keeps them
        model = nn.Linear(4, 3)
        torch.manual_seed(100 + rank)  # but each rank's own random stream
        optimizer = torch.optim.AdamW(model.parameters())
        events = EventLog(os.path.join(root, "events.jsonl"), job_id="ddp")
        ckpt = Checkpointer(
            model,
            optimizer,
            url=os.path.join(root, "ck"),
            events=events,
            install_signal=False,
        )
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        if rank == 1:
            ckpt.request()  # the signal reached one rank only
        ckpt.step(1, epoch=0, batch=0)
        expected_weight = model.weight.detach().clone()
        expected_draw = torch.rand(2)
        with torch.no_grad():
            model.weight.zero_()
        fresh = Checkpointer(
            model,
            optimizer,
            url=os.path.join(root, "ck"),
            events=events,
            install_signal=False,
        )
        step = fresh.restore()
        result = {
            "step": step,
            "weight_equal": bool(torch.equal(model.weight, expected_weight)),
            "draw_equal": bool(torch.equal(torch.rand(2), expected_draw)),
            "exact": fresh.last_restore.exact if fresh.last_restore else None,
            "batch": fresh.data_position.batch,
        }
        with open(os.path.join(root, f"rank{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def test_two_ranks_save_through_dcp_and_restore_each_rank_state(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {
            "step": 1,
            "weight_equal": True,
            "draw_equal": True,
            "exact": True,
            "batch": 1,
        }
    manifest = json.loads((tmp_path / "ck" / "step_1" / "manifest.json").read_text())
    assert manifest["kind"] == "torch.distributed.checkpoint"
    assert manifest["world_size"] == 2
    assert ".metadata" in manifest["files"]
    assert any(name.startswith("__1_") for name in manifest["files"])
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["event"] for line in lines]
    kinds = [k for k in kinds if k != "step.progress"]
    assert kinds == ["checkpoint.saved", "checkpoint.restored"]
