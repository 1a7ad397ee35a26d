"""Checkpoints on S3 (moto's server on loopback) and URL parsing."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer
from torch import nn

from gpufleet.job import Checkpointer, EventLog, StorageError, open_storage, read_events
from gpufleet.job.storage import LocalStorage, S3Storage, split_checkpoint_url


@pytest.fixture
def s3_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A bucket on a fresh moto server, with fake credentials and endpoint set."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    # moto keeps its backend per process, so each test takes its own bucket.
    bucket = f"ckpts-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}/jobs/job-9"
    finally:
        server.stop()


def _checkpointer(url: str, tmp_path: Path, **kw: object) -> Checkpointer:
    torch.manual_seed(1)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    events = EventLog(str(tmp_path / "events.jsonl"))
    return Checkpointer(
        model, optimizer, url=url, events=events, install_signal=False, **kw
    )  # type: ignore[arg-type]


def test_s3_checkpoints_save_list_prune_and_restore(
    s3_url: str, tmp_path: Path
) -> None:
    ckpt = _checkpointer(s3_url, tmp_path, every_steps=1, keep=2)
    for step in (1, 2, 3):
        with torch.no_grad():
            ckpt.model.weight.add_(1.0)  # type: ignore[union-attr]
        ckpt.step(step)
        ckpt.wait()
    storage = open_storage(s3_url)
    assert isinstance(storage, S3Storage)
    assert storage.list_checkpoints() == ["step_2", "step_3"]
    fresh = _checkpointer(s3_url, tmp_path)
    assert fresh.restore() == 3
    assert torch.equal(fresh.model.weight, ckpt.model.weight)  # type: ignore[union-attr]
    saved = [
        e
        for e in read_events(tmp_path / "events.jsonl")
        if e["event"] == "checkpoint.saved"
    ]
    assert saved[-1]["url"] == f"{s3_url}/step_3"


def test_s3_truncated_object_falls_back(s3_url: str, tmp_path: Path) -> None:
    ckpt = _checkpointer(s3_url, tmp_path, every_steps=1, async_save=False)
    ckpt.step(1)
    ckpt.step(2)
    client = boto3.client("s3")
    bucket, key = s3_url.split("/")[2], "jobs/job-9/step_2/state.pt"
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=body[: len(body) // 2])
    fresh = _checkpointer(s3_url, tmp_path)
    assert fresh.restore() == 1
    [fallback] = [
        e
        for e in read_events(tmp_path / "events.jsonl")
        if e["event"] == "checkpoint.fallback"
    ]
    assert "step_2/state.pt is truncated" in str(fallback["error"])


def test_open_storage_accepts_paths_and_file_urls(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert open_storage(f"file://{tmp_path}").url == str(tmp_path)


def test_open_storage_rejects_unknown_scheme() -> None:
    with pytest.raises(StorageError, match="unsupported storage scheme 'gs'"):
        open_storage("gs://bucket/x")


def test_split_checkpoint_url_needs_a_step_folder() -> None:
    assert split_checkpoint_url("s3://b/p/step_40/") == ("s3://b/p", "step_40")
    with pytest.raises(StorageError, match="step_<N>"):
        split_checkpoint_url("s3://b/p")
