"""The `reward` world of `garage:policy@0.5.0` (`componentize-py -d wit/v0.5 -w reward`),
exporting what `@reward` and `@reward.report` registered."""

from wit_world import WitWorld as _Exports
from wit_world.imports import garage_policy_types_0_2_0 as wit

from ..registry import reward
from ._wit import WitHost, call, each, lift, required

_usage = required(reward, "usage")
_report = reward.function("report")
_host = WitHost()


def _awards(awards):
    return [wit.Award(operator=a.operator, points=float(a.points), reason=a.reason) for a in awards]


class WitWorld(_Exports):
    def on_usage(self, events):
        return each(_usage, _host, events, _awards)

    def on_report(self, report):
        if _report is None:
            return []
        return _awards(call(_report, _host, lift(report)))
