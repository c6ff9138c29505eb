"""{{name}}: a reward policy. Pays rig operators for verified work (tokens the gateway counted
on a rig that passed its checks) by model weight, and for the hours their rigs stay up."""
from garage_policy import Award, Host, RigReport, UsageEvent, load_config, pay, reward

DEFAULTS = {"points_per_1k_tokens": 1.0, "model_weights": {}, "points_per_uptime_hour": 0.0}


@reward
def tokens(host: Host, event: UsageEvent) -> list[Award]:
    cfg = load_config(host, DEFAULTS)
    if not event.is_verified_work():
        return []
    weight = cfg.model_weights.get(event.model, 1.0)
    return pay(event.operator, event.tokens() / 1000 * cfg.points_per_1k_tokens * weight, "tokens")


@reward.report
def uptime(host: Host, report: RigReport) -> list[Award]:
    cfg = load_config(host, DEFAULTS)
    return pay(report.operator, report.uptime_hours() * cfg.points_per_uptime_hour, "uptime")
