"""The manifest that makes a checkpoint complete, and its verification.

A checkpoint's data files are written first; ``manifest.json`` comes last and
lists each file's size and SHA-256. A folder without a valid manifest, or with
a file whose size or checksum differs, is never loaded. This is shared by the
checkpointer and the Lightning and Hugging Face adapters.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from gpufleet.job.errors import CheckpointCorruptError, StorageError
from gpufleet.job.storage import Storage, parse_step

MANIFEST = "manifest.json"
FORMAT = "gpufleet.checkpoint/1"
READ_CHUNK_BYTES = 8 * 1024 * 1024
PARALLEL_HASH_BYTES = 1024 * 1024


class HashingWriter:
    """A write-only file wrapper that counts bytes and hashes them as they pass.

    ``torch.save`` writes through it, so the checksum costs no second read.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self._pool: ThreadPoolExecutor | None = None
        self.bytes_written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = memoryview(data).nbytes
        if size < PARALLEL_HASH_BYTES:
            self._handle.write(data)
            self._hash.update(data)
        else:
            # hashlib and file writes both release the GIL on large buffers,
            # so hashing beside the write makes the cost max(), not the sum;
            # waiting before returning keeps the hash in write order.
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash")
            hashed = self._pool.submit(self._hash.update, data)
            self._handle.write(data)
            hashed.result()
        self.bytes_written += size
        return size

    def close(self) -> None:
        """Stops the hashing thread (the wrapped file stays open)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def flush(self) -> None:
        self._handle.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@dataclass
class FileEntry:
    """One data file of a checkpoint as the manifest records it."""

    bytes: int
    sha256: str


@dataclass
class Manifest:
    """The content of ``manifest.json``."""

    step: int
    files: dict[str, FileEntry]
    kind: str = "torch.save"
    job_id: str | None = None
    world_size: int = 1
    created_at_s: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "step": self.step,
            "kind": self.kind,
            "job_id": self.job_id,
            "world_size": self.world_size,
            "created_at_s": self.created_at_s,
            "files": {
                name: {"bytes": e.bytes, "sha256": e.sha256}
                for name, e in sorted(self.files.items())
            },
            "meta": self.meta,
        }
        return json.dumps(body, indent=2, sort_keys=True).encode()

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.files.values())

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        """Parses a manifest; CheckpointCorruptError names ``where`` if invalid."""
        try:
            body = json.loads(raw)
            if body.get("format") != FORMAT:
                raise ValueError(f"unknown format {body.get('format')!r}")
            files = {
                str(name): FileEntry(int(e["bytes"]), str(e["sha256"]))
                for name, e in body["files"].items()
            }
            return cls(
                step=int(body["step"]),
                files=files,
                kind=str(body.get("kind", "torch.save")),
                job_id=body.get("job_id"),
                world_size=int(body.get("world_size", 1)),
                created_at_s=float(body.get("created_at_s", 0.0)),
                meta=dict(body.get("meta") or {}),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointCorruptError(
                where, where, f"not a valid manifest ({exc})"
            ) from exc


def hash_stream(handle: IO[bytes]) -> FileEntry:
    """Size and SHA-256 of everything readable from ``handle``."""
    digest = hashlib.sha256()
    size = 0
    while chunk := handle.read(READ_CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
    return FileEntry(size, digest.hexdigest())


def seal(storage: Storage, name: str, manifest: Manifest) -> None:
    """Writes the manifest last, making the checkpoint ``name`` complete."""
    storage.write_atomic(f"{name}/{MANIFEST}", manifest.to_json())


def seal_existing(
    storage: Storage, name: str, step: int, files: Iterable[str], **kw: Any
) -> Manifest:
    """Hashes files already written (by a framework) and seals the checkpoint."""
    entries: dict[str, FileEntry] = {}
    for rel in files:
        with storage.open_read(f"{name}/{rel}") as handle:
            entries[rel] = hash_stream(handle)
    manifest = Manifest(step=step, files=entries, **kw)
    seal(storage, name, manifest)
    return manifest


def read_manifest(storage: Storage, name: str) -> Manifest:
    """The manifest of checkpoint ``name``; CheckpointCorruptError if unusable."""
    url = storage.child_url(name)
    where = storage.child_url(f"{name}/{MANIFEST}")
    if not storage.exists(f"{name}/{MANIFEST}"):
        raise CheckpointCorruptError(
            url, where, "missing: the save did not finish (incomplete checkpoint)"
        )
    with storage.open_read(f"{name}/{MANIFEST}") as handle:
        return Manifest.from_json(handle.read(), where)


def verify(storage: Storage, name: str, manifest: Manifest) -> None:
    """Checks every file's size and checksum; raises on the first bad one."""
    for rel, expected in sorted(manifest.files.items()):
        where = storage.child_url(f"{name}/{rel}")
        try:
            with storage.open_read(f"{name}/{rel}") as handle:
                seen = hash_stream(handle)
        except StorageError:
            raise CheckpointCorruptError(
                storage.child_url(name), where, "missing"
            ) from None
        compare(storage.child_url(name), where, seen, expected)


def compare(url: str, where: str, seen: FileEntry, expected: FileEntry) -> None:
    """Raises CheckpointCorruptError naming ``where`` unless the two entries match."""
    if seen.bytes < expected.bytes:
        raise CheckpointCorruptError(
            url,
            where,
            f"truncated: {seen.bytes} of {expected.bytes} bytes "
            f"({100 * seen.bytes // max(expected.bytes, 1)} %), checksum mismatch",
        )
    if seen.bytes != expected.bytes:
        raise CheckpointCorruptError(
            url,
            where,
            f"the wrong size: {seen.bytes} bytes where the manifest says "
            f"{expected.bytes}, checksum mismatch",
        )
    if seen.sha256 != expected.sha256:
        raise CheckpointCorruptError(
            url,
            where,
            f"corrupt: checksum mismatch (sha256 {seen.sha256[:12]} where the "
            f"manifest says {expected.sha256[:12]})",
        )


@dataclass
class Candidate:
    """A checkpoint found in storage, verified or rejected."""

    name: str
    url: str
    manifest: Manifest | None = None
    error: CheckpointCorruptError | None = None


def newest_complete(
    storage: Storage, *, before_step: int | None = None, verify_files: bool = True
) -> tuple[Candidate | None, list[Candidate]]:
    """The newest checkpoint that passes verification, and those rejected first.

    Args:
        before_step: only consider checkpoints strictly older than this step.
        verify_files: hash every data file (not only read the manifest).
    """
    rejected: list[Candidate] = []
    for name in reversed(storage.list_checkpoints()):
        step = parse_step(name)
        if before_step is not None and (step is None or step >= before_step):
            continue
        found = check(storage, name, verify_files=verify_files)
        if found.error is None:
            return found, rejected
        rejected.append(found)
    return None, rejected


def check(storage: Storage, name: str, *, verify_files: bool = True) -> Candidate:
    """Reads and verifies one checkpoint, recording why it is unusable if so."""
    found = Candidate(name=name, url=storage.child_url(name))
    try:
        found.manifest = read_manifest(storage, name)
        if verify_files:
            verify(storage, name, found.manifest)
    except CheckpointCorruptError as exc:
        found.error = exc
    return found
