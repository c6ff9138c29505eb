"""Garage reward plugin in Python: the glue between the WIT world `reward` and `policy.py`.

Build (from the repository root; scripts/build-plugins-polyglot.sh does this):

    componentize-py -d wit -w reward componentize app -p plugins/python/reward --stub-wasi \
        -o reward.wasm

componentize-py generates the `wit_world` package at build time: the world's imports are
modules of `wit_world.imports`, its exports are the methods of a class named `WitWorld` in the
app module. A `result<T, string>` export returns T, or raises `Err(message)`; any other
exception traps (the gateway counts a fault).
"""

from componentize_py_types import Err
from wit_world import WitWorld as _Exports
from wit_world.imports import config, log, types

import policy


def _config():
    try:
        return policy.parse_config(config.get())
    except policy.ConfigError as err:
        log.log(log.Level.ERROR, str(err))
        raise Err(str(err))


def _awards(found):
    return [types.Award(operator=o, points=p, reason=r) for o, p, r in found]


class WitWorld(_Exports):
    def on_usage(self, event: types.UsageEvent) -> list[types.Award]:
        cfg = _config()
        found = policy.usage_awards(
            cfg, event.operator, event.model, event.prompt_tokens, event.completion_tokens,
            event.batch,
        )
        log.log(
            log.Level.DEBUG,
            f"usage {event.request_id}: {event.prompt_tokens}+{event.completion_tokens} tokens"
            f" of {event.model}{' (batch)' if event.batch else ''} on rig {event.rig or '-'}:"
            f" {found or 'no award'}",
        )
        return _awards(found)

    def on_report(self, report: types.RigReport) -> list[types.Award]:
        cfg = _config()
        found = policy.report_awards(
            cfg, report.operator, report.period_ms, report.uptime_ms, report.gpu_seconds
        )
        log.log(
            log.Level.DEBUG,
            f"report of rig {report.rig}: up {report.uptime_ms} of {report.period_ms} ms,"
            f" {report.gpu_seconds} GPU-s: {found or 'no award'}",
        )
        return _awards(found)
