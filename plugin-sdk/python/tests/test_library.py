"""Native tests of garage_policy (pytest; no WebAssembly):

    .venv-plugins/bin/python -m pytest plugin-sdk/python
"""

import math

import pytest

from garage_policy import (
    Award, Candidate, CandidateInfo, CountedBy, Decision, LogLevel, Market, PolicyError, Price,
    RigReport, Trust, UsageEvent, candidate_key, load_config, pay,
)
from garage_policy.registry import Slot
from garage_policy.testing import MemoryHost


# --- records ----------------------------------------------------------------------------------

def test_candidate_keys_are_fnv1a_of_the_id():
    assert candidate_key("") == 0xCBF29CE484222325
    assert candidate_key("a") == 0xAF63DC4C8601EC8C  # FNV-1a 64 of "a", the published vector
    assert Candidate.of("rig-a", in_flight=3).key == candidate_key("rig-a")
    assert Candidate(in_flight=1, engine_running=2, engine_waiting=3).load() == 6


def test_verified_work_needs_the_gateways_count_on_a_verified_rig():
    work = UsageEvent(counted_by=CountedBy.GATEWAY, trust=Trust.VERIFIED)
    assert work.is_verified_work()
    assert not UsageEvent(counted_by=CountedBy.BACKEND, trust=Trust.VERIFIED).is_verified_work()
    assert not UsageEvent(counted_by=CountedBy.GATEWAY).is_verified_work()
    assert Trust.CONFIGURED.is_trusted() and not Trust.SUSPECT.is_trusted()
    assert Trust.VERIFIED == "verified", "enum values are the WIT case names"


def test_report_hours_cap_uptime_and_ignore_bad_gpu_counts():
    assert RigReport(period_ms=3_600_000, uptime_ms=7_200_000).uptime_hours() == 1.0
    assert RigReport(period_ms=0, uptime_ms=7_200_000).uptime_hours() == 2.0
    assert RigReport(gpu_seconds=7200.0).gpu_hours() == 2.0
    for bad in (-1.0, math.nan, -math.inf):
        assert RigReport(gpu_seconds=bad).gpu_hours() == 0.0


def test_pay_leaves_out_nobody_and_nothing():
    assert pay("alice", 2.5, "uptime") == [Award("alice", 2.5, "uptime")]
    assert pay("", 2.5, "uptime") == []
    for nothing in (0, -1.0, math.nan):
        assert pay("alice", nothing, "tokens") == []


def test_prices_labels_and_decisions():
    assert Price(0.5, 2.0).cost(2000, 500) == 2.0
    info = CandidateInfo("rig-a", labels=[("region", "eu")])
    assert info.label("region") == "eu" and info.label("gpu") is None
    no = Decision.deny(1500, "slow down", limit_requests=10)
    assert (no.allow, no.retry_after_ms, no.settle, no.headers.limit_requests) == (
        False, 1500, False, 10)


# --- configuration ----------------------------------------------------------------------------

DEFAULTS = {"rate": 1.0, "burst": 10, "weights": {}, "names": [], "on": True, "label": "x",
            "extra": None}


def test_an_empty_config_is_the_defaults():
    for text in ("", "  ", "{}"):
        cfg = load_config(MemoryHost(text), DEFAULTS)
        assert (cfg.rate, cfg.burst, dict(cfg.weights), cfg.names, cfg.on, cfg.label) == (
            1.0, 10, {}, (), True, "x")


def test_fields_take_the_type_of_their_default():
    cfg = load_config(MemoryHost({"rate": 2, "burst": 20.0, "weights": {"m": 3},
                                  "names": ["a"], "on": False, "extra": [1, "two"]}), DEFAULTS)
    assert cfg.rate == 2.0 and isinstance(cfg.rate, float)
    assert cfg.burst == 20 and isinstance(cfg.burst, int)
    assert cfg.weights == {"m": 3.0} and cfg.names == ("a",) and cfg.on is False
    assert cfg.extra == [1, "two"]
    typed = load_config(MemoryHost({"t": {"a": "b"}}), {"t": {"k": "v"}})
    assert typed.t == {"a": "b"}


def test_a_config_cannot_be_changed_by_the_policy():
    cfg = load_config(MemoryHost({"weights": {"m": 1}}), DEFAULTS)
    with pytest.raises(TypeError):
        cfg.weights["m"] = 5.0
    defaults = load_config(MemoryHost(), DEFAULTS)
    with pytest.raises(TypeError):
        defaults.weights["m"] = 5.0
    assert DEFAULTS["weights"] == {}


@pytest.mark.parametrize("config, message", [
    ("{", "invalid plugin config: Expecting property name"),
    ("[1]", "invalid plugin config: not a JSON object"),
    ('"text"', "invalid plugin config: not a JSON object"),
    ('{"rat": 1}', "unknown field `rat`, expected one of `rate`, `burst`"),
    ('{"rate": "1"}', "rate must be a number"),
    ('{"rate": true}', "rate must be a number"),
    ('{"rate": null}', "rate must be a number"),
    ('{"rate": -0.5}', "rate must be a number >= 0"),
    ('{"rate": 1e999}', "rate must be a number >= 0"),
    ('{"rate": NaN}', "rate must be a number >= 0"),
    ('{"burst": 1.5}', "burst must be a whole number"),
    ('{"weights": [1]}', "weights must be an object"),
    ('{"weights": {"m": "heavy"}}', "weights['m'] must be a number"),
    ('{"names": "a"}', "names must be a list"),
    ('{"names": [1]}', "names[0] must be a string"),
    ('{"on": 1}', "on must be true or false"),
    ('{"label": 1}', "label must be a string"),
])
def test_bad_configs_are_policy_errors_that_say_why(config, message):
    with pytest.raises(PolicyError) as caught:
        load_config(MemoryHost(config), DEFAULTS)
    assert str(caught.value).startswith("invalid plugin config: ")
    assert message in str(caught.value)


def test_a_default_with_no_rule_is_the_authors_mistake():
    with pytest.raises(TypeError, match="no rule for the default of when"):
        load_config(MemoryHost({"when": 1}), {"when": object()})


# --- registration -----------------------------------------------------------------------------

def test_decorators_register_and_return_the_function():
    slot = Slot("reward", "usage", ("report",))

    @slot
    def usage(host, event):
        return []

    @slot.report
    def report(host, report):
        return []

    assert slot.function("usage") is usage and slot.function("report") is report
    assert usage(MemoryHost(), UsageEvent()) == []


def test_one_function_per_export():
    slot = Slot("router", "route", ())
    slot(lambda host, request, candidates: [])
    with pytest.raises(ValueError, match="router route is already .*one function per export"):
        slot(lambda host, request, candidates: [0])
    with pytest.raises(TypeError, match="takes a function"):
        Slot("meter", "charge", ("quote",)).quote(42)
    slot.clear()
    assert slot.function("route") is None


# --- MemoryHost -------------------------------------------------------------------------------

def test_counters_reserve_up_to_a_limit_in_windows_that_do_not_slide():
    host = MemoryHost()
    assert host.kv_reserve("w", 1, 2, 1000) == 1
    host.advance_ms(600)
    assert host.kv_reserve("w", 1, 2, 1000) == 2
    assert host.kv_reserve("w", 1, 2, 1000) is None
    assert host.ttl_ms("w") == 400, "the window does not slide"
    host.advance_ms(400)
    assert host.kv_get("w") is None and host.keys() == []
    assert host.kv_reserve("w", 5, 2, 1000) is None and host.keys() == [], "refused: nothing made"
    assert host.kv_incr("n", 5) == 5 and host.kv_get("n") == b"5"
    assert host.kv_incr("n", 2**70) == 2**63 - 1, "saturates"


def test_values_ttls_logs_candidates_and_markets():
    host = MemoryHost(now_ms=0)
    host.kv_set("a", b"1", 10)
    host.kv_set("a", b"2")
    assert host.ttl_ms("a") is None, "a set replaces the TTL"
    host.kv_delete("a")
    assert host.kv_get("a") is None
    host.kv_set("s", b"text")
    with pytest.raises(ValueError, match="not an integer counter"):
        host.kv_incr("s", 1)
    with pytest.raises(TypeError, match="takes bytes"):
        host.kv_set("s", "text")
    host.log("warn", "slow rig")
    assert host.logged(LogLevel.WARN, "slow") and not host.logged(LogLevel.ERROR, "slow")
    with pytest.raises(ValueError):
        host.log("loud", "no such level")
    host.candidates = [CandidateInfo("rig-a")]
    assert host.candidate(0).id == "rig-a" and host.candidate(1) is None
    assert host.candidate(-1) is None
    host.set_market(Market(model="m", utilization=0.9))
    assert host.market("m").utilization == 0.9 and host.market("other") is None
