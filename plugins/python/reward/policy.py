"""Pays rig operators for verified tokens, weighted by model size, and for uptime: the Rust
default reward (plugins/guests/reward), config and all, on the garage_policy library."""
from garage_policy import Award, CountedBy, Host, RigReport, Trust, UsageEvent
from garage_policy import load_config, pay, reward

DEFAULTS = {
    "points_per_1k_tokens": 1.0, "model_weights": {}, "default_weight": 1.0,
    "batch_weight": 1.0, "points_per_uptime_hour": 1.0, "points_per_gpu_hour": 0.0,
    "verified_only": True, "gateway_counted_only": True,
}


@reward
def tokens(host: Host, event: UsageEvent) -> list[Award]:
    cfg = load_config(host, DEFAULTS)
    if (cfg.verified_only and event.trust != Trust.VERIFIED) or (
            cfg.gateway_counted_only and event.counted_by != CountedBy.GATEWAY):
        return []
    weight = cfg.model_weights.get(event.model, cfg.default_weight)
    batch = cfg.batch_weight if event.batch else 1.0
    points = event.tokens() / 1000 * cfg.points_per_1k_tokens * weight * batch
    return pay(event.operator, points, "batch-tokens" if event.batch else "tokens")


@reward.report
def uptime(host: Host, report: RigReport) -> list[Award]:
    cfg = load_config(host, DEFAULTS)
    return (pay(report.operator, report.uptime_hours() * cfg.points_per_uptime_hour, "uptime")
            + pay(report.operator, report.gpu_hours() * cfg.points_per_gpu_hour, "gpu-hours"))
