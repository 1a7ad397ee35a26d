"""The kernel cache on one host: tuned entries that jobs read, as files.

Layout under the root (``GPUFLEET_KERNEL_CACHE``, else
``~/.cache/gpufleet/kernels``; the agent uses its ``kernels.cache_dir``)::

    host.json                              fingerprints of this host's GPUs
    entries/<fingerprint>/<slot>.json      what jobs use: one winner per slot
    incoming/<slot>-<config>.json          received, not verified yet
    refused/<slot>-<config>.json           received and refused, with the reason
    locks/<slot>.lock                      one process per host tunes a slot

Every write goes to a temporary file first and is renamed into place, so a
reader sees the old file or the new one, never half of one. A file that
cannot be read is skipped with a warning and never breaks a caller: the
worst a damaged cache can do is make a job tune again.

Nothing here imports Triton or torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.kernels.entry import EntryRejected, KernelEntry
from gpufleet.kernels.fingerprint import FingerprintError, HardwareFingerprint

log = logging.getLogger(__name__)

ENV_CACHE = "GPUFLEET_KERNEL_CACHE"
ENV_FINGERPRINT = "GPUFLEET_KERNEL_FINGERPRINT"
ORIGINS = ("local", "peer", "pinned")
MAX_FILE_BYTES = 1 << 20


def default_root() -> Path:
    """The cache root a job uses: the agent's (via the environment) or the user's."""
    configured = os.environ.get(ENV_CACHE)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "gpufleet" / "kernels"


class CacheLockTimeout(TimeoutError):
    """Another process held a slot's tuning lock for too long."""


@dataclass(frozen=True)
class StoredEntry:
    """An entry as the cache keeps it."""

    entry: KernelEntry
    origin: str  # "local" (tuned here), "peer" (verified here), "pinned"
    verified: dict[str, Any] | None
    stored_at_s: float
    path: Path


@dataclass(frozen=True)
class RefusedEntry:
    entry: KernelEntry | None
    reason: str
    at_s: float
    path: Path


def _safe_name(text: str) -> str:
    if not text or not all(c.isalnum() or c in "-_" for c in text) or len(text) > 80:
        raise ValueError(f"{text!r} cannot name a cache file")
    return text


def _read_json(path: Path) -> Any:
    with path.open("rb") as handle:
        blob = handle.read(MAX_FILE_BYTES + 1)
    if len(blob) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    return json.loads(blob)


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes ``data`` as JSON so that readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, sort_keys=True, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class KernelCache:
    """A host's kernel cache rooted at one folder (created on first write)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def __repr__(self) -> str:
        return f"KernelCache({str(self.root)!r})"

    # ---------------------------------------------------------------- entries

    def _entry_path(self, fingerprint_key: str, slot: str) -> Path:
        return (
            self.root
            / "entries"
            / _safe_name(fingerprint_key)
            / f"{_safe_name(slot)}.json"
        )

    def _load_stored(self, path: Path) -> StoredEntry | None:
        try:
            data = _read_json(path)
            entry = KernelEntry.from_dict(data["entry"])
            origin = data.get("origin")
            if origin not in ORIGINS:
                raise ValueError(f"unknown origin {origin!r}")
            if path.stem != entry.slot_key:
                raise ValueError(f"holds slot {entry.slot_key}, not {path.stem}")
            verified = data.get("verified")
            if verified is not None and not isinstance(verified, dict):
                raise ValueError("'verified' must be an object")
            return StoredEntry(
                entry=entry,
                origin=origin,
                verified=verified,
                stored_at_s=float(data.get("stored_at_s", 0.0)),
                path=path,
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, EntryRejected) as exc:
            log.warning(
                "kernel cache file %s is unreadable, ignoring it (%s); "
                "delete it or run `gpufleet kernels evict` for its slot",
                path,
                exc,
            )
            return None

    def lookup(self, fingerprint_key: str, slot: str) -> StoredEntry | None:
        """The usable entry of one slot, or None (also for a damaged file)."""
        try:
            path = self._entry_path(fingerprint_key, slot)
        except ValueError:
            return None
        return self._load_stored(path)

    def store(
        self,
        entry: KernelEntry,
        origin: str,
        verified: dict[str, Any] | None = None,
    ) -> StoredEntry:
        """Makes ``entry`` the slot's winner on this host (replaces any other)."""
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, not {origin!r}")
        entry.check()
        path = self._entry_path(entry.fingerprint.key, entry.slot_key)
        now = time.time()
        write_json_atomic(
            path,
            {
                "entry": entry.to_dict(),
                "origin": origin,
                "verified": verified,
                "stored_at_s": now,
            },
        )
        return StoredEntry(entry, origin, verified, now, path)

    def remove(self, fingerprint_key: str, slot: str) -> bool:
        """Drops one slot's entry; True when there was one."""
        try:
            self._entry_path(fingerprint_key, slot).unlink()
        except (FileNotFoundError, ValueError):
            return False
        return True

    def remove_slot(self, slot: str) -> bool:
        """Drops a slot's entry whatever its fingerprint folder."""
        removed = False
        for folder in self._folders("entries"):
            try:
                (folder / f"{_safe_name(slot)}.json").unlink()
                removed = True
            except (FileNotFoundError, ValueError):
                continue
        return removed

    def entries(self, fingerprint_key: str | None = None) -> list[StoredEntry]:
        """Every readable usable entry, optionally of one fingerprint."""
        found = []
        for folder in self._folders("entries"):
            if fingerprint_key is not None and folder.name != fingerprint_key:
                continue
            for path in sorted(folder.glob("*.json")):
                stored = self._load_stored(path)
                if stored is not None:
                    found.append(stored)
        return found

    def _folders(self, name: str) -> list[Path]:
        base = self.root / name
        if not base.is_dir():
            return []
        return sorted(p for p in base.iterdir() if p.is_dir())

    # ---------------------------------------------------------------- received

    @staticmethod
    def _pending_name(entry: KernelEntry) -> str:
        return f"{entry.slot_key}-{entry.config_hash}.json"

    def put_incoming(self, entry: KernelEntry) -> Path:
        """Keeps a received entry until it is verified; returns its file."""
        entry.check()
        path = self.root / "incoming" / self._pending_name(entry)
        write_json_atomic(
            path, {"entry": entry.to_dict(), "received_at_s": time.time()}
        )
        return path

    def incoming(self) -> list[tuple[Path, KernelEntry]]:
        """Received entries waiting for verification, oldest first."""
        base = self.root / "incoming"
        if not base.is_dir():
            return []
        found = []
        paths = sorted(base.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for path in paths:
            try:
                found.append((path, KernelEntry.from_dict(_read_json(path)["entry"])))
            except (OSError, ValueError, KeyError, TypeError, EntryRejected) as exc:
                log.warning(
                    "dropping unreadable incoming kernel entry %s (%s)", path, exc
                )
                with contextlib.suppress(OSError):
                    path.unlink()
        return found

    def drop_incoming(self, entry: KernelEntry) -> None:
        with contextlib.suppress(OSError):
            (self.root / "incoming" / self._pending_name(entry)).unlink()

    def refuse(self, entry: KernelEntry, reason: str) -> Path:
        """Records that ``entry`` was refused here, and why."""
        path = self.root / "refused" / self._pending_name(entry)
        write_json_atomic(
            path, {"entry": entry.to_dict(), "reason": reason, "at_s": time.time()}
        )
        self.drop_incoming(entry)
        return path

    def refused(self) -> list[RefusedEntry]:
        base = self.root / "refused"
        if not base.is_dir():
            return []
        found = []
        for path in sorted(base.glob("*.json")):
            try:
                data = _read_json(path)
                entry: KernelEntry | None
                try:
                    entry = KernelEntry.from_dict(data.get("entry"))
                except EntryRejected:
                    entry = None  # refused for its shape; the reason says so
                found.append(
                    RefusedEntry(
                        entry, str(data.get("reason", "")), float(data["at_s"]), path
                    )
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("skipping unreadable refusal record %s (%s)", path, exc)
        return found

    # ---------------------------------------------------------------- host

    def write_host(
        self, fingerprints: dict[str, HardwareFingerprint], default_key: str
    ) -> None:
        """Records which fingerprint each GPU (by uuid) of this host has."""
        write_json_atomic(
            self.root / "host.json",
            {
                "fingerprints": {
                    uuid: fp.to_dict() for uuid, fp in sorted(fingerprints.items())
                },
                "default": default_key,
                "written_at_s": time.time(),
            },
        )

    def read_host(self) -> tuple[dict[str, HardwareFingerprint], str] | None:
        """The agent's record of this host's fingerprints, or None."""
        path = self.root / "host.json"
        try:
            data = _read_json(path)
            fingerprints = {
                str(uuid): HardwareFingerprint.from_dict(fp)
                for uuid, fp in data["fingerprints"].items()
            }
            return fingerprints, str(data.get("default", ""))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, FingerprintError) or not isinstance(exc, OSError):
                log.warning("ignoring unreadable %s (%s)", path, exc)
            return None

    def fingerprint(self, key: str) -> HardwareFingerprint | None:
        """The fingerprint with this key among the host's GPUs, if any."""
        host = self.read_host()
        if host is None:
            return None
        for fingerprint in host[0].values():
            if fingerprint.key == key:
                return fingerprint
        return None

    # ---------------------------------------------------------------- locks

    @contextlib.contextmanager
    def slot_lock(self, slot: str, timeout_s: float = 600.0) -> Iterator[None]:
        """Holds the host-wide tuning lock of one slot.

        Raises CacheLockTimeout when another process keeps it longer than
        ``timeout_s`` (a tuner that hung); the lock dies with its holder.
        """
        path = self.root / "locks" / f"{_safe_name(slot)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise CacheLockTimeout(
                            f"another process has been tuning slot {slot} for over "
                            f"{timeout_s:.0f} s (lock {path})"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
