"""Checkpoint storage by URL: a local or shared folder, or an S3 prefix.

Each checkpoint is a folder ``step_<N>`` under the base URL holding its data
files and, written last, ``manifest.json``. This module only moves bytes; what
makes a checkpoint complete is decided in ``manifest``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

from gpufleet.job.errors import StorageError

# step_<N> is ours; checkpoint-<N> is what the Hugging Face Trainer writes.
CHECKPOINT_DIR = re.compile(r"^(?:step_|checkpoint-)(\d+)$")
# Reads of S3 objects up to this size stay in memory; larger ones spill to a
# temporary file, so a 1 GiB checkpoint does not double the job's RSS.
SPOOL_MAX_BYTES = 64 * 1024 * 1024


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after ``step``."""
    return f"step_{step}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint folder name, or None for other names."""
    match = CHECKPOINT_DIR.match(name)
    return int(match.group(1)) if match else None


class Storage(Protocol):
    """What the checkpointer needs from a place that keeps checkpoints."""

    url: str

    def child_url(self, rel: str) -> str:
        """The URL of ``rel`` under the base URL."""
        ...

    def list_checkpoints(self) -> list[str]:
        """Names of the checkpoint folders, oldest step first."""
        ...

    def open_write(self, rel: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A binary file that is durable (fsynced or uploaded) once closed."""
        ...

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Writes a small file so that readers see all of it or nothing."""
        ...

    def open_read(self, rel: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A binary file open for reading; StorageError if it is missing."""
        ...

    def exists(self, rel: str) -> bool:
        """True when the file ``rel`` exists."""
        ...

    def remove_tree(self, rel: str) -> None:
        """Deletes a checkpoint folder and everything in it."""
        ...

    def local_path(self, rel: str) -> Path | None:
        """The filesystem path of ``rel``, or None for object storage."""
        ...


class LocalStorage:
    """Checkpoints in a local or shared (NFS, Lustre) folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)

    def child_url(self, rel: str) -> str:
        return str(self.root / rel)

    def local_path(self, rel: str) -> Path | None:
        return self.root / rel

    def list_checkpoints(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = [
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and parse_step(p.name) is not None
        ]
        return sorted(names, key=lambda n: parse_step(n) or 0)

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(path.parent)

    def write_atomic(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # rename() is atomic on POSIX filesystems: a reader sees the old name
        # missing or the whole new file, never a prefix of it.
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    @contextlib.contextmanager
    def open_read(self, rel: str) -> Iterator[IO[bytes]]:
        path = self.root / rel
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise StorageError(str(path), "file not found") from None
        with handle:
            yield handle

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def remove_tree(self, rel: str) -> None:
        shutil.rmtree(self.root / rel, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Makes a new or renamed directory entry durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class S3Storage:
    """Checkpoints under an ``s3://bucket/prefix`` URL, through boto3.

    ``endpoint_url`` (or ``AWS_ENDPOINT_URL``) points boto3 at a compatible
    server such as MinIO or moto. A PUT is atomic in S3, so the manifest needs
    no rename.
    """

    def __init__(self, url: str, *, endpoint_url: str | None = None) -> None:
        try:
            import boto3
        except ImportError:
            raise StorageError(
                url, "boto3 is not installed", hint="pip install 'gpufleet[aws]'"
            ) from None
        parts = urlsplit(url)
        if not parts.netloc:
            raise StorageError(
                url, "the S3 URL names no bucket", hint="use s3://bucket/prefix"
            )
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client: Any = boto3.client(
            "s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        )

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def child_url(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def local_path(self, rel: str) -> Path | None:
        return None

    def list_checkpoints(self) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        names: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/"
            ):
                for common in page.get("CommonPrefixes", []):
                    name = common["Prefix"][len(base) :].rstrip("/")
                    if parse_step(name) is not None:
                        names.append(name)
        except Exception as exc:
            raise StorageError(self.url, f"cannot list checkpoints: {exc}") from exc
        return sorted(names, key=lambda n: parse_step(n) or 0)

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        with tempfile.TemporaryFile() as spool:
            yield spool
            spool.flush()
            spool.seek(0)
            try:
                self._client.upload_fileobj(spool, self.bucket, self._key(rel))
            except Exception as exc:
                raise StorageError(
                    self.child_url(rel), f"upload failed: {exc}"
                ) from exc

    def write_atomic(self, rel: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
        except Exception as exc:
            raise StorageError(self.child_url(rel), f"upload failed: {exc}") from exc

    @contextlib.contextmanager
    def open_read(self, rel: str) -> Iterator[IO[bytes]]:
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX_BYTES) as spool:
            try:
                self._client.download_fileobj(self.bucket, self._key(rel), spool)
            except Exception as exc:
                raise StorageError(
                    self.child_url(rel), f"download failed: {exc}"
                ) from exc
            spool.seek(0)
            yield spool  # type: ignore[misc]

    def exists(self, rel: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(rel))
        except Exception:
            return False
        return True

    def remove_tree(self, rel: str) -> None:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(rel) + "/"):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}
                )


def open_storage(url: str) -> LocalStorage | S3Storage:
    """The storage for a checkpoint base URL: a path, ``file://`` or ``s3://``."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        return S3Storage(url)
    if parts.scheme == "file":
        return LocalStorage(parts.path)
    if parts.scheme in ("", "local") or len(parts.scheme) == 1:
        # A one-letter scheme is a Windows drive letter, not a URL scheme.
        return LocalStorage(url)
    raise StorageError(
        url,
        f"unsupported storage scheme {parts.scheme!r}",
        hint="use a filesystem path, file://PATH or s3://bucket/prefix",
    )


def split_checkpoint_url(url: str) -> tuple[str, str]:
    """Splits the URL of one checkpoint into (base URL, folder name)."""
    trimmed = url.rstrip("/")
    base, _, name = trimmed.rpartition("/")
    if parse_step(name) is None:
        raise StorageError(
            url,
            "this is not the URL of one checkpoint (its last part must be step_<N>)",
            hint="set GPUFLEET_RESUME_FROM to a URL like s3://bucket/job/step_1000",
        )
    return base, name
