"""Native tests (pytest): the policy against garage_policy's in-memory host, no WebAssembly."""
import pytest

import policy
from garage_policy import Candidate, PolicyError, RouteRequest
from garage_policy.testing import MemoryHost


def rig(backend_id, in_flight=0, tokens_per_second=0.0, **stats):
    return Candidate.of(backend_id, in_flight=in_flight, tokens_per_second=tokens_per_second,
                        **stats)


def route(config, candidates):
    return policy.route(MemoryHost(config), RouteRequest(), candidates)


def test_a_fast_busy_rig_beats_a_slow_idle_one():
    # (3 + 1) / 100 = 0.04 s against (0 + 1) / 20 = 0.05 s.
    assert route({}, [rig("slow", 0, 20.0), rig("fast", 3, 100.0)]) == [1, 0]


def test_the_engine_queue_counts_and_ties_keep_the_gateway_order():
    queued = rig("queued", 0, 50.0, engine_waiting=2)
    assert route({}, [queued, rig("a", 0, 50.0), rig("b", 0, 50.0)]) == [1, 2, 0]


def test_an_unmeasured_rig_counts_at_the_configured_speed():
    candidates = [rig("new", 0, 0.0), rig("measured", 0, 20.0)]
    assert route({}, candidates) == [1, 0]
    assert route({"unmeasured_tps": 40}, candidates) == [0, 1]


def test_no_candidates_is_an_empty_order():
    assert route({}, []) == []


def test_a_misspelled_setting_is_an_error_that_names_it():
    with pytest.raises(PolicyError, match="unmeasured"):
        route({"unmeasured": 5}, [rig("a", 0, 1.0)])


def test_a_setting_of_the_wrong_type_is_an_error():
    with pytest.raises(PolicyError, match="unmeasured_tps"):
        route({"unmeasured_tps": "fast"}, [rig("a", 0, 1.0)])
