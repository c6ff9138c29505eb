"""Native tests of the reward policy (pytest, a MemoryHost, no WebAssembly): the cases of the
Rust default's tests (plugins/guests/reward).

    .venv-plugins/bin/python -m pytest plugins/python/reward
"""

import pytest

import policy
from garage_policy import Award, CountedBy, PolicyError, RigReport, Trust, UsageEvent
from garage_policy.testing import MemoryHost

CONFIG = {
    "points_per_1k_tokens": 2.0,
    "model_weights": {"llama-3.1-70b": 8.0},
    "batch_weight": 0.5,
    "points_per_uptime_hour": 10.0,
    "points_per_gpu_hour": 1.0,
}


def verified(**fields):
    fields = {"operator": "alice", **fields}
    return UsageEvent(counted_by=CountedBy.GATEWAY, trust=Trust.VERIFIED, **fields)


def test_verified_tokens_pay_by_model_weight():
    host = MemoryHost(CONFIG)
    big = verified(model="llama-3.1-70b", prompt_tokens=300, completion_tokens=200)
    assert policy.tokens(host, big) == [Award("alice", 0.5 * 2.0 * 8.0, "tokens")]
    small = verified(model="qwen-7b", prompt_tokens=300, completion_tokens=200)
    assert policy.tokens(host, small) == [Award("alice", 0.5 * 2.0, "tokens")]


def test_batch_tokens_pay_the_batch_weight():
    event = verified(model="qwen-7b", prompt_tokens=1000, batch=True)
    assert policy.tokens(MemoryHost(CONFIG), event) == [Award("alice", 1.0, "batch-tokens")]


@pytest.mark.parametrize("trust", [Trust.UNVERIFIED, Trust.SUSPECT, Trust.QUARANTINED,
                                   Trust.CONFIGURED])
def test_work_on_a_rig_not_verified_earns_nothing(trust):
    event = UsageEvent(operator="alice", completion_tokens=5000, counted_by=CountedBy.GATEWAY,
                       trust=trust)
    assert policy.tokens(MemoryHost(CONFIG), event) == []


def test_tokens_the_rig_counted_earn_nothing_unless_the_operator_pays_them():
    event = UsageEvent(operator="alice", completion_tokens=1000, counted_by=CountedBy.BACKEND,
                       trust=Trust.VERIFIED)
    assert policy.tokens(MemoryHost(CONFIG), event) == []
    anyone = MemoryHost({"verified_only": False, "gateway_counted_only": False})
    unchecked = UsageEvent(operator="alice", completion_tokens=1000)
    assert policy.tokens(anyone, unchecked) == [Award("alice", 1.0, "tokens")]


def test_static_upstreams_and_empty_requests_earn_nothing():
    host = MemoryHost(CONFIG)
    assert policy.tokens(host, verified(operator="", completion_tokens=1000)) == []
    assert policy.tokens(host, verified()) == []


def test_a_huge_count_is_capped_not_overflowed():
    event = verified(prompt_tokens=2**64 - 1, completion_tokens=2**64 - 1)
    assert policy.tokens(MemoryHost(), event) == [Award("alice", (2**64 - 1) / 1000, "tokens")]


def test_reports_pay_uptime_capped_at_the_period_and_gpu_hours():
    host = MemoryHost(CONFIG)
    report = RigReport(operator="alice", period_ms=1_800_000, uptime_ms=2_000_000,
                       gpu_seconds=7200.0)
    assert policy.uptime(host, report) == [Award("alice", 5.0, "uptime"),
                                           Award("alice", 2.0, "gpu-hours")]
    assert policy.uptime(host, RigReport(operator="", uptime_ms=3_600_000)) == []
    nothing = RigReport(operator="alice", gpu_seconds=float("nan"))
    assert policy.uptime(host, nothing) == []
    assert policy.uptime(host, RigReport(operator="alice", gpu_seconds=-7200.0)) == []


def test_defaults_pay_a_point_per_thousand_tokens_and_per_uptime_hour():
    host = MemoryHost()
    assert policy.tokens(host, verified(prompt_tokens=1500, completion_tokens=500)) == [
        Award("alice", 2.0, "tokens")]
    report = RigReport(operator="alice", period_ms=3_600_000, uptime_ms=3_600_000,
                       gpu_seconds=3600.0)
    assert policy.uptime(host, report) == [Award("alice", 1.0, "uptime")]


@pytest.mark.parametrize("config", [
    "[]", "not json", '{"batch_weight": "1"}', '{"default_weight": -1}',
    '{"default_weight": true}', '{"default_weight": null}', '{"model_weights": [1]}',
    '{"model_weights": null}', '{"model_weights": {"m": null}}', '{"model_weight": {}}',
    '{"verified_only": 0}', '{"points_per_1k_tokens": 1e999}',
])
def test_a_bad_config_is_the_err_of_every_call(config):
    host = MemoryHost(config)
    with pytest.raises(PolicyError, match="^invalid plugin config"):
        policy.tokens(host, verified(completion_tokens=1000))
    with pytest.raises(PolicyError, match="^invalid plugin config"):
        policy.uptime(host, RigReport(operator="alice", uptime_ms=1))


def test_a_misspelled_field_is_named():
    with pytest.raises(PolicyError, match="unknown field `model_weight`"):
        policy.tokens(MemoryHost({"model_weight": {}}), verified())
