"""garage_policy: write Garage policies (reward, meter, router, rate limiter) in Python.

A policy is one function registered with its slot's decorator, over typed records, against a
`Host` (key-value state, clock, log, configuration); natively it is tested against
`garage_policy.testing.MemoryHost`, and componentize-py builds it into a WebAssembly component
through `garage_policy.worlds.<slot>` (see plugin-sdk/README.md).
"""

from .host import Host, PolicyError, load_config
from .registry import meter, rate_limiter, reward, router
from .types import (
    Admission,
    Award,
    BudgetPeriod,
    BudgetUse,
    Candidate,
    CandidateInfo,
    Charge,
    CountedBy,
    Decision,
    LogLevel,
    Market,
    Price,
    QuoteRequest,
    RateLimitHeaders,
    RigReport,
    RouteRequest,
    Settlement,
    Trust,
    UsageEvent,
    candidate_key,
    pay,
)

__all__ = [
    "Admission", "Award", "BudgetPeriod", "BudgetUse", "Candidate", "CandidateInfo", "Charge",
    "CountedBy", "Decision", "Host", "LogLevel", "Market", "PolicyError", "Price",
    "QuoteRequest", "RateLimitHeaders", "RigReport", "RouteRequest", "Settlement", "Trust",
    "UsageEvent", "candidate_key", "load_config", "meter", "pay", "rate_limiter", "reward",
    "router",
]
