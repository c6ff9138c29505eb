"""What every world shares: the `Host` backed by the WIT imports, and conversions between
componentize-py's records (dataclasses of `wit_world.imports.garage_policy_types_*`) and the
library's (`garage_policy.types`), which have the same names and fields."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from enum import Enum

from componentize_py_types import Err, Ok
from wit_world.imports import clock, config, kv, log

from .. import types
from ..host import PolicyError
from ..types import LogLevel


class WitHost:
    """The `Host` of a component: each method is a WIT import."""

    def __init__(self, candidates=None, market=None):
        self._candidates = candidates
        self._market = market

    def kv_get(self, key):
        return kv.get(key)

    def kv_set(self, key, value, ttl_ms=None):
        kv.set(key, bytes(value), ttl_ms)

    def kv_delete(self, key):
        kv.delete(key)

    def kv_incr(self, key, delta, ttl_ms=None):
        return kv.incr(key, delta, ttl_ms)

    def kv_reserve(self, key, amount, limit, ttl_ms=None):
        return kv.reserve(key, amount, limit, ttl_ms)

    def now_ms(self):
        return clock.now_ms()

    def log(self, level, message):
        log.log(log.Level[LogLevel(level).name], str(message))

    def config(self):
        return config.get()

    def candidate(self, index):
        if self._candidates is None or not 0 <= index < 2**32:
            return None
        return lift(self._candidates.describe(index))

    def market(self, model):
        return None if self._market is None else lift(self._market.get(model))


def lift(value):
    """A componentize-py value as the library's: records and enums by their names."""
    if isinstance(value, Enum):
        return getattr(types, type(value).__name__)[value.name]
    if is_dataclass(value):
        cls = getattr(types, type(value).__name__)
        return cls(**{f.name: lift(getattr(value, f.name)) for f in fields(cls)})
    if isinstance(value, list):
        return [lift(item) for item in value]
    if isinstance(value, tuple):
        return tuple(lift(item) for item in value)
    return value


def each(function, host, items, lower):
    """`function(host, item)` for each item, lowered, as one result per item: a `PolicyError`
    is that item's `err`, any other exception traps (the call's items are retried)."""
    results = []
    for item in items:
        try:
            results.append(Ok(lower(function(host, lift(item)))))
        except PolicyError as err:
            results.append(Err(str(err)))
    return results


def call(function, *args):
    """`function(*args)`, a `PolicyError` as the `err` of the export's result."""
    try:
        return function(*args)
    except PolicyError as err:
        raise Err(str(err)) from None


def required(slot, export):
    """The function registered for `export`, or an error that says how to register it."""
    function = slot.function(export)
    if function is None:
        decorator = f"@{slot.name}" if export == slot.main else f"@{slot.name}.{export}"
        raise RuntimeError(f"no {slot.name} {export} registered: decorate a function with {decorator}")
    return function
