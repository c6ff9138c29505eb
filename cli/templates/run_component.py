"""`garage plugin test`'s component check: loads a built policy component in wasmtime (the
`wasmtime` PyPI package, the engine of the gateway's plugin host), calls it with the sample
calls of a samples file, and compares each answer with the one the file expects.

    python run_component.py WORLD COMPONENT.wasm SAMPLES.json

The host side is the gateway's: key-value state in memory (for the run), a fixed clock
(`now_ms` of the samples file, or of a call), log lines on stderr, the configuration of each call, and the
WASI interfaces the gateway links, with nothing granted. Each call gets a fresh instance, as with the gateway's `isolation = "per-call"`.
Prints one line per call; exits 1 when a call does not answer what it expects, 2 when the
component or the samples file cannot be used.
"""

import importlib.metadata
import json
import math
import sys
import time

import wasmtime
from wasmtime import component as wc

# What each world exports, and how a sample names the call.
WORLDS = {
    "reward": ("on-usage", "on-report"),
    "meter": ("quote", "charge"),
    "router": ("route",),
    "rate-limiter": ("admit", "settle"),
}
POLICY_IMPORT = "garage:policy/"
# The WASI 0.2 interfaces the gateway links, with nothing granted (no files, environment,
# arguments, sockets): Rust's std on wasm32-wasip2 imports wasi:cli and wasi:io.
ALLOWED_WASI = ("wasi:cli/", "wasi:io/", "wasi:clocks/", "wasi:random/", "wasi:filesystem/",
                "wasi:sockets/")
DEFAULT_NOW_MS = 1_700_000_000_000

# The records of the reward world (wit/v0.5), field by field with the value a sample that
# leaves the field out gets: zero, empty, none, or the enum's first case.
USAGE_EVENT = {
    "request_id": "", "key_id": "", "model": "", "prompt_tokens": 0, "completion_tokens": 0,
    "cached_tokens": 0, "latency_ms": 0, "ttft_ms": 0, "backend": "", "rig": "", "operator": "",
    "started_at_ms": 0, "finished_at_ms": 0, "batch": False, "counted_by": "gateway",
    "reported_prompt_tokens": None, "reported_completion_tokens": None, "trust": "configured",
    "price": None,
}
RIG_REPORT = {
    "rig": "", "operator": "", "period_ms": 0, "uptime_ms": 0, "gpu_seconds": 0.0, "at_ms": 0,
}
PRICE = {"prompt_per_thousand": 0.0, "completion_per_thousand": 0.0}
QUOTE_REQUEST = {"model": "", "batch": False}
# The router world (wit/v0.4): the request, each candidate (0.4.0's, with its trust) and what
# `candidates.describe` tells of it, which a sample gives beside the candidate's fields. A
# router of 0.6.0 (wit/v0.6, the Rust SDK's) takes the same candidates as columns.
ROUTE_REQUEST = {
    "model": "", "key_id": "", "prefix_hash": 0, "prompt_tokens": 0, "max_tokens": 0,
    "stream": False,
}
CANDIDATE = {
    "in_flight": 0, "engine_running": 0, "engine_waiting": 0, "kv_cache_usage": 0.0,
    "tokens_per_second": 0.0, "latency_ms": 0.0, "gpu_utilization": 0.0,
    "gpu_memory_free_bytes": 0, "trust": "configured",
}
CANDIDATE_INFO = {"id": "", "rig": "", "operator": "", "labels": {}}
# The rate limiter world (0.3.0's, which 0.4.0 keeps; 0.7.0's `admit` answers `unlimited_ms` too).
ADMISSION = {"request_id": "", "key_id": "", "model": "", "reserved_tokens": 0, "key_metadata": ""}
SETTLEMENT = {"request_id": "", "key_id": "", "model": "", "reserved_tokens": 0, "used_tokens": 0}
ENUMS = {
    "counted_by": ("gateway", "backend"),
    "trust": ("configured", "unverified", "verified", "suspect", "quarantined"),
}


class SampleError(Exception):
    """A samples file that cannot be used as written."""


def record(fields, sample, what):
    """A WIT record for wasmtime-py (attributes in kebab-case) from a sample in snake_case."""
    if not isinstance(sample, dict):
        raise SampleError(f"{what}: expected a JSON object, got {json.dumps(sample)}")
    unknown = sorted(set(sample) - set(fields))
    if unknown:
        raise SampleError(f"{what}: unknown field `{unknown[0]}` (fields: {', '.join(fields)})")
    # wasmtime-py's own record class: an option<record> recognises its value by it.
    value = wc.Record()
    for name, default in fields.items():
        given = sample.get(name, default)
        if name in ENUMS and given not in ENUMS[name]:
            raise SampleError(f"{what}: `{name}` must be one of {', '.join(ENUMS[name])}")
        if name == "price" and given is not None:
            given = record(PRICE, given, f"{what}.price")
        elif isinstance(default, float) and isinstance(given, int):
            given = float(given)
        setattr(value, name.replace("_", "-"), given)
    return value


def fnv1a(text):
    """The candidate's `key`: FNV-1a (64-bit) of its id's UTF-8 bytes, as the gateway makes it."""
    value = 0xCBF29CE484222325
    for byte in text.encode():
        value = ((value ^ byte) * 0x100000001B3) % (1 << 64)
    return value


def candidates(sample, what):
    """The `candidate` records of a route call and the descriptions `describe` gives."""
    if not isinstance(sample, list):
        raise SampleError(f"{what}: `candidates` takes a list of candidates")
    records, infos = [], []
    for i, given in enumerate(sample):
        where = f"{what}, candidate {i + 1}"
        if not isinstance(given, dict):
            raise SampleError(f"{where}: expected a JSON object, got {json.dumps(given)}")
        own = {k: v for k, v in given.items() if k not in CANDIDATE_INFO}
        about = {k: v for k, v in given.items() if k in CANDIDATE_INFO}
        labels = about.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise SampleError(f"{where}: `labels` takes an object of strings")
        candidate = record(CANDIDATE, own, where)
        candidate.key = fnv1a(str(about.get("id", "")))
        records.append(candidate)
        info = wc.Record()
        for name in ("id", "rig", "operator"):
            setattr(info, name, str(about.get(name, "")))
        info.labels = [(k, v) for k, v in labels.items()]
        infos.append(info)
    return records, infos


def takes_columns(engine, component):
    """Whether the router's `route` takes its candidates as columns (garage:policy@0.6.0's
    `candidate-columns`, a record of lists) rather than a list of records."""
    route = component.type.exports(engine).get("route")
    params = getattr(getattr(route, "ty", None), "params", None) or []
    return len(params) == 2 and isinstance(params[1][1], wc.RecordType)


def columns(records):
    """The `candidate-columns` of candidate records: a list per field, trust as the enum's
    position (0 configured ... 4 quarantined)."""
    value = wc.Record()
    for name in ["key", *CANDIDATE]:
        field = name.replace("_", "-")
        cells = [getattr(r, field) for r in records]
        if name == "trust":
            # wasmtime-py passes a list<u8> as bytes.
            cells = bytes(ENUMS["trust"].index(cell) for cell in cells)
        setattr(value, field, cells)
    return value


class Host:
    """The gateway's side of the contract for one run."""

    def __init__(self, engine, world, now_ms, wasi):
        self.kv = {}
        self.config_text = "{}"
        self.now_ms = now_ms
        self.infos = []
        self.wasi = wasi
        self.linker = wc.Linker(engine)
        if wasi:
            self.linker.add_wasip2()
        root = self.linker.root()
        with root.add_instance("garage:policy/kv@0.2.0") as kv:
            kv.add_func("get", lambda _s, key: self.kv.get(key))
            kv.add_func("set", lambda _s, key, value, _ttl: self.kv.__setitem__(key, bytes(value)))
            kv.add_func("delete", lambda _s, key: self.kv.pop(key, None) and None)
            kv.add_func("incr", self.incr)
            kv.add_func("reserve", self.reserve)
        with root.add_instance("garage:policy/clock@0.2.0") as clock:
            clock.add_func("now-ms", lambda _s: self.now_ms)
        with root.add_instance("garage:policy/log@0.2.0") as log:
            log.add_func("log", lambda _s, level, message: print(
                f"      log {level}: {message}", file=sys.stderr))
        with root.add_instance("garage:policy/config@0.2.0") as config:
            config.add_func("get", lambda _s: self.config_text)
        if world == "router":
            with root.add_instance("garage:policy/candidates@0.2.0") as described:
                described.add_func("describe", lambda _s, index: (
                    self.infos[index] if index < len(self.infos) else None))
        if world == "meter":
            # No market: the samples run with no rigs and no demand to tell.
            with root.add_instance("garage:policy/market@0.5.0") as market:
                market.add_func("get", lambda _s, _model: None)
        root.close()

    def incr(self, _s, key, delta, _ttl):
        value = int(self.kv.get(key, b"0")) + delta
        self.kv[key] = str(value).encode()
        return value

    def reserve(self, _s, key, amount, limit, _ttl):
        value = int(self.kv.get(key, b"0")) + amount
        if value > limit:
            return None
        self.kv[key] = str(value).encode()
        return value

    def call(self, engine, component, export, *arguments):
        store = wasmtime.Store(engine)
        if self.wasi:
            store.set_wasi(wasmtime.WasiConfig())  # nothing inherited or granted
        instance = self.linker.instantiate(store, component)
        func = instance.get_func(store, export)
        if func is None:
            raise SampleError(f"the component does not export `{export}`")
        result = func(store, *arguments)
        try:
            func.post_return(store)
        except Exception:  # noqa: BLE001 - a no-op, or refused, on newer wasmtime-py
            pass
        return result


def answer(result):
    """One result<T, string> as JSON-like data: wasmtime-py gives an error result as its text,
    which becomes {"err": text}."""
    return {"err": result} if isinstance(result, str) else plain(result)


def plain(value):
    """Records as objects with snake_case fields, lists as lists."""
    if isinstance(value, list):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {name.replace("-", "_"): plain(field) for name, field in vars(value).items()}


def matches(got, want):
    if isinstance(want, dict) and set(want) in ({"err"}, {"trap"}):
        key = next(iter(want))
        return isinstance(got, dict) and key in got and want[key] in got[key]
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return all(matches(g, w) for g, w in zip(got, want))
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(want, dict) and isinstance(got, dict) and set(want) <= set(got):
        # The fields a sample names; others (budgets a meter did not use) are not compared.
        return all(matches(got[k], w) for k, w in want.items())
    return got == want


def run_call(host, engine, component, sample, defaults, index):
    name = sample.get("name", f"call {index + 1}")
    default_config, default_now_ms = defaults
    host.now_ms = sample.get("now_ms", default_now_ms)
    if not isinstance(host.now_ms, int) or host.now_ms < 0:
        raise SampleError(f"{name}: `now_ms` takes milliseconds since the epoch")
    config = sample.get("config", default_config)
    host.config_text = config if isinstance(config, str) else json.dumps(config)
    if "on-usage" in sample or "charge" in sample:
        export = "on-usage" if "on-usage" in sample else "charge"
        events = sample[export]
        if not isinstance(events, list):
            raise SampleError(f"{name}: `{export}` takes a list of usage events")
        argument = [record(USAGE_EVENT, e, f"{name}, event {i + 1}") for i, e in enumerate(events)]
        got = [answer(result) for result in host.call(engine, component, export, argument)]
    elif "on-report" in sample:
        argument = record(RIG_REPORT, sample["on-report"], f"{name}, report")
        got = answer(host.call(engine, component, "on-report", argument))
    elif "quote" in sample:
        argument = record(QUOTE_REQUEST, sample["quote"], f"{name}, quote request")
        got = answer(host.call(engine, component, "quote", argument))
    elif "route" in sample:
        route = sample["route"]
        if not isinstance(route, dict):
            raise SampleError(f"{name}: `route` takes an object with `request` and `candidates`")
        request = record(ROUTE_REQUEST, route.get("request", {}), f"{name}, request")
        listed, host.infos = candidates(route.get("candidates"), name)
        if takes_columns(engine, component):
            listed = columns(listed)
        got = answer(host.call(engine, component, "route", request, listed))
    elif "admit" in sample:
        argument = record(ADMISSION, sample["admit"], f"{name}, admission")
        got = plain(host.call(engine, component, "admit", argument))
    elif "settle" in sample:
        argument = record(SETTLEMENT, sample["settle"], f"{name}, settlement")
        got = plain(host.call(engine, component, "settle", argument))
    else:
        raise SampleError(f"{name}: a call needs one of `on-usage`, `on-report` (reward), "
                          "`charge`, `quote` (meter), `route` (router), `admit`, `settle` "
                          "(rate-limiter)")
    return name, got


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    world, path, samples_path = sys.argv[1:]
    if world not in WORLDS:
        print(f"no sample calls for the {world} world yet (only {', '.join(WORLDS)})",
              file=sys.stderr)
        return 2
    try:
        with open(samples_path, encoding="utf-8") as file:
            samples = json.load(file)
    except (OSError, ValueError) as err:
        print(f"cannot read the samples {samples_path}: {err}", file=sys.stderr)
        return 2
    if not isinstance(samples, dict) or not isinstance(samples.get("calls"), list):
        print(f"{samples_path}: expected an object with a `calls` list", file=sys.stderr)
        return 2

    config = wasmtime.Config()
    # wasmtime's on-disk cache of compiled code: a component compiles once per version.
    config.cache = True
    engine = wasmtime.Engine(config)
    started = time.perf_counter()
    try:
        component = wc.Component.from_file(engine, path)
    except Exception as err:  # noqa: BLE001 - any load failure is the answer
        print(f"{path} is not a component wasmtime can load: {err}", file=sys.stderr)
        return 2
    compiled_s = time.perf_counter() - started
    imports = sorted(component.type.imports(engine))
    exports = set(component.type.exports(engine))
    version = importlib.metadata.version("wasmtime")
    print(f"  {path}: compiled in {compiled_s:.2f} s by wasmtime {version}")
    wasi = [name for name in imports if name.startswith(ALLOWED_WASI)]
    outside = [name for name in imports
               if not name.startswith(POLICY_IMPORT) and name not in wasi]
    missing = [name for name in WORLDS[world] if name not in exports]
    if outside or missing:
        if outside:
            print(f"  the component imports what the gateway does not offer: {', '.join(outside)}",
                  file=sys.stderr)
        if missing:
            print(f"  the component does not export {', '.join(missing)}: not the {world} world",
                  file=sys.stderr)
        return 1

    now_ms = samples.get("now_ms", DEFAULT_NOW_MS)
    host = Host(engine, world, now_ms, bool(wasi))
    failed = 0
    for index, sample in enumerate(samples["calls"]):
        started = time.perf_counter()
        try:
            defaults = (samples.get("config", {}), now_ms)
            name, got = run_call(host, engine, component, sample, defaults, index)
        except SampleError as err:
            print(f"{samples_path}: {err}", file=sys.stderr)
            return 2
        except Exception as err:  # noqa: BLE001 - a trap: the gateway would count a fault
            name, got = sample.get("name", f"call {index + 1}"), {"trap": str(err).splitlines()[0]}
        took_ms = (time.perf_counter() - started) * 1e3
        want = sample.get("expect")
        ok = want is not None and matches(got, want)
        failed += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name} ({took_ms:.1f} ms)")
        if not ok:
            print(f"       got:  {json.dumps(got)}")
            print(f"       want: {json.dumps(want)}")
    calls = len(samples["calls"])
    print(f"  {calls - failed} of {calls} sample calls answered as expected")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
