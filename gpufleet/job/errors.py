"""Errors the job SDK raises inside a training process.

They extend the project's ``GpufleetError`` tree, so callers catch one base.
"""

from __future__ import annotations

from gpufleet.errors import GpufleetError


class CheckpointError(GpufleetError):
    """A checkpoint could not be written or read.

    ``url`` names the checkpoint (or file) involved and ``reason`` says why.
    """

    def __init__(self, url: str, reason: str, *, hint: str | None = None) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"checkpoint {url}: {reason}", hint=hint)


class CheckpointCorruptError(CheckpointError):
    """A checkpoint is incomplete or its files fail their sizes or checksums.

    Such a checkpoint is never loaded; ``path`` names the first bad file.
    """

    def __init__(self, url: str, path: str, reason: str) -> None:
        self.path = path
        super().__init__(
            url,
            f"{path} is {reason}",
            hint="the restore falls back to the previous complete checkpoint",
        )


class StorageError(CheckpointError):
    """The checkpoint storage (a folder or an S3 bucket) failed an operation."""


class AdapterUnavailableError(GpufleetError, ImportError):
    """A framework adapter was used while its framework is not installed."""

    def __init__(self, adapter: str, package: str) -> None:
        self.adapter = adapter
        self.package = package
        super().__init__(
            f"cannot use {adapter}: the '{package}' package is not installed. "
            f"Install it (pip install {package}) or use gpufleet.job.Checkpointer "
            "in a plain PyTorch loop",
        )
