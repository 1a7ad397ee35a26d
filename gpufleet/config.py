"""Loading of the agent's and the broker's configuration files.

A configuration is a tree of dataclasses. ``load_config`` fills one from a
YAML mapping, then from ``GPUFLEET_<SECTION>_<FIELD>`` environment variables,
then from explicit overrides (the CLI flags), and reports every problem at
once, each naming its field, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

from gpufleet.errors import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def load_config(
    cls: type[T],
    *,
    path: Path | None = None,
    env_prefix: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    problems: list[str] | None = None,
) -> T:
    """Builds ``cls`` from a YAML file, the environment and overrides.

    Args:
        cls: the dataclass to fill.
        path: a YAML file; missing keys keep their defaults.
        env_prefix: e.g. ``GPUFLEET_AGENT_``; ``GPUFLEET_AGENT_INTERVAL_S=2``
            sets ``interval_s`` and ``GPUFLEET_AGENT_TLS__CA=...`` sets
            ``tls.ca``.
        overrides: dotted keys (``"replay.speedup"``) from the CLI; a value
            of None leaves the field alone.
        environ: the environment to read (tests pass their own).
        problems: when given, problems are appended here instead of raised,
            so that the caller can add its own checks to one report.

    Raises:
        ConfigError: listing every invalid or unknown field.
    """
    source = str(path) if path else cls.__name__
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(source, [f"cannot read the file: {exc}"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(source, ["the file must hold a mapping of fields"])
        raw = loaded
    if env_prefix:
        env = os.environ if environ is None else environ
        for key, value in env.items():
            # <PREFIX>CONFIG names the file itself, not a field.
            if key.startswith(env_prefix) and key != f"{env_prefix}CONFIG":
                dotted = key[len(env_prefix) :].lower().replace("__", ".")
                _set_dotted(raw, dotted, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, key, value)
    found: list[str] = []
    result = _build(cls, raw, "", found)
    if problems is not None:
        problems.extend(found)
    elif found:
        raise ConfigError(source, found)
    return result


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def _build(cls: type[T], raw: Any, where: str, problems: list[str]) -> T:
    if not isinstance(raw, Mapping):
        # ``where`` ends with the dot that joins it to a field's name.
        place = where.removesuffix(".") or "top level"
        got = "nothing" if raw is None else repr(raw)
        problems.append(f"{place}: must be a mapping, got {got}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key)
        field_path = f"{where}{name}"
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else ""
            problems.append(f"{field_path}: unknown field{hint}")
            continue
        before = len(problems)
        converted = _convert(hints[name], value, field_path, problems)
        # A field that failed keeps its default, so that later checks of the
        # whole configuration see well-typed values.
        if len(problems) == before:
            kwargs[name] = converted
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{where or 'top level'}: {exc}")
        return cls()


def _convert(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        empty = value is None or (isinstance(value, str) and value == "")
        if empty and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where, problems)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{where}.", problems)  # type: ignore[arg-type]
    if origin is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{where}: must be a mapping, got {value!r}")
            return {}
        out = {}
        for k, v in value.items():
            if v is None or isinstance(v, dict | list):
                got = "nothing" if v is None else repr(v)
                problems.append(f"{where}.{k}: must be a text value, got {got}")
                continue
            out[str(k)] = str(v)
        return out
    if origin in (list, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            problems.append(f"{where}: must be a list, got {value!r}")
            return []
        conv = [
            _convert(args[0], v, f"{where}[{i}]", problems) for i, v in enumerate(items)
        ]
        return tuple(conv) if origin is tuple else conv
    return _scalar(tp, value, where, problems)


def _scalar(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                # int(5.7) would be 5 without a word.
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is Path:
            return Path(str(value)).expanduser()
        if tp is str:
            if isinstance(value, dict | list):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        name = getattr(tp, "__name__", str(tp))
        problems.append(f"{where}: must be {_article(name)}, got {value!r}")
        return None
    return value


def _article(name: str) -> str:
    words = {"int": "an integer", "float": "a number", "bool": "true or false"}
    return words.get(name, f"a {name}")


class Validated(Protocol):
    """A configuration that checks itself after loading."""

    def validate(self, source: str, problems: list[str] | None = None) -> None: ...


V = TypeVar("V", bound=Validated)


def load_validated(
    cls: type[V],
    path: Path | None,
    *,
    env_prefix: str,
    overrides: Mapping[str, Any] | None,
    what: str,
) -> V:
    """Loads ``cls`` like ``load_config``, then validates it, reporting the
    loading problems and the validation problems in one ConfigError."""
    problems: list[str] = []
    cfg = load_config(
        cls, path=path, env_prefix=env_prefix, overrides=overrides, problems=problems
    )
    cfg.validate(str(path) if path else what, problems)
    return cfg


def require(problems: list[str], ok: bool, message: str) -> None:
    """Adds ``message`` to ``problems`` unless ``ok``."""
    if not ok:
        problems.append(message)


def range_problem(
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> str | None:
    """``NAME: must be ... in [LOW, HIGH], got VALUE``, or None when it is.

    NaN and infinities are refused: every comparison with NaN is false, so a
    check like ``value < 0`` alone would let ``.nan`` through.

    Args:
        low_open, high_open: True when the bound itself is not allowed.
    """
    finite = isinstance(value, int) or math.isfinite(value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if finite and above and below:
        return None
    kind = "a whole number" if isinstance(value, int) else "a finite number"
    return (
        f"{name}: must be {kind} in {'(' if low_open else '['}{_show(low)}, "
        f"{_show(high)}{')' if high_open else ']'}, got {value}"
    )


def _show(number: float) -> str:
    """86400 rather than 86400.0 or 8.64e+04."""
    return str(int(number)) if float(number).is_integer() else str(number)
