"""{{name}}: a router. Least loaded first, load counted in seconds of work: a candidate's
requests (in flight here, running and waiting in its engine, plus this one) over its measured
tokens per second. A rig not measured yet counts at `unmeasured_tps` (config)."""
import math

from garage_policy import Candidate, Host, RouteRequest, load_config, router

DEFAULTS = {"unmeasured_tps": 10.0}


@router
def route(host: Host, request: RouteRequest, candidates: list[Candidate]) -> list[int]:
    cfg = load_config(host, DEFAULTS)

    def seconds(index: int) -> float:
        c = candidates[index]
        tps = c.tokens_per_second
        speed = tps if math.isfinite(tps) and tps > 0 else cfg.unmeasured_tps
        return (c.load() + 1) / speed if speed > 0 else math.inf

    # `sorted` is stable: ties keep the gateway's order.
    return sorted(range(len(candidates)), key=seconds)
