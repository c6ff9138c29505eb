"""Native tests (pytest): the policy against garage_policy's in-memory host, no WebAssembly."""
import pytest

import policy
from garage_policy import Award, CountedBy, PolicyError, RigReport, Trust, UsageEvent
from garage_policy.testing import MemoryHost

CONFIG = {"points_per_1k_tokens": 2, "model_weights": {"llama-3.1-70b": 8},
          "points_per_uptime_hour": 10}


def verified(model, tokens, **fields):
    fields = {"operator": "alice", "counted_by": CountedBy.GATEWAY, "trust": Trust.VERIFIED,
              **fields}
    return UsageEvent(model=model, prompt_tokens=tokens // 2,
                      completion_tokens=tokens - tokens // 2, **fields)


def test_verified_tokens_pay_by_model_weight():
    host = MemoryHost(CONFIG)
    assert policy.tokens(host, verified("llama-3.1-70b", 500)) == [Award("alice", 8.0, "tokens")]
    assert policy.tokens(host, verified("qwen-7b", 500)) == [Award("alice", 1.0, "tokens")]


def test_unverified_work_and_static_upstreams_earn_nothing():
    host = MemoryHost(CONFIG)
    assert policy.tokens(host, verified("qwen-7b", 5000, trust=Trust.UNVERIFIED)) == []
    assert policy.tokens(host, verified("qwen-7b", 5000, counted_by=CountedBy.BACKEND)) == []
    assert policy.tokens(host, verified("qwen-7b", 5000, operator="")) == []


def test_uptime_pays_per_hour_capped_at_the_period():
    host = MemoryHost(CONFIG)
    half = RigReport(operator="alice", period_ms=3_600_000, uptime_ms=1_800_000)
    assert policy.uptime(host, half) == [Award("alice", 5.0, "uptime")]
    over = RigReport(operator="alice", period_ms=3_600_000, uptime_ms=7_200_000)
    assert policy.uptime(host, over) == [Award("alice", 10.0, "uptime")]


def test_a_misspelled_setting_is_an_error_that_names_it():
    with pytest.raises(PolicyError, match="points_per_1k_token"):
        policy.tokens(MemoryHost({"points_per_1k_token": 2}), verified("qwen-7b", 500))
