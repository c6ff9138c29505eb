"""The `meter` world of `garage:policy@0.5.0` (`componentize-py -d wit/v0.5 -w meter`),
exporting what `@meter` (charge) and `@meter.quote` registered."""

from wit_world import WitWorld as _Exports
from wit_world.imports import garage_policy_types_0_5_0 as wit
from wit_world.imports import market

from ..registry import meter
from ._wit import WitHost, call, each, lift, required

_charge = required(meter, "charge")
_quote = meter.function("quote")
_host = WitHost(market=market)


def _lower_charge(charge):
    return wit.Charge(
        credits=float(charge.credits),
        budget_exhausted=bool(charge.budget_exhausted),
        exhausted_until_ms=charge.exhausted_until_ms,
        budgets=[
            wit.BudgetUse(
                period=wit.BudgetPeriod[b.period.name],
                spent=float(b.spent),
                limit=float(b.limit),
                starts_at_ms=b.starts_at_ms,
                resets_at_ms=b.resets_at_ms,
            )
            for b in charge.budgets
        ],
    )


class WitWorld(_Exports):
    def quote(self, request):
        if _quote is None:
            return None
        price = call(_quote, _host, lift(request))
        if price is None:
            return None
        return wit.Price(
            prompt_per_thousand=float(price.prompt_per_thousand),
            completion_per_thousand=float(price.completion_per_thousand),
        )

    def charge(self, events):
        return each(_charge, _host, events, _lower_charge)
