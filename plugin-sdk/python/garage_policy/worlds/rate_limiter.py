"""The `rate-limiter` world of `garage:policy@0.4.0` (the same as 0.3.0's;
`componentize-py -d wit/v0.4 -w rate-limiter`), exporting what `@rate_limiter` (admit) and
`@rate_limiter.settle` registered. Without a settle, no admitted request asks for one."""

from wit_world import WitWorld as _Exports
from wit_world.imports import garage_policy_types_0_2_0 as wit
from wit_world.imports import garage_policy_types_0_3_0 as wit_v0_3

from ..registry import rate_limiter
from ._wit import WitHost, lift, required

_admit = required(rate_limiter, "admit")
_settle = rate_limiter.function("settle")
_host = WitHost()


class WitWorld(_Exports):
    def admit(self, request):
        decision = _admit(_host, lift(request))
        h = decision.headers
        headers = wit.RateLimitHeaders(
            limit_requests=h.limit_requests,
            remaining_requests=h.remaining_requests,
            reset_requests_ms=h.reset_requests_ms,
            limit_tokens=h.limit_tokens,
            remaining_tokens=h.remaining_tokens,
            reset_tokens_ms=h.reset_tokens_ms,
        )
        return wit_v0_3.Admitted(
            decision=wit.Decision(
                allow=bool(decision.allow),
                retry_after_ms=int(decision.retry_after_ms),
                reason=str(decision.reason),
                headers=headers,
            ),
            settle=bool(decision.allow and decision.settle and _settle is not None),
        )

    def settle(self, settlement):
        if _settle is not None:
            _settle(_host, lift(settlement))
