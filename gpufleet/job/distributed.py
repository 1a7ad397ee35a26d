"""Multi-rank checkpoints through PyTorch Distributed Checkpoint (DCP).

Used by the ``Checkpointer`` when ``torch.distributed`` is initialized with
more than one rank. Every rank writes its shard; rank 0 writes the manifest
after all ranks reported their files' checksums. Each rank's random state and
data position travel as one per-rank object, since DCP keeps one copy of any
key that all ranks share.
"""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gpufleet.job import rng
from gpufleet.job.errors import CheckpointError
from gpufleet.job.manifest import FileEntry, Manifest, check, hash_stream, seal
from gpufleet.job.storage import checkpoint_name
from gpufleet.job.writer import SaveResult

if TYPE_CHECKING:
    from gpufleet.job.checkpoint import Checkpointer, RestoreReport, Store

DCP_KIND = "torch.distributed.checkpoint"


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return bool(
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    )


def rank() -> int:
    """This process's rank, 0 when not distributed."""
    return dist.get_rank() if active() else 0


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank.

    The agent's signal reaches the ranks at slightly different steps; all
    ranks must agree on the step they save at, or DCP's collectives hang.
    """
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _rank_key(index: int) -> str:
    return f"rank_state_{index}"


def _pack(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _template(ckpt: Checkpointer) -> dict[str, Any]:
    """The state dict DCP saves from and loads into, per rank."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state: dict[str, Any] = {"step": ckpt._step}
    if ckpt.model is not None and ckpt.optimizer is not None:
        model_sd, optim_sd = get_state_dict(ckpt.model, ckpt.optimizer)  # type: ignore[arg-type]
        state["model"], state["optimizer"] = model_sd, optim_sd
    elif ckpt.model is not None:
        state["model"] = ckpt.model.state_dict()
    if ckpt.scheduler is not None:
        state["lr_scheduler"] = ckpt.scheduler.state_dict()
    if ckpt.extra_state is not None:
        state["extra_state"] = ckpt.extra_state.state_dict()
    return state


def _local_dir(ckpt: Checkpointer, name: str) -> str:
    path = ckpt.storage.local_path(name)
    if path is None:
        raise CheckpointError(
            ckpt.storage.child_url(name),
            "multi-rank checkpoints need a local or shared filesystem path",
            hint="set GPUFLEET_CHECKPOINT_URL to a shared folder (NFS, Lustre) "
            "for multi-rank jobs",
        )
    return str(path)


def save(ckpt: Checkpointer, step: int, requested: bool) -> SaveResult:
    """Writes one DCP checkpoint from all ranks; synchronous on every rank."""
    import torch.distributed.checkpoint as dcp

    name = checkpoint_name(step)
    result = SaveResult(
        step=step, url=ckpt.storage.child_url(name), requested=requested
    )
    started = time.monotonic()
    me, world = dist.get_rank(), dist.get_world_size()
    error: str | None = None
    mine: dict[str, FileEntry] = {}
    try:
        path = _local_dir(ckpt, name)
        if me == 0:
            ckpt.storage.remove_tree(name)
        dist.barrier()
        state = _template(ckpt)
        pos = ckpt.data_position
        state[_rank_key(me)] = _pack(
            {
                "rng": rng.capture(),
                "data_position": {
                    "epoch": pos.epoch,
                    "batch": pos.batch,
                    "epoch_rng": pos.epoch_rng,
                },
            }
        )
        dcp.save(state, checkpoint_id=path)
        mine = _hash_own_files(ckpt, name, me)
    except Exception as exc:
        error = f"{result.url}: {exc}"
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, (error, mine))
    errors = [e for e, _ in reports if e]
    if me == 0 and not errors:
        files: dict[str, FileEntry] = {}
        for _, entries in reports:
            files.update(entries)
        manifest = Manifest(
            step=step,
            files=files,
            kind=DCP_KIND,
            job_id=ckpt.events.job_id,
            world_size=world,
        )
        seal(ckpt.storage, name, manifest)
        result.bytes = manifest.total_bytes
        ckpt.prune()
    dist.barrier()
    result.error = errors[0] if errors else None
    result.duration_s = round(time.monotonic() - started, 6)
    return result


def _hash_own_files(ckpt: Checkpointer, name: str, me: int) -> dict[str, FileEntry]:
    """Checksums of the files this rank wrote (rank 0 also owns the metadata)."""
    folder = ckpt.storage.local_path(name)
    assert folder is not None
    entries: dict[str, FileEntry] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        owned = path.name.startswith(f"__{me}_") or (
            me == 0 and not path.name.startswith("__")
        )
        if owned and path.name != "manifest.json":
            with open(path, "rb") as handle:
                entries[path.name] = hash_stream(handle)
    return entries


def restore(ckpt: Checkpointer, storage: Store, names: list[str]) -> RestoreReport:
    """Rank 0 picks the newest verified checkpoint; every rank loads it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from gpufleet.job.checkpoint import RestoreReport

    report = RestoreReport()
    choice: list[Any] = [None, []]
    if dist.get_rank() == 0:
        for name in names:
            found = check(storage, name)
            if found.error is None:
                choice[0] = name
                break
            report.rejected.append(found)
        choice[1] = report.rejected
    dist.broadcast_object_list(choice, src=0)
    name, report.rejected = choice[0], choice[1]
    if name is None:
        return report
    path = storage.local_path(name)
    if path is None:
        raise CheckpointError(
            storage.child_url(name), "multi-rank restore needs a filesystem path"
        )
    key = _rank_key(dist.get_rank())
    state = _template(ckpt)
    known = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if key in known:
        state[key] = b""
    dcp.load(state, checkpoint_id=str(path))
    if "optimizer" in state and ckpt.model is not None and ckpt.optimizer is not None:
        set_state_dict(
            ckpt.model,
            ckpt.optimizer,  # type: ignore[arg-type]
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
    elif ckpt.model is not None:
        ckpt.model.load_state_dict(state["model"])
    local = (
        torch.load(io.BytesIO(state[key]), weights_only=True) if key in state else {}
    )
    merged = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    merged.update(local)
    skipped = ckpt.apply_state(merged)
    report.url, report.step = storage.child_url(name), int(state.get("step", 0))
    report.skipped, report.exact = skipped, not skipped
    return report
