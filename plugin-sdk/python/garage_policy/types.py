"""The records of the `garage:policy` contract as plain dataclasses.

Field for field the WIT records of the newest version each slot is built against (router
`@0.4.0`, rate limiter `@0.3.0`, meter and reward `@0.5.0`; `wit/`), kebab-case names in
snake_case, so the WIT documentation applies unchanged. Every field has a default, so a test
builds the record it needs: `UsageEvent(operator="alice", completion_tokens=2000)`.

Integers are `int` (WIT `u64` included), WIT enums are `StrEnum`s whose values are the WIT
case names (`Trust.VERIFIED == "verified"`), `option<T>` is `T | None`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

U64_MAX = 2**64 - 1
MS_PER_HOUR = 3_600_000


class Trust(StrEnum):
    """How far the gateway trusts a backend, from its checks (`docs/trust.md`)."""

    CONFIGURED = "configured"
    """A static upstream from the operator's own configuration: never checked."""
    UNVERIFIED = "unverified"
    """A rig that has not passed enough spot checks yet (every rig starts here)."""
    VERIFIED = "verified"
    """A rig that passed its spot checks."""
    SUSPECT = "suspect"
    """A rig that failed a check."""
    QUARANTINED = "quarantined"
    """A rig taken out of routing for failed checks."""

    def is_trusted(self) -> bool:
        """A verified rig, or the operator's own upstream."""
        return self in (Trust.VERIFIED, Trust.CONFIGURED)


class CountedBy(StrEnum):
    """Who counted a usage event's tokens."""

    GATEWAY = "gateway"
    """The gateway, with the model's tokenizer."""
    BACKEND = "backend"
    """The backend's own report, within bounds the gateway checks."""


class LogLevel(StrEnum):
    """Severity of a log line (WIT `log.level`)."""

    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class BudgetPeriod(StrEnum):
    """Which budget a `BudgetUse` is about."""

    LIFETIME = "lifetime"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


def candidate_key(backend_id: str) -> int:
    """The key of the backend with this id, as the gateway gives it in `Candidate.key`:
    FNV-1a (64-bit) of the id's UTF-8 bytes."""
    key = 0xCBF29CE484222325
    for byte in backend_id.encode():
        key = ((key ^ byte) * 0x100000001B3) & U64_MAX
    return key


@dataclass
class RouteRequest:
    """A request about to be routed (WIT `route-request`)."""

    model: str = ""
    """Model name as the client asked for it."""
    key_id: str = ""
    """Id of the API key making the request."""
    prefix_hash: int = 0
    """Hash of the first part of the prompt: equal prefixes hash equally."""
    prompt_tokens: int = 0
    """Estimated prompt tokens (about 4 characters per token)."""
    max_tokens: int = 0
    """`max_tokens` of the request, or 0 when the client set none."""
    stream: bool = False
    """The client asked for a streamed answer."""


@dataclass
class Candidate:
    """One backend that can serve the request, with its live stats (WIT `candidate`, 0.4.0).
    Who it is (id, rig, operator, labels) is `host.candidate(index)`."""

    key: int = 0
    """Stable 64-bit key of the backend: `candidate_key(id)`."""
    in_flight: int = 0
    """Requests this gateway has in flight on this backend."""
    engine_running: int = 0
    """Requests running in the engine, 0 when unknown."""
    engine_waiting: int = 0
    """Requests queued in the engine, 0 when unknown."""
    kv_cache_usage: float = 0.0
    """KV-cache use of the engine, 0.0 to 1.0; 0.0 when unknown."""
    tokens_per_second: float = 0.0
    """Measured decode speed, tokens per second; 0.0 when not measured yet."""
    latency_ms: float = 0.0
    """Smoothed time to first token, milliseconds; 0.0 when unknown."""
    gpu_utilization: float = 0.0
    """Mean GPU utilisation of the rig, 0.0 to 1.0; 0.0 when unknown."""
    gpu_memory_free_bytes: int = 0
    """Free GPU memory of the rig, bytes; 0 when unknown."""
    trust: Trust = Trust.UNVERIFIED
    """What the gateway's checks found about the backend."""

    @classmethod
    def of(cls, backend_id: str, **stats) -> Candidate:
        """A candidate for the backend with this id (its key), for tests and examples."""
        return cls(key=candidate_key(backend_id), **stats)

    def load(self) -> int:
        """Requests on this backend as far as anyone knows: in flight, running and waiting."""
        return self.in_flight + self.engine_running + self.engine_waiting


@dataclass
class CandidateInfo:
    """Who a candidate is (WIT `candidate-info`)."""

    id: str = ""
    """Backend id: the node id of a rig, or the name of a static upstream."""
    rig: str = ""
    """Node id of the rig; empty for static upstreams."""
    operator: str = ""
    """Operator the rig belongs to; empty for static upstreams."""
    labels: list[tuple[str, str]] = field(default_factory=list)
    """Free-form labels (region, GPU class...), as `(key, value)` pairs."""

    def label(self, key: str) -> str | None:
        """The value of label `key`, if the backend has it."""
        return next((v for k, v in self.labels if k == key), None)


@dataclass
class Admission:
    """A request at admission, before it is dispatched (WIT `admission`)."""

    request_id: str = ""
    key_id: str = ""
    model: str = ""
    reserved_tokens: int = 0
    """Estimated prompt tokens plus the completion tokens it may produce."""
    key_metadata: str = "{}"
    """The key's metadata as a JSON object (limits and budgets are read from here)."""


@dataclass
class RateLimitHeaders:
    """Values for OpenAI's `x-ratelimit-*` headers; `None` leaves a header out."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_ms: int | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_ms: int | None = None


@dataclass
class Decision:
    """The rate limiter's answer: 0.2.0's `decision` and 0.3.0's `settle` flag."""

    allow: bool = True
    retry_after_ms: int = 0
    """When denied: milliseconds after which a retry may succeed (`retry-after`)."""
    reason: str = ""
    """Shown to the client when denied."""
    headers: RateLimitHeaders = field(default_factory=RateLimitHeaders)
    settle: bool = True
    """Whether the gateway must call `settle` once the allowed request is done."""

    @classmethod
    def deny(cls, retry_after_ms: int, reason: str, **headers) -> Decision:
        """Turn the request away; the client may retry after `retry_after_ms`."""
        return cls(False, retry_after_ms, reason, RateLimitHeaders(**headers), settle=False)


@dataclass
class Settlement:
    """What a request really used, once it is done or failed (WIT `settlement`)."""

    request_id: str = ""
    key_id: str = ""
    model: str = ""
    reserved_tokens: int = 0
    """What `admit` reserved."""
    used_tokens: int = 0
    """Prompt plus completion tokens actually used; 0 when the request failed."""


@dataclass
class Price:
    """A price in credits per thousand tokens (WIT `price`)."""

    prompt_per_thousand: float = 0.0
    completion_per_thousand: float = 0.0

    def cost(self, prompt: int, completion: int) -> float:
        """The credits `prompt` and `completion` tokens cost at this price."""
        return (prompt * self.prompt_per_thousand + completion * self.completion_per_thousand) / 1000


@dataclass
class QuoteRequest:
    """What a meter is asked to price (WIT `quote-request`)."""

    model: str = ""
    batch: bool = False
    """For a line of the Batch API."""


@dataclass
class Market:
    """Supply and demand for one model, as the gateway sees it now (WIT `market`)."""

    model: str = ""
    rigs: int = 0
    """Healthy backends serving the model."""
    capacity_tokens_per_second: float = 0.0
    utilization: float = 0.0
    """How busy they are, 0.0 to 1.0."""
    queue_depth: int = 0
    in_flight: int = 0
    demand_requests_per_minute: float = 0.0


@dataclass
class UsageEvent:
    """A completed request, for metering and rewards (WIT `usage-event`, 0.5.0)."""

    request_id: str = ""
    """Unique per request: metering and rewards are idempotent on it."""
    key_id: str = ""
    model: str = ""
    prompt_tokens: int = 0
    """Prompt tokens billed: the gateway's count with `counted_by == GATEWAY`."""
    completion_tokens: int = 0
    """Completion tokens billed."""
    cached_tokens: int = 0
    latency_ms: int = 0
    ttft_ms: int = 0
    backend: str = ""
    """Backend id that served it."""
    rig: str = ""
    """Node id of the rig that served it; empty for static upstreams."""
    operator: str = ""
    """Operator of that rig; empty for static upstreams."""
    started_at_ms: int = 0
    finished_at_ms: int = 0
    batch: bool = False
    """The request came from the Batch API."""
    counted_by: CountedBy = CountedBy.BACKEND
    """Who counted `prompt_tokens` and `completion_tokens`."""
    reported_prompt_tokens: int | None = None
    reported_completion_tokens: int | None = None
    trust: Trust = Trust.UNVERIFIED
    """The backend's trust when it served the request."""
    price: Price | None = None
    """The price the meter quoted at admission; `None` when it quoted nothing."""

    def tokens(self) -> int:
        """Prompt plus completion tokens (at most 2**64 - 1, as the gateway's sum)."""
        return min(self.prompt_tokens + self.completion_tokens, U64_MAX)

    def is_verified_work(self) -> bool:
        """Tokens the gateway counted itself, on a verified rig: work a reward can believe."""
        return self.counted_by == CountedBy.GATEWAY and self.trust == Trust.VERIFIED


@dataclass
class BudgetUse:
    """How much of one budget of a key is used, after a charge (WIT `budget-use`)."""

    period: BudgetPeriod = BudgetPeriod.LIFETIME
    spent: float = 0.0
    limit: float = 0.0
    starts_at_ms: int | None = None
    resets_at_ms: int | None = None


@dataclass
class Charge:
    """The meter's answer for one usage event (WIT `charge`, 0.5.0)."""

    credits: float = 0.0
    budget_exhausted: bool = False
    """The key's budget is spent: further requests get 429 `insufficient_quota`."""
    exhausted_until_ms: int | None = None
    """With `budget_exhausted`: when the budget resets; `None` for one that never does."""
    budgets: list[BudgetUse] = field(default_factory=list)


@dataclass
class RigReport:
    """Periodic report of a rig, for uptime rewards (WIT `rig-report`)."""

    rig: str = ""
    operator: str = ""
    period_ms: int = 0
    """Length of the period, milliseconds."""
    uptime_ms: int = 0
    """Milliseconds of the period the rig was connected and routable."""
    gpu_seconds: float = 0.0
    """GPU-seconds the rig offered in the period."""
    at_ms: int = 0

    def uptime_hours(self) -> float:
        """Hours the rig was up, capped at the period (a period of 0 caps nothing)."""
        uptime = min(self.uptime_ms, self.period_ms) if self.period_ms > 0 else self.uptime_ms
        return uptime / MS_PER_HOUR

    def gpu_hours(self) -> float:
        """GPU-hours offered; a negative or NaN count is 0."""
        seconds = self.gpu_seconds
        return seconds / 3600 if seconds > 0 and not math.isnan(seconds) else 0.0


@dataclass
class Award:
    """Points for an operator (WIT `award`)."""

    operator: str = ""
    points: float = 0.0
    reason: str = ""
    """Why, for the ledger (`tokens`, `uptime`...)."""


def pay(operator: str, points: float, reason: str) -> list[Award]:
    """`[Award(operator, points, reason)]`, or `[]` when there is nobody to pay (a static
    upstream has no operator) or nothing to pay (zero, negative or NaN points)."""
    return [Award(operator, float(points), reason)] if operator and points > 0 else []
