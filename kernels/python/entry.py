"""A tuned kernel config as it travels between hosts, and its checks.

An entry names one *slot*: the hardware fingerprint, the kernel, the hash of
the kernel's source, the tuning key (shapes and dtypes) and the hash of the
candidate list. A slot has one winner. The config itself is data, a few
named integers, and is checked here for shape and bounds before anything
else looks at it; whether it is one of the receiver's candidates, and
whether it runs correctly and fast there, is checked by the verifier.

Nothing here imports Triton or torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gpufleet.kernels.fingerprint import FingerprintError, HardwareFingerprint
from gpufleet.proto import pb

MAX_CONFIG_NAMES = 16
MAX_CONFIG_VALUE = 65536
MAX_TUNING_KEY_CHARS = 512
MAX_KERNEL_NAME_CHARS = 64
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{16}$")
_KERNEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")
_TUNING_KEY = re.compile(r"^[A-Za-z0-9_=,.:x\[\]-]*$")

# Launch knobs with their allowed values; any other name is a block size or
# a kernel-specific integer and only has to be within [0, MAX_CONFIG_VALUE].
_KNOBS: dict[str, range | tuple[int, ...]] = {
    "num_warps": (1, 2, 4, 8, 16, 32),
    "num_stages": range(0, 9),
    "num_ctas": range(1, 17),
    "waves_per_eu": range(0, 9),
    "matrix_instr_nonkdim": (0, 4, 16, 32),
    "kpack": (1, 2),
}


class EntryRejected(Exception):
    """An entry that may not be used, with a kebab-case cause and a detail."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.detail = detail


def _digest(text: str, chars: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def config_hash(config: dict[str, int]) -> str:
    """A short id of one config; equal configs give equal ids."""
    return _digest(_canonical(config))


def candidates_hash(candidates: list[dict[str, int]]) -> str:
    """A short id of a candidate list; the order counts (the first is the default)."""
    return _digest(_canonical(candidates))


def source_hash(source: str) -> str:
    """A short id of a kernel's source text."""
    return _digest(source)


def slot_key(
    fingerprint_key: str,
    kernel: str,
    source: str,
    tuning_key: str,
    candidates: str,
) -> str:
    """The id of one slot: fingerprint, kernel, source and candidates hashes, key."""
    return _digest(
        "|".join((fingerprint_key, kernel, source, tuning_key, candidates)), 24
    )


def check_config(config: Any) -> None:
    """Raises EntryRejected unless ``config`` is a small dict of bounded ints."""
    if not isinstance(config, dict):
        raise EntryRejected("bad-schema", "a config must be a mapping of names to ints")
    if not config:
        raise EntryRejected("bad-schema", "the config is empty")
    if len(config) > MAX_CONFIG_NAMES:
        raise EntryRejected(
            "bad-schema",
            f"the config has {len(config)} names, at most {MAX_CONFIG_NAMES} allowed",
        )
    for name, value in config.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise EntryRejected("bad-schema", f"config name {name!r} is not allowed")
        if type(value) is not int:
            raise EntryRejected(
                "bad-schema",
                f"config value {name}={value!r} must be an integer, "
                f"not {type(value).__name__}",
            )
        if not 0 <= value <= MAX_CONFIG_VALUE:
            raise EntryRejected(
                "out-of-bounds",
                f"config value {name}={value} is outside [0, {MAX_CONFIG_VALUE}]",
            )
        allowed = _KNOBS.get(name)
        if allowed is not None and value not in allowed:
            raise EntryRejected(
                "out-of-bounds",
                f"config value {name}={value} is not one of {list(allowed)}",
            )
        if name.startswith("BLOCK_") and (
            value < 1 or value > 4096 or value & (value - 1)
        ):
            raise EntryRejected(
                "out-of-bounds",
                f"config value {name}={value} must be a power of two in 1..4096",
            )


def _check_text(name: str, value: Any, pattern: re.Pattern[str], limit: int) -> str:
    if not isinstance(value, str):
        raise EntryRejected("bad-schema", f"entry field {name!r} must be a string")
    if len(value) > limit or not pattern.match(value):
        raise EntryRejected(
            "bad-schema", f"entry field {name!r} is malformed: {value[:80]!r}"
        )
    return value


def _check_number(name: str, value: Any, *, limit: float = 1e12) -> float:
    if type(value) not in (int, float):
        raise EntryRejected("bad-schema", f"entry field {name!r} must be a number")
    number = float(value)
    if not math.isfinite(number) or not 0 <= number <= limit:
        raise EntryRejected("out-of-bounds", f"entry field {name!r}={value} is absurd")
    return number


@dataclass(frozen=True)
class KernelEntry:
    """One slot's winner, with where and how it was found."""

    kernel: str
    source_hash: str
    candidates_hash: str
    fingerprint: HardwareFingerprint
    tuning_key: str
    config: dict[str, int]
    winner_ms: float = 0.0
    default_ms: float = 0.0
    tuned_by: str = ""
    tuned_at_s: float = 0.0
    tune_seconds: float = 0.0
    candidates_tried: int = 0
    agreeing_hosts: int = 0
    pinned: bool = False
    # Not part of the wire record: filled by whoever holds the entry.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def slot_key(self) -> str:
        return slot_key(
            self.fingerprint.key,
            self.kernel,
            self.source_hash,
            self.tuning_key,
            self.candidates_hash,
        )

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def check(self) -> None:
        """Raises EntryRejected unless every field has the right shape."""
        _check_text("kernel", self.kernel, _KERNEL, MAX_KERNEL_NAME_CHARS)
        _check_text("source_hash", self.source_hash, _HEX, 16)
        _check_text("candidates_hash", self.candidates_hash, _HEX, 16)
        _check_text("tuning_key", self.tuning_key, _TUNING_KEY, MAX_TUNING_KEY_CHARS)
        if len(self.tuned_by) > 256:
            raise EntryRejected("bad-schema", "entry field 'tuned_by' is too long")
        for name in ("winner_ms", "default_ms", "tune_seconds"):
            _check_number(name, getattr(self, name), limit=1e7)
        _check_number("tuned_at_s", self.tuned_at_s)
        if not 0 <= self.candidates_tried <= 10_000:
            raise EntryRejected("out-of-bounds", "candidates_tried is absurd")
        check_config(self.config)

    def with_agreement(self, hosts: int, *, pinned: bool) -> KernelEntry:
        return replace(self, agreeing_hosts=hosts, pinned=pinned)

    # ---------------------------------------------------------------- codecs

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        data["fingerprint"] = self.fingerprint.to_dict()
        data["config"] = dict(self.config)
        data["slot_key"] = self.slot_key
        return data

    @classmethod
    def from_dict(cls, data: Any) -> KernelEntry:
        """Reads and checks an entry; any problem raises EntryRejected."""
        if not isinstance(data, dict):
            raise EntryRejected("bad-schema", "an entry must be a JSON object")
        try:
            fingerprint = HardwareFingerprint.from_dict(data.get("fingerprint"))
        except FingerprintError as exc:
            raise EntryRejected("bad-schema", str(exc)) from None
        config = data.get("config")
        check_config(config)
        values: dict[str, Any] = {}
        for name, kind, default in (
            ("kernel", str, None),
            ("source_hash", str, None),
            ("candidates_hash", str, None),
            ("tuning_key", str, None),
            ("winner_ms", float, 0.0),
            ("default_ms", float, 0.0),
            ("tuned_by", str, ""),
            ("tuned_at_s", float, 0.0),
            ("tune_seconds", float, 0.0),
            ("candidates_tried", int, 0),
            ("agreeing_hosts", int, 0),
            ("pinned", bool, False),
        ):
            value = data.get(name, default)
            if value is None:
                raise EntryRejected("bad-schema", f"entry field {name!r} is missing")
            if kind is float and type(value) is int:
                value = float(value)
            if type(value) is not kind:
                raise EntryRejected(
                    "bad-schema", f"entry field {name!r} must be {kind.__name__}"
                )
            values[name] = value
        entry = cls(fingerprint=fingerprint, config=dict(config), **values)
        entry.check()
        claimed = data.get("slot_key")
        if claimed is not None and claimed != entry.slot_key:
            raise EntryRejected(
                "bad-schema",
                f"slot_key {claimed!r} does not match the entry's fields "
                f"(they give {entry.slot_key!r})",
            )
        return entry

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> KernelEntry:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EntryRejected("bad-schema", f"not JSON: {exc}") from None
        return cls.from_dict(data)

    def to_proto(self) -> pb.KernelEntry:
        return pb.KernelEntry(
            slot_key=self.slot_key,
            kernel=self.kernel,
            source_hash=self.source_hash,
            candidates_hash=self.candidates_hash,
            fingerprint=self.fingerprint.to_proto(),
            tuning_key=self.tuning_key,
            config=self.config,
            winner_ms=self.winner_ms,
            default_ms=self.default_ms,
            tuned_by=self.tuned_by,
            tuned_at_s=self.tuned_at_s,
            tune_seconds=self.tune_seconds,
            candidates_tried=self.candidates_tried,
            agreeing_hosts=self.agreeing_hosts,
            pinned=self.pinned,
        )

    @classmethod
    def from_proto(cls, message: pb.KernelEntry) -> KernelEntry:
        """Reads an entry off the wire; any problem raises EntryRejected."""
        try:
            fingerprint = HardwareFingerprint.from_proto(message.fingerprint)
        except FingerprintError as exc:
            raise EntryRejected("bad-schema", str(exc)) from None
        config = dict(message.config)
        check_config(config)
        entry = cls(
            kernel=message.kernel,
            source_hash=message.source_hash,
            candidates_hash=message.candidates_hash,
            fingerprint=fingerprint,
            tuning_key=message.tuning_key,
            config=config,
            winner_ms=message.winner_ms,
            default_ms=message.default_ms,
            tuned_by=message.tuned_by,
            tuned_at_s=message.tuned_at_s,
            tune_seconds=message.tune_seconds,
            candidates_tried=message.candidates_tried,
            agreeing_hosts=message.agreeing_hosts,
            pinned=message.pinned,
        )
        entry.check()
        if message.slot_key and message.slot_key != entry.slot_key:
            raise EntryRejected(
                "bad-schema",
                f"slot_key {message.slot_key!r} does not match the entry's fields",
            )
        return entry
