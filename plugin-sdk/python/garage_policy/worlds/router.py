"""The `router` world of `garage:policy@0.4.0` (`componentize-py -d wit/v0.4 -w router`),
exporting what `@router` registered."""

from wit_world import WitWorld as _Exports
from wit_world.imports import candidates as _candidates

from ..registry import router
from ._wit import WitHost, call, lift, required

_route = required(router, "route")
_host = WitHost(candidates=_candidates)


class WitWorld(_Exports):
    def route(self, request, candidates):
        return [int(i) for i in call(_route, _host, lift(request), lift(candidates))]
