"""Typed settings: how one YAML key is declared (``Field``), converted and checked.

config.py declares the federation's keys with it; every defense and attack declares its own in its
file, and the registries hand them to config.py.
"""

import copy
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Optional


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line naming the key."""


def positive(v):
    return v > 0


def non_negative(v):
    return v >= 0


def unit_interval(v):
    return 0 <= v <= 1


@dataclass
class Field:
    kind: str  # int, float, bool, str, int_list, str_list, pixel_list, shape, dict
    default: Any = None
    check: Optional[Callable[[Any], bool]] = None
    rule: str = ""
    choices: Optional[list] = None
    required: bool = False
    optional: bool = False  # None allowed: derived from other keys when absent

    def default_value(self):
        """The default, copied so that no two configurations share a list or a mapping."""
        return copy.copy(self.default)


def coerce(key, value, f):
    """Return ``value`` converted to the field's kind, or raise a ConfigError naming ``key``."""
    kind = f.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if kind == "float":
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if kind in ("int_list", "shape"):
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if kind == "shape" and (len(value) != 3 or min(value) < 1):
                raise ConfigError(f"{key}: expected [channels, height, width], got {value!r}")
            return list(value)
        raise ConfigError(f"{key}: expected a list of integers, got {value!r}")
    if kind == "str_list":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    if kind == "pixel_list":
        ok = isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(c, int) for c in p) for p in value
        )
        if ok and value:
            return [list(p) for p in value]
        raise ConfigError(f"{key}: expected a non-empty list of [row, col] pairs, got {value!r}")
    if kind == "dict":
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise AssertionError(kind)


def check_value(key, value, f):
    """``value`` converted and checked against field ``f``; a ConfigError names ``key``."""
    if value is None and f.optional:
        return None
    value = coerce(key, value, f)
    if f.choices is not None and value not in f.choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, f.choices))}")
    if f.check is not None and not f.check(value):
        raise ConfigError(f"{key}: must be {f.rule}, got {value!r}")
    return value


def unknown_key(key, valid, shown=None):
    """The error for a key that is not declared, with the closest declared one as a hint."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{shown(close[0]) if shown else close[0]}'?" if close else ""
    return ConfigError(f"unknown key '{shown(key) if shown else key}'{hint}")


def merge_declarations(owner, declared, into):
    """Add the settings ``declared`` by ``owner`` to ``into``. Two owners may share a key (Krum
    and Bulyan share `robust_f`) only by declaring the same Field object."""
    for key, f in declared.items():
        if key in into and into[key] is not f:
            raise ValueError(f"{owner} declares setting '{key}', which something else declares differently")
        into[key] = f
    return into


def resolve_group(name, fields, group):
    """Validate the YAML group ``name`` (a mapping) against ``fields``; missing keys take their
    defaults. Returns the resolved group and the names of the keys that took defaults."""
    out = {}
    for key, value in (group or {}).items():
        if key not in fields:
            raise unknown_key(key, list(fields), shown=lambda k: f"{name}.{k}")
        out[key] = check_value(f"{name}.{key}", value, fields[key])
    missing = [k for k in fields if k not in out]
    for key in missing:
        out[key] = fields[key].default_value()
    return out, missing
