"""What the gateway offers a policy (the WIT imports), and reading the policy's configuration."""

from __future__ import annotations

import json
import math
from types import MappingProxyType, SimpleNamespace
from typing import Any, Mapping, Protocol

from .types import CandidateInfo, LogLevel, Market


class PolicyError(Exception):
    """The `err` of a slot's result: an answer, not a crash. The router falls back to round
    robin for the request, the meter and reward leave the event queued to retry. Any other
    exception traps, which the gateway counts as a fault of the plugin."""


class Host(Protocol):
    """The gateway as a policy sees it (WIT interfaces `kv`, `clock`, `log`, `config`, and
    `candidates` for a router, `market` for a meter). Inside a component it is backed by the
    imports; in tests it is a `garage_policy.testing.MemoryHost`.

    Key-value state is namespaced per plugin and shared by every gateway replica. Counters
    written by `kv_incr` and `kv_reserve` read back through `kv_get` as decimal ASCII."""

    def kv_get(self, key: str) -> bytes | None:
        """The value of `key`, if set and not expired."""

    def kv_set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        """Sets `key`; with `ttl_ms` it expires by itself, without it never."""

    def kv_delete(self, key: str) -> None:
        """Deletes `key`."""

    def kv_incr(self, key: str, delta: int, ttl_ms: int | None = None) -> int:
        """Atomically adds `delta` to the integer at `key` (missing counts as 0); the new
        value. The TTL applies only when the key is created: a window does not slide."""

    def kv_reserve(self, key: str, amount: int, limit: int, ttl_ms: int | None = None) -> int | None:
        """Adds `amount` to the counter at `key` only if the result stays at or below `limit`:
        the new value when it did, `None` when it would have exceeded the limit."""

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch (`time.time()` traps in a component)."""

    def log(self, level: LogLevel, message: str) -> None:
        """Writes `message` into the gateway's log, tagged with the plugin."""

    def config(self) -> str:
        """The plugin's configuration as JSON text (`{}` when none was given);
        `load_config` reads it with defaults."""

    def candidate(self, index: int) -> CandidateInfo | None:
        """Who `candidates[index]` of the `route` call in progress is; `None` out of range and
        outside a router."""

    def market(self, model: str) -> Market | None:
        """Supply and demand for `model`, during a meter's `quote` of it; `None` otherwise."""


def _invalid(message: str) -> PolicyError:
    return PolicyError(f"invalid plugin config: {message}")


def _check(name: str, value: Any, default: Any) -> Any:
    """`value` if it has the type of `default` (numbers finite and not negative)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _invalid(f"{name} must be true or false")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _invalid(f"{name} must be a number")
        if not math.isfinite(value) or value < 0:
            raise _invalid(f"{name} must be a number >= 0")
        if isinstance(default, float):
            return float(value)
        if not float(value).is_integer():
            raise _invalid(f"{name} must be a whole number")
        return int(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise _invalid(f"{name} must be a string")
        return value
    if isinstance(default, Mapping):
        if not isinstance(value, dict):
            raise _invalid(f"{name} must be an object")
        # A table: its values have the type of the default's values, numbers when it has none.
        like = next(iter(default.values()), 0.0)
        return MappingProxyType({k: _check(f"{name}[{k!r}]", v, like) for k, v in value.items()})
    if isinstance(default, (list, tuple)):
        if not isinstance(value, list):
            raise _invalid(f"{name} must be a list")
        like = default[0] if default else ""
        return tuple(_check(f"{name}[{i}]", v, like) for i, v in enumerate(value))
    if default is None:
        return value
    raise TypeError(f"load_config: no rule for the default of {name} ({type(default).__name__})")


def load_config(host: Host, defaults: Mapping[str, Any]) -> SimpleNamespace:
    """The plugin's configuration (`host.config()`), every field of `defaults` filled in, as an
    object with one attribute per field (`cfg.model_weights`).

    Every field is optional and takes the type of its default: a bool, a number (finite and
    not negative: rates, weights, limits; an int default keeps ints, a float default makes
    floats), a string, a table (a dict default: a JSON object whose values have the type of
    the default's values, numbers when the default is empty), a list (of the type of the
    default's first item, strings when it is empty) or anything (a `None` default). An unknown
    field, JSON that does not parse or a value of the wrong type raises `PolicyError`
    (`invalid plugin config: ...`), so that a misspelled setting is an error, not ignored."""
    text = host.config()
    try:
        raw = json.loads(text) if text.strip() else {}
    except ValueError as err:
        raise _invalid(str(err)) from None
    if not isinstance(raw, dict):
        raise _invalid("not a JSON object")
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        expected = ", ".join(f"`{name}`" for name in defaults)
        raise _invalid(f"unknown field `{unknown[0]}`, expected one of {expected}")
    return SimpleNamespace(
        **{
            name: _check(name, raw[name], default) if name in raw else _frozen(default)
            for name, default in defaults.items()
        }
    )


def _frozen(default: Any) -> Any:
    if isinstance(default, Mapping):
        return MappingProxyType(dict(default))
    if isinstance(default, list):
        return tuple(default)
    return default
