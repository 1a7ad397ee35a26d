"""The idle-reaper policy: its YAML format, its validation and its defaults.

The broker loads a policy with :func:`load_policy` before using any of it; a
bad file is refused whole, with every problem named by its field path. The
reference for users is ``docs/policy.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from gpufleet.errors import ConfigError
from gpufleet.proto import pb

ACTIONS = ("notify", "kill-processes", "stop-instance", "terminate-instance")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# Debounce counts are kept per GPU in a bounded buffer of this size.
MAX_DEBOUNCE_OBSERVATIONS = 100
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
# The fleet name is an MQTT topic level: no wildcards, no separators.
_FLEET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class HostFacts:
    """What the policy may match a host on; the broker builds it from the Hello."""

    host_id: str
    provider: str = ""
    region: str = ""
    zone: str = ""
    instance_type: str = ""
    spot: bool = False
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_hello(cls, hello: pb.Hello) -> HostFacts:
        """Build the facts from an agent's Hello (identity and labels)."""
        h = hello.host
        return cls(
            host_id=h.host_id,
            provider=h.provider,
            region=h.region,
            zone=h.zone,
            instance_type=h.instance_type,
            spot=h.spot,
            labels=dict(hello.labels),
        )


@dataclass(frozen=True)
class IdleRule:
    """When one GPU sample counts as idle, and how long a hole breaks a run."""

    max_activity_ratio: float = 0.05
    max_mem_util_ratio: float = 0.10
    max_processes: int | None = None
    max_sample_gap_s: float = 300.0

    @property
    def needs_processes(self) -> bool:
        """Whether the rule can only be judged from a reliable process list."""
        return self.max_processes is not None


@dataclass(frozen=True)
class TimeWindow:
    """A weekly window, e.g. office hours, in a named time zone."""

    days: tuple[str, ...]
    start: str
    end: str
    tz: str = "UTC"


@dataclass(frozen=True)
class Exemptions:
    """Hosts and GPUs that are never acted on; each reports its own reason."""

    process_names: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    windows: tuple[TimeWindow, ...] = ()


@dataclass(frozen=True)
class HostMatch:
    """Conditions a host must all meet to belong to a group; globs allowed."""

    provider: str | None = None
    regions: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()
    instance_types: tuple[str, ...] = ()
    spot: bool | None = None
    labels: dict[str, str] = field(default_factory=dict)
    hosts: tuple[str, ...] = ()

    def matches(self, host: HostFacts) -> bool:
        """Return whether every given condition holds for ``host``."""
        if self.provider is not None and not fnmatch.fnmatchcase(
            host.provider, self.provider
        ):
            return False
        if self.spot is not None and host.spot != self.spot:
            return False
        pairs = (
            (self.regions, host.region),
            (self.zones, host.zone),
            (self.instance_types, host.instance_type),
            (self.hosts, host.host_id),
        )
        for patterns, value in pairs:
            if patterns and not any(fnmatch.fnmatchcase(value, p) for p in patterns):
                return False
        return all(
            key in host.labels and fnmatch.fnmatchcase(host.labels[key], pattern)
            for key, pattern in self.labels.items()
        )


@dataclass(frozen=True)
class GroupPolicy:
    """How the reaper treats the hosts of one group."""

    name: str = "default"
    match: HostMatch = field(default_factory=HostMatch)
    idle: IdleRule = field(default_factory=IdleRule)
    grace_window_s: float = 1800.0
    warn_before_s: float = 300.0
    debounce_observations: int = 3
    action: str = "notify"
    kill_timeout_s: float = 30.0
    dry_run: bool = False
    exempt: Exemptions = field(default_factory=Exemptions)

    @property
    def needs_processes(self) -> bool:
        """Whether a decision for this group needs reliable process lists."""
        return (
            self.idle.needs_processes
            or bool(self.exempt.process_names)
            or self.action == "kill-processes"
        )


@dataclass(frozen=True)
class FleetPolicy:
    """A whole validated policy: groups in order, a default, staleness limit."""

    fleet: str = "default"
    groups: tuple[GroupPolicy, ...] = ()
    default: GroupPolicy = field(default_factory=GroupPolicy)
    stale_after_s: float = 30.0
    max_sample_gap_s: float = 300.0

    def group_for(self, host: HostFacts) -> GroupPolicy:
        """Return the first group that matches ``host``, else the default."""
        for group in self.groups:
            if group.match.matches(host):
                return group
        return self.default

    def to_yaml(self) -> str:
        """Render the policy, every default written out, as loadable YAML."""
        return yaml.safe_dump(_policy_to_dict(self), sort_keys=False)


DEFAULT_POLICY_YAML = """\
# Built-in policy: report idle GPUs, never act on them.
fleet: default
default:
  action: notify
"""


def default_policy() -> FleetPolicy:
    """Return the built-in policy: notify only, so nothing destructive happens."""
    return load_policy(DEFAULT_POLICY_YAML, source="built-in policy")


def load_policy(text: str, source: str = "policy") -> FleetPolicy:
    """Parse and validate a policy document.

    Args:
        text: The YAML document.
        source: What to call the document in errors, e.g. its file name.

    Returns:
        The validated policy, with every omitted field filled in.

    Raises:
        ConfigError: The document is not valid; ``problems`` lists every
            problem found, each naming its field path.
    """
    problems: list[str] = []
    doc = _parse_yaml(text, problems)
    if problems:
        raise ConfigError(source, problems, hint=_HINT)
    try:
        policy = _Reader(problems).fleet(doc)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        # Odd YAML (a list as a key, a 400-digit number, deep nesting) must
        # give an answer, not a crash of the broker's admin call.
        problems.append(f"document: cannot be read: {type(exc).__name__}: {exc}"[:300])
    if problems:
        raise ConfigError(source, problems, hint=_HINT)
    return policy


_HINT = "fix the fields named above; docs/policy.md describes each one"


def _keys_of(cls: type) -> tuple[str, ...]:
    """The YAML keys of a policy section: its dataclass's fields, in order."""
    return tuple(f.name for f in dataclasses.fields(cls))


# Key order matters only for messages: it is the order the docs use.
_FLEET_KEYS = ("fleet", "groups", "default", "stale_after_s", "max_sample_gap_s")
_GROUP_KEYS = _keys_of(GroupPolicy)
_DEFAULT_KEYS = tuple(k for k in _GROUP_KEYS if k not in ("name", "match"))
_MATCH_KEYS = _keys_of(HostMatch)
# The sample gap is a fact of the telemetry, set once for the fleet.
_IDLE_KEYS = tuple(k for k in _keys_of(IdleRule) if k != "max_sample_gap_s")
_EXEMPT_KEYS = _keys_of(Exemptions)
_WINDOW_KEYS = _keys_of(TimeWindow)
_MISSING = object()


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping, and a
    document with so many aliases that expanding it could exhaust memory
    (the "billion laughs" document is a few hundred bytes)."""

    MAX_ALIASES = 20

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):  # type: ignore[no-untyped-call]
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > self.MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"more than {self.MAX_ALIASES} aliases; a policy needs none",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
        return super().compose_node(parent, index)  # type: ignore[no-untyped-call]


def _construct_unique_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_unique_mapping,  # type: ignore[arg-type]
)


def _parse_yaml(text: str, problems: list[str]) -> Any:
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)
    except (TypeError, ValueError, RecursionError) as exc:
        problems.append(f"yaml: cannot be read: {type(exc).__name__}"[:300])
        return None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        detail = getattr(exc, "problem", None) or str(exc)
        problems.append(f"yaml: {where}{detail}")
        return None
    if doc is None:
        problems.append("document is empty: expected a mapping with fleet and default")
    elif not isinstance(doc, dict):
        problems.append(f"document: must be a mapping, got {_describe(doc)}")
    return doc


class _Reader:
    """Turns a parsed document into a policy, collecting every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def fleet(self, doc: dict[str, Any]) -> FleetPolicy:
        self._keys(doc, "", _FLEET_KEYS)
        base = FleetPolicy()
        name = self._string(doc, "fleet", "", base.fleet)
        if not _FLEET_NAME.match(name):
            self._bad(
                "fleet", "must be 1-64 of A-Z a-z 0-9 _ . - (an MQTT topic)", name
            )
            name = base.fleet
        stale_after_s = self._number(doc, "stale_after_s", "", base.stale_after_s)
        gap_s = self._number(doc, "max_sample_gap_s", "", base.max_sample_gap_s)
        # Every group inherits from the default section, which inherits the
        # fleet's sample gap: so each group's idle rule carries it.
        builtin = GroupPolicy(idle=IdleRule(max_sample_gap_s=gap_s))
        default = self._group(doc.get("default", {}), "default", builtin, named=False)
        groups: list[GroupPolicy] = []
        raw_groups = doc.get("groups", [])
        if raw_groups is None:
            raw_groups = []
        if not isinstance(raw_groups, list):
            self._bad("groups", "must be a list of groups", raw_groups)
            raw_groups = []
        names: set[str] = set()
        for i, raw in enumerate(raw_groups):
            path = f"groups[{i}]"
            group = self._group(raw, path, default, named=True)
            if group.name in names:
                self.problems.append(
                    f"{path}.name: duplicate group name {group.name!r}"
                )
            names.add(group.name)
            groups.append(group)
        return FleetPolicy(name, tuple(groups), default, stale_after_s, gap_s)

    def _group(
        self, raw: Any, path: str, base: GroupPolicy, *, named: bool
    ) -> GroupPolicy:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self._bad(path, "must be a mapping", raw)
            return base
        self._keys(raw, path, _GROUP_KEYS if named else _DEFAULT_KEYS)
        name = base.name
        if named:
            name = self._string(raw, "name", path, _MISSING)
        grace_s = self._number(raw, "grace_window_s", path, base.grace_window_s)
        warn_s = self._number(
            raw, "warn_before_s", path, base.warn_before_s, allow_zero=True
        )
        if warn_s > grace_s:
            inherited = "" if "warn_before_s" in raw else " (inherited)"
            self.problems.append(
                f"{path}.warn_before_s: must be <= grace_window_s ({grace_s:g}), "
                f"got {warn_s:g}{inherited}"
            )
            warn_s = grace_s
        action = raw.get("action", base.action)
        if action not in ACTIONS:
            self._bad(f"{path}.action", f"must be one of {', '.join(ACTIONS)}", action)
            action = base.action
        return GroupPolicy(
            name=name,
            match=self._match(raw.get("match"), f"{path}.match")
            if named
            else base.match,
            idle=self._idle(raw.get("idle"), f"{path}.idle", base.idle),
            grace_window_s=grace_s,
            warn_before_s=warn_s,
            debounce_observations=self._int(
                raw, "debounce_observations", path, base.debounce_observations, 1
            ),
            action=action,
            kill_timeout_s=self._number(
                raw, "kill_timeout_s", path, base.kill_timeout_s
            ),
            dry_run=self._bool(raw, "dry_run", path, base.dry_run),
            exempt=self._exempt(raw.get("exempt"), f"{path}.exempt", base.exempt),
        )

    def _match(self, raw: Any, path: str) -> HostMatch:
        raw = self._mapping(raw, path, _MATCH_KEYS)
        provider = raw.get("provider")
        if provider is not None and not isinstance(provider, str):
            self._bad(f"{path}.provider", "must be a string", provider)
            provider = None
        spot = raw.get("spot")
        if spot is not None and not isinstance(spot, bool):
            self._bad(f"{path}.spot", "must be true or false", spot)
            spot = None
        return HostMatch(
            provider=provider,
            regions=self._strings(raw, "regions", path),
            zones=self._strings(raw, "zones", path),
            instance_types=self._strings(raw, "instance_types", path),
            spot=spot,
            labels=self._labels(raw, path),
            hosts=self._strings(raw, "hosts", path),
        )

    def _idle(self, raw: Any, path: str, base: IdleRule) -> IdleRule:
        raw = self._mapping(raw, path, _IDLE_KEYS)
        max_processes: int | None = base.max_processes
        if "max_processes" in raw:
            value = raw["max_processes"]
            if value is None:
                max_processes = None
            else:
                max_processes = self._int(raw, "max_processes", path, 0, 0)
        return IdleRule(
            max_activity_ratio=self._ratio(raw, "max_activity_ratio", path, base),
            max_mem_util_ratio=self._ratio(raw, "max_mem_util_ratio", path, base),
            max_processes=max_processes,
            max_sample_gap_s=base.max_sample_gap_s,
        )

    def _exempt(self, raw: Any, path: str, base: Exemptions) -> Exemptions:
        if raw is None:
            return base
        raw = self._mapping(raw, path, _EXEMPT_KEYS)
        windows: list[TimeWindow] = []
        raw_windows = raw.get("windows", [])
        if not isinstance(raw_windows, list):
            self._bad(f"{path}.windows", "must be a list of windows", raw_windows)
            raw_windows = []
        for i, item in enumerate(raw_windows):
            window = self._window(item, f"{path}.windows[{i}]")
            if window is not None:
                windows.append(window)
        # Each field given replaces the inherited one; an omitted one inherits.
        return Exemptions(
            process_names=self._strings(raw, "process_names", path)
            if "process_names" in raw
            else base.process_names,
            hosts=self._strings(raw, "hosts", path) if "hosts" in raw else base.hosts,
            labels=self._labels(raw, path) if "labels" in raw else base.labels,
            windows=tuple(windows) if "windows" in raw else base.windows,
        )

    def _window(self, raw: Any, path: str) -> TimeWindow | None:
        if not isinstance(raw, dict):
            self._bad(path, "must be a mapping with days, start, end, tz", raw)
            return None
        self._keys(raw, path, _WINDOW_KEYS)
        days = self._strings(raw, "days", path) or DAYS
        for day in days:
            if day not in DAYS:
                self._bad(
                    f"{path}.days", f"each day must be one of {', '.join(DAYS)}", day
                )
        bounds: list[str] = []
        for key in ("start", "end"):
            value = raw.get(key, _MISSING)
            if not isinstance(value, str) or parse_hhmm(value) is None:
                self._bad(f"{path}.{key}", 'must be "HH:MM" (quoted)', value)
                value = "00:00"
            bounds.append(value)
        tz = raw.get("tz", "UTC")
        if not isinstance(tz, str) or not check_time_zone(tz):
            self._bad(f"{path}.tz", "must be an IANA time zone such as UTC", tz)
            tz = "UTC"
        return TimeWindow(tuple(days), bounds[0], bounds[1], tz)

    # Leaf readers: each reports a problem and returns a usable fallback.

    def _keys(self, raw: dict[Any, Any], path: str, allowed: tuple[str, ...]) -> None:
        for key in raw:
            if key not in allowed:
                self.problems.append(_unknown_key_problem(path, key, allowed))

    def _mapping(self, raw: Any, path: str, allowed: tuple[str, ...]) -> dict[Any, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self._bad(path, "must be a mapping", raw)
            return {}
        self._keys(raw, path, allowed)
        return raw

    def _bad(self, path: str, rule: str, value: Any) -> None:
        self.problems.append(f"{path}: {rule}, got {_describe(value)}")

    def _number(
        self,
        raw: dict[str, Any],
        key: str,
        path: str,
        default: float,
        *,
        allow_zero: bool = False,
    ) -> float:
        value = raw.get(key, default)
        if _is_number(value) and (value > 0 or (allow_zero and value == 0)):
            return float(value)
        rule = "must be a number >= 0" if allow_zero else "must be a number > 0"
        self._bad(_join(path, key), rule, value)
        return default

    def _ratio(self, raw: dict[str, Any], key: str, path: str, base: IdleRule) -> float:
        default: float = getattr(base, key)
        value = raw.get(key, default)
        if _is_number(value) and 0.0 <= value <= 1.0:
            return float(value)
        self._bad(_join(path, key), "must be a ratio between 0 and 1", value)
        return default

    def _int(
        self, raw: dict[str, Any], key: str, path: str, default: int, low: int
    ) -> int:
        value = raw.get(key, default)
        high = MAX_DEBOUNCE_OBSERVATIONS if key == "debounce_observations" else None
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and value >= low and (high is None or value <= high):
            return int(value)
        rule = f"must be a whole number >= {low}"
        if high is not None:
            rule += f" and <= {high}"
        self._bad(_join(path, key), rule, value)
        return default

    def _bool(self, raw: dict[str, Any], key: str, path: str, default: bool) -> bool:
        value = raw.get(key, default)
        if isinstance(value, bool):
            return value
        self._bad(_join(path, key), "must be true or false", value)
        return default

    def _string(self, raw: dict[str, Any], key: str, path: str, default: Any) -> str:
        value = raw.get(key, default)
        if isinstance(value, str) and value.strip():
            return value
        rule = "is required" if value is _MISSING else "must be a non-empty string"
        if value is _MISSING:
            self.problems.append(f"{_join(path, key)}: {rule}")
        else:
            self._bad(_join(path, key), rule, value)
        return "" if default is _MISSING else str(default)

    def _strings(self, raw: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
        value = raw.get(key, [])
        if value is None:
            return ()
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        self._bad(_join(path, key), "must be a list of strings", value)
        return ()

    def _labels(self, raw: dict[str, Any], path: str) -> dict[str, str]:
        value = raw.get("labels", {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            self._bad(f"{path}.labels", "must be a mapping of label to value", value)
            return {}
        labels: dict[str, str] = {}
        for key, item in value.items():
            if isinstance(key, str) and isinstance(item, str):
                labels[key] = item
            else:
                self._bad(
                    f"{path}.labels.{key}",
                    'keys and values must be strings (quote values: "true")',
                    item,
                )
        return labels


def _policy_to_dict(policy: FleetPolicy) -> dict[str, Any]:
    default = _group_to_dict(policy.default)
    del default["name"], default["match"]
    return {
        "fleet": policy.fleet,
        "stale_after_s": policy.stale_after_s,
        "max_sample_gap_s": policy.max_sample_gap_s,
        "groups": [_group_to_dict(g) for g in policy.groups],
        "default": default,
    }


def _group_to_dict(group: GroupPolicy) -> dict[str, Any]:
    m = group.match
    match: dict[str, Any] = {
        "provider": m.provider,
        "regions": list(m.regions),
        "zones": list(m.zones),
        "instance_types": list(m.instance_types),
        "spot": m.spot,
        "labels": dict(m.labels),
        "hosts": list(m.hosts),
    }
    ex = group.exempt
    return {
        "name": group.name,
        "match": {k: v for k, v in match.items() if v not in (None, [], {})},
        "idle": {
            "max_activity_ratio": group.idle.max_activity_ratio,
            "max_mem_util_ratio": group.idle.max_mem_util_ratio,
            "max_processes": group.idle.max_processes,
        },
        "grace_window_s": group.grace_window_s,
        "warn_before_s": group.warn_before_s,
        "debounce_observations": group.debounce_observations,
        "action": group.action,
        "kill_timeout_s": group.kill_timeout_s,
        "dry_run": group.dry_run,
        "exempt": {
            "process_names": list(ex.process_names),
            "hosts": list(ex.hosts),
            "labels": dict(ex.labels),
            "windows": [
                {"days": list(w.days), "start": w.start, "end": w.end, "tz": w.tz}
                for w in ex.windows
            ],
        },
    }


def _is_number(value: Any) -> bool:
    """Return whether ``value`` is a finite int or float (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key_problem(path: str, key: object, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    where = _join(path, str(key))
    if close:
        return f"{where}: unknown field; did you mean {close[0]}?"
    return f"{where}: unknown field; expected one of {', '.join(allowed)}"


def check_time_zone(name: str) -> bool:
    """Return whether ``name`` is a time zone this machine knows."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def parse_hhmm(value: str) -> int | None:
    """Return minutes after midnight for ``HH:MM``, or None if malformed."""
    m = _HHMM.match(value)
    if m is None:
        return None
    return int(m.group(1)) * 60 + int(m.group(2))


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "nothing"
    # reprlib bounds the work too: a value built from aliases can be huge.
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 4, 4
_REPR.maxstring = _REPR.maxother = 60
