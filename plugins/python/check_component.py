#!/usr/bin/env python3
"""Checks that built components implement the `reward` world of `garage:policy@0.5.0`
(wit/v0.5/policy.wit), by loading them in wasmtime (the `wasmtime` PyPI package, the same engine as the gateway's host) and calling them.

    .venv-plugins/bin/python plugins/python/check_component.py [--allow-wasi] COMPONENT.wasm...

For each component it prints its imports and exports, then checks that:
  - it exports `on-usage` (a list of events in, one result per event out) and `on-report`;
  - it imports nothing but `garage:policy/*` (with --allow-wasi, `wasi:*` too: those are then
    linked to a WASI context with no files, no environment and no arguments, plus wasi:http);
  - it instantiates against host functions for kv/clock/log/config (a fresh instance per call,
    as the gateway does) and pays what the default reward policy pays (plugins/guests/reward):
    verified, gateway-counted tokens only (unless the config says otherwise) by model weight,
    batch weight, uptime capped at the period, GPU hours, no award without an operator or
    points; a bad config is the `err` of each event's result and of the report's.
It also prints the compile time and the time of a fresh instance + call. Exits 1 on a failure.
"""

import argparse
import json
import sys
import time
from types import SimpleNamespace

import wasmtime
from wasmtime import component as wc

POLICY_IMPORTS = {
    f"garage:policy/{name}@0.2.0" for name in ("types", "kv", "clock", "log", "config")
} | {"garage:policy/types@0.4.0", "garage:policy/types@0.5.0"}

# The example configuration of the reward slot.
CONFIG = {
    "points_per_1k_tokens": 1.0,
    "model_weights": {"llama-3.1-70b-instruct": 8.0},
    "default_weight": 1.0,
    "batch_weight": 0.5,
    "points_per_uptime_hour": 10.0,
}


def record(**fields):
    """A WIT record value for wasmtime-py: attributes named as in WIT (kebab-case)."""
    value = SimpleNamespace()
    for name, field in fields.items():
        setattr(value, name.replace("_", "-"), field)
    return value


def usage_event(**over):
    fields = dict(
        request_id="req-1", key_id="key-1", model="llama-3.1-70b-instruct",
        prompt_tokens=1500, completion_tokens=500, cached_tokens=0, latency_ms=900,
        ttft_ms=120, backend="rig-1", rig="rig-1", operator="alice",
        started_at_ms=1_700_000_000_000, finished_at_ms=1_700_000_000_900, batch=False,
        counted_by="gateway", reported_prompt_tokens=1500, reported_completion_tokens=500,
        trust="verified", price=None,
    )
    fields.update(over)
    return record(**fields)


def rig_report(**over):
    fields = dict(
        rig="rig-1", operator="alice", period_ms=3_600_000, uptime_ms=1_800_000,
        gpu_seconds=7200.0, at_ms=1_700_000_000_000,
    )
    fields.update(over)
    return record(**fields)


class Host:
    """The gateway's side of the world: kv in a dict, a fixed clock, logs kept for checking."""

    def __init__(self, engine, needs_wasi):
        self.config_text = json.dumps(CONFIG)
        self.kv = {}
        self.logs = []
        self.linker = wc.Linker(engine)
        self.needs_wasi = needs_wasi
        if needs_wasi:
            self.linker.add_wasip2()
            # componentize-js's default features import wasi:http (for fetch) too.
            self.linker.add_wasi_http()
        root = self.linker.root()
        with root.add_instance("garage:policy/kv@0.2.0") as kv:
            kv.add_func("get", lambda _s, key: self.kv.get(key))
            kv.add_func("set", lambda _s, key, value, _ttl: self.kv.__setitem__(key, bytes(value)))
            kv.add_func("delete", lambda _s, key: self.kv.pop(key, None) and None)
            kv.add_func("incr", self._incr)
            kv.add_func("reserve", self._reserve)
        with root.add_instance("garage:policy/clock@0.2.0") as clock:
            clock.add_func("now-ms", lambda _s: 1_700_000_000_000)
        with root.add_instance("garage:policy/log@0.2.0") as log:
            log.add_func("log", lambda _s, level, message: self.logs.append((level, message)))
        with root.add_instance("garage:policy/config@0.2.0") as config:
            config.add_func("get", lambda _s: self.config_text)
        root.close()

    def _incr(self, _s, key, delta, _ttl):
        value = int(self.kv.get(key, b"0")) + delta
        self.kv[key] = str(value).encode()
        return value

    def _reserve(self, _s, key, amount, limit, _ttl):
        value = int(self.kv.get(key, b"0")) + amount
        if value > limit:
            return None
        self.kv[key] = str(value).encode()
        return value

    def call(self, engine, component, export, *args):
        """A fresh store and instance, one call: what the gateway does by default."""
        store = wasmtime.Store(engine)
        if self.needs_wasi:
            store.set_wasi(wasmtime.WasiConfig())  # nothing inherited: no fs, env, args
        instance = self.linker.instantiate(store, component)
        func = instance.get_func(store, export)
        result = func(store, *args)
        try:
            func.post_return(store)
        except Exception:  # noqa: BLE001 - a no-op or refused on newer wasmtime
            pass
        return result


def awards(result):
    if isinstance(result, str):
        raise AssertionError(f"expected ok, got err {result!r}")
    return [(a.operator, round(a.points, 9), a.reason) for a in result]


def check(path, allow_wasi):
    failures = []

    def expect(cond, what):
        print(f"    {'ok  ' if cond else 'FAIL'} {what}")
        if not cond:
            failures.append(what)

    engine_config = wasmtime.Config()
    engine = wasmtime.Engine(engine_config)
    started = time.perf_counter()
    component = wc.Component.from_file(engine, path)
    compile_s = time.perf_counter() - started
    imports = sorted(component.type.imports(engine))
    exports = sorted(component.type.exports(engine))
    print(f"{path}: compiled in {compile_s:.2f} s")
    print(f"  imports ({len(imports)}):")
    for name in imports:
        print(f"    {name}")
    print(f"  exports: {', '.join(exports)}")

    expect({"on-usage", "on-report"} <= set(exports), "exports on-usage and on-report")
    wasi = [name for name in imports if name.startswith("wasi:")]
    other = [name for name in imports if name not in POLICY_IMPORTS and name not in wasi]
    expect(not other, f"no imports outside garage:policy and wasi ({other or 'none'})")
    if not allow_wasi:
        expect(not wasi, f"no wasi imports ({len(wasi)} found)")

    host = Host(engine, needs_wasi=bool(wasi))
    with_gpu = json.dumps({**CONFIG, "points_per_gpu_hour": 1.0})
    pays_everyone = {**CONFIG, "verified_only": False, "gateway_counted_only": False}
    cases = [
        # (label, config, export, argument, awards wanted)
        ("70b, 2000 tokens", CONFIG, "on-usage", usage_event(), [("alice", 16.0, "tokens")]),
        ("70b, batch", CONFIG, "on-usage", usage_event(batch=True),
         [("alice", 8.0, "batch-tokens")]),
        ("unknown model", CONFIG, "on-usage", usage_event(model="tiny"),
         [("alice", 2.0, "tokens")]),
        ("no operator", CONFIG, "on-usage", usage_event(operator=""), []),
        ("no tokens", CONFIG, "on-usage", usage_event(prompt_tokens=0, completion_tokens=0), []),
        ("empty config", {}, "on-usage", usage_event(), [("alice", 2.0, "tokens")]),
        ("unverified rig", CONFIG, "on-usage", usage_event(trust="unverified"), []),
        ("suspect rig", CONFIG, "on-usage", usage_event(trust="suspect"), []),
        ("rig-counted", CONFIG, "on-usage", usage_event(counted_by="backend"), []),
        ("unverified, paid on request", pays_everyone, "on-usage",
         usage_event(trust="unverified", counted_by="backend"), [("alice", 16.0, "tokens")]),
        ("30 min up of 60", CONFIG, "on-report", rig_report(), [("alice", 5.0, "uptime")]),
        ("uptime capped", CONFIG, "on-report", rig_report(period_ms=1_800_000, uptime_ms=2_000_000),
         [("alice", 5.0, "uptime")]),
        ("gpu hours", with_gpu, "on-report", rig_report(),
         [("alice", 5.0, "uptime"), ("alice", 2.0, "gpu-hours")]),
        ("no operator", CONFIG, "on-report", rig_report(operator=""), []),
    ]
    timings = []
    for label, config, export, arg, want in cases:
        host.config_text = config if isinstance(config, str) else json.dumps(config)
        started = time.perf_counter()
        try:
            if export == "on-usage":
                results = host.call(engine, component, export, [arg])
                if len(results) != 1:
                    raise AssertionError(f"{len(results)} results for one event")
                got = awards(results[0])
            else:
                got = awards(host.call(engine, component, export, arg))
        except Exception as err:  # noqa: BLE001 - report and go on
            got = f"{type(err).__name__}: {err}"
        timings.append(time.perf_counter() - started)
        expect(got == want, f"{export} {label}: {got}")

    # One call for a batch of events: one answer each, in order.
    host.config_text = json.dumps(CONFIG)
    batch = [usage_event(request_id=f"req-{i}", completion_tokens=1000 * i) for i in range(3)]
    try:
        got = [awards(result) for result in host.call(engine, component, "on-usage", batch)]
    except Exception as err:  # noqa: BLE001
        got = f"{type(err).__name__}: {err}"
    want = [[("alice", 12.0, "tokens")], [("alice", 20.0, "tokens")], [("alice", 28.0, "tokens")]]
    expect(got == want, f"on-usage of 3 events: {got}")

    for bad in ['{"model_weights": [1]}', '{"model_weight": {}}', "[]"]:
        host.config_text = bad
        for export, arg in (("on-usage", [usage_event(), usage_event()]), ("on-report", rig_report())):
            try:
                got = host.call(engine, component, export, arg)
            except Exception as err:  # noqa: BLE001
                got = err
            errs = got if export == "on-usage" else [got]
            expect(
                isinstance(errs, list) and len(errs) == len(arg if export == "on-usage" else [arg])
                and all(isinstance(e, str) and e.startswith("invalid plugin config") for e in errs),
                f"{export}, config {bad} -> err ({got!r})",
            )

    timings.sort()
    print(f"  fresh instance + call: median {timings[len(timings) // 2] * 1e3:.1f} ms")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("components", nargs="+")
    parser.add_argument("--allow-wasi", action="store_true", help="accept wasi:* imports")
    args = parser.parse_args()
    failed = 0
    for path in args.components:
        failures = check(path, args.allow_wasi)
        failed += bool(failures)
    print(f"{len(args.components) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
