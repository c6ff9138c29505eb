"""Native tests (pytest): the policy against garage_policy's in-memory host, no WebAssembly."""
import pytest

import policy
from garage_policy import Admission, PolicyError
from garage_policy.testing import MemoryHost


def host(config):
    """A host whose clock sits 10 s into a minute."""
    return MemoryHost(config, now_ms=1_700_000_050_000)


def request(key_id, key_metadata="{}"):
    return Admission(key_id=key_id, key_metadata=key_metadata)


def test_a_key_gets_its_requests_per_minute_then_a_retry_after():
    h = host({"rpm": 2})
    first = policy.admit(h, request("key_a"))
    assert first.allow and first.headers.remaining_requests == 1 and not first.settle
    assert policy.admit(h, request("key_a")).allow
    third = policy.admit(h, request("key_a"))
    assert not third.allow
    assert third.retry_after_ms == 50_000, "the rest of the minute"
    assert policy.admit(h, request("key_b")).allow, "keys count apart"
    h.advance_ms(50_000)
    assert policy.admit(h, request("key_a")).allow, "a new minute"


def test_the_key_metadata_wins_over_the_config_and_no_limit_lets_all_through():
    h = host({"rpm": 1})
    assert policy.admit(h, request("key_a", '{"rpm": 5}')).allow
    assert policy.admit(h, request("key_a", '{"rpm": 5}')).allow
    open_host = MemoryHost()
    for _ in range(100):
        assert policy.admit(open_host, request("key_a")).allow
    assert open_host.keys() == [], "nothing counted without a limit"


def test_zero_refuses_everything():
    assert not policy.admit(host({"rpm": 0}), request("key_a")).allow


def test_bad_key_metadata_falls_back_to_the_config():
    h = host({"rpm": 1})
    assert policy.admit(h, request("key_a", "not json")).allow
    assert not policy.admit(h, request("key_a", '{"rpm": "many"}')).allow


@pytest.mark.parametrize("config", [{"rpm": "sixty"}, {"rpm": -1}, {"rpm": 1.5}, {"rpms": 2}])
def test_a_bad_config_raises(config):
    with pytest.raises(PolicyError, match="invalid plugin config"):
        policy.admit(host(config), request("key_a"))
