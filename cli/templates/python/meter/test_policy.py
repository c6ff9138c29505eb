"""Native tests (pytest): the policy against garage_policy's in-memory host, no WebAssembly."""
import pytest

import policy
from garage_policy import PolicyError, Price, QuoteRequest, UsageEvent
from garage_policy.testing import MemoryHost

CONFIG = {"prompt_per_1k": 0.5, "completion_per_1k": 1.5, "model_multipliers": {"llama-3.1-70b": 4}}


def test_the_quote_is_the_price_times_the_model_multiplier():
    quoted = policy.quote(MemoryHost(CONFIG), QuoteRequest(model="llama-3.1-70b"))
    assert quoted == Price(2.0, 6.0)


def test_a_request_is_charged_its_tokens_at_the_price():
    charge = policy.charge(MemoryHost(CONFIG), UsageEvent(model="qwen-7b", prompt_tokens=2000,
                                                          completion_tokens=1000))
    assert charge.credits == 2.5 and not charge.budget_exhausted


def test_a_quoted_request_pays_the_quote_whatever_the_config_says_now():
    event = UsageEvent(model="qwen-7b", prompt_tokens=1000, completion_tokens=1000,
                       price=Price(1.0, 1.0))
    assert policy.charge(MemoryHost(CONFIG), event).credits == 2.0


def test_a_misspelled_setting_is_an_error_that_names_it():
    with pytest.raises(PolicyError, match="prompt_per_1000"):
        policy.charge(MemoryHost({"prompt_per_1000": 2}), UsageEvent(prompt_tokens=1))
