"""Native unit testing of policies: `MemoryHost`, a `Host` kept in memory (no WebAssembly)."""

from __future__ import annotations

import json
from typing import Any

from .types import CandidateInfo, LogLevel, Market

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


class MemoryHost:
    """A `Host` for tests: key-value state in memory with TTLs that follow a clock the test
    sets, captured log lines, a configuration, the candidates a router may describe and the
    market a meter may read.

    It follows the gateway's semantics: `kv_incr` and `kv_reserve` set a TTL only when they
    create the key, counters are stored as decimal ASCII and saturate at the ends of a signed
    64-bit integer; using a value that is not an integer as a counter raises `ValueError` (in
    the gateway, the plugin call fails).

    `config` is JSON text, or any other value, which is written as JSON."""

    DEFAULT_NOW_MS = 1_700_000_000_000
    """Where a new host's clock starts: a realistic epoch time rather than 0."""

    def __init__(self, config: Any = "{}", now_ms: int = DEFAULT_NOW_MS):
        self.set_config(config)
        self._now_ms = now_ms
        self._entries: dict[str, tuple[bytes, int | None]] = {}
        self.logs: list[tuple[LogLevel, str]] = []
        self.candidates: list[CandidateInfo] = []
        self.markets: dict[str, Market] = {}

    # --- what a test sets ---------------------------------------------------------------------

    def set_config(self, config: Any) -> None:
        """Replaces the configuration (JSON text, or a value written as JSON)."""
        self._config = config if isinstance(config, str) else json.dumps(config)

    def set_now_ms(self, now_ms: int) -> None:
        self._now_ms = now_ms

    def advance_ms(self, ms: int) -> None:
        """Moves the clock forward (keys whose TTL runs out expire)."""
        self._now_ms += ms

    def set_market(self, market: Market) -> None:
        """The market `market(market.model)` answers, as during a meter's `quote`."""
        self.markets[market.model] = market

    def logged(self, level: LogLevel, fragment: str) -> bool:
        """Whether a line at `level` containing `fragment` was logged."""
        return any(lv == level and fragment in message for lv, message in self.logs)

    def keys(self) -> list[str]:
        """The keys currently set (expired ones left out), sorted."""
        return sorted(k for k in self._entries if self._live(k) is not None)

    def ttl_ms(self, key: str) -> int | None:
        """Milliseconds until `key` expires; `None` when missing or never expiring."""
        entry = self._live(key)
        return None if entry is None or entry[1] is None else entry[1] - self._now_ms

    # --- the Host -----------------------------------------------------------------------------

    def kv_get(self, key: str) -> bytes | None:
        entry = self._live(key)
        return None if entry is None else entry[0]

    def kv_set(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"kv_set takes bytes, not {type(value).__name__}")
        self._entries[key] = (bytes(value), self._expiry(ttl_ms))

    def kv_delete(self, key: str) -> None:
        self._entries.pop(key, None)

    def kv_incr(self, key: str, delta: int, ttl_ms: int | None = None) -> int:
        current = self._counter(key)
        value = _saturate((current or 0) + delta)
        self._store_counter(key, value, current is not None, ttl_ms)
        return value

    def kv_reserve(self, key: str, amount: int, limit: int, ttl_ms: int | None = None) -> int | None:
        current = self._counter(key)
        value = _saturate((current or 0) + amount)
        if value > limit:
            return None
        self._store_counter(key, value, current is not None, ttl_ms)
        return value

    def now_ms(self) -> int:
        return self._now_ms

    def log(self, level: LogLevel, message: str) -> None:
        self.logs.append((LogLevel(level), message))

    def config(self) -> str:
        return self._config

    def candidate(self, index: int) -> CandidateInfo | None:
        return self.candidates[index] if 0 <= index < len(self.candidates) else None

    def market(self, model: str) -> Market | None:
        return self.markets.get(model)

    # --- inside -------------------------------------------------------------------------------

    def _live(self, key: str) -> tuple[bytes, int | None] | None:
        entry = self._entries.get(key)
        if entry is None or (entry[1] is not None and self._now_ms >= entry[1]):
            return None
        return entry

    def _expiry(self, ttl_ms: int | None) -> int | None:
        return None if ttl_ms is None else self._now_ms + ttl_ms

    def _counter(self, key: str) -> int | None:
        entry = self._live(key)
        if entry is None:
            return None
        try:
            return int(entry[0].decode("ascii"))
        except ValueError:
            raise ValueError(f"MemoryHost: key {key!r} holds a value that is not an integer counter") from None

    def _store_counter(self, key: str, value: int, existed: bool, ttl_ms: int | None) -> None:
        expiry = self._entries[key][1] if existed else self._expiry(ttl_ms)
        self._entries[key] = (str(value).encode("ascii"), expiry)


def _saturate(value: int) -> int:
    return max(I64_MIN, min(I64_MAX, value))
