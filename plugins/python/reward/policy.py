"""The reward policy itself, in plain Python: no WIT bindings here, so it can be unit tested
with any Python (`python3 -m unittest discover -s plugins/python/reward -p 'test_*.py'`).

The same policy as the Rust default (`plugins/guests/reward`), to the last bit of every float:

- a served request pays `(prompt + completion tokens) / 1000 * points_per_1k_tokens * weight`,
  `weight` being `model_weights[model]` or else `default_weight`, times `batch_weight` for Batch
  API requests; reason `tokens`, or `batch-tokens` for batch requests;
- a rig report pays `uptime_ms / 3_600_000 * points_per_uptime_hour` (uptime capped at the
  period; reason `uptime`) and `gpu_seconds / 3600 * points_per_gpu_hour` (reason `gpu-hours`);
- no award without an operator (static upstreams) or for zero points.

Config, every field optional (the defaults shown); an unknown field is an error, so that a
misspelled setting is not silently ignored:

    {"points_per_1k_tokens": 1.0, "model_weights": {}, "default_weight": 1.0,
     "batch_weight": 1.0, "points_per_uptime_hour": 1.0, "points_per_gpu_hour": 0.0}
"""

import json
import math

DEFAULTS = {
    "points_per_1k_tokens": 1.0,
    "model_weights": {},
    "default_weight": 1.0,
    "batch_weight": 1.0,
    "points_per_uptime_hour": 1.0,
    "points_per_gpu_hour": 0.0,
}

MS_PER_HOUR = 3_600_000.0
U64_MAX = 2**64 - 1


class ConfigError(ValueError):
    """A config that cannot be used; its message starts with `invalid plugin config`."""


def _non_negative(value, what):
    # bool is an int in Python: refuse `true` where a number is expected.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"invalid plugin config: {what} must be a number")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"invalid plugin config: {what} must be a number >= 0")
    return value


def parse_config(text):
    """The plugin's config JSON (the `config` import's text) with defaults filled in."""
    try:
        raw = json.loads(text) if text.strip() else {}
    except ValueError as err:
        raise ConfigError(f"invalid plugin config: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError("invalid plugin config: not a JSON object")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"invalid plugin config: unknown field `{unknown[0]}`, expected one of "
            + ", ".join(f"`{name}`" for name in DEFAULTS)
        )
    weights = raw.get("model_weights", {})
    if not isinstance(weights, dict):
        raise ConfigError("invalid plugin config: model_weights must be an object")
    cfg = {
        name: _non_negative(raw.get(name, default), name)
        for name, default in DEFAULTS.items()
        if name != "model_weights"
    }
    cfg["model_weights"] = {
        model: _non_negative(weight, f"model_weights[{model!r}]")
        for model, weight in weights.items()
    }
    return cfg


def _award(operator, points, reason):
    return [(operator, points, reason)] if operator and points > 0 else []


def usage_awards(cfg, operator, model, prompt_tokens, completion_tokens, batch):
    """(operator, points, reason) for one served request: none or one."""
    weight = cfg["model_weights"].get(model, cfg["default_weight"])
    batch_weight, reason = (cfg["batch_weight"], "batch-tokens") if batch else (1.0, "tokens")
    tokens = float(min(prompt_tokens + completion_tokens, U64_MAX))
    points = tokens / 1000.0 * cfg["points_per_1k_tokens"] * weight * batch_weight
    return _award(operator, points, reason)


def report_awards(cfg, operator, period_ms, uptime_ms, gpu_seconds):
    """(operator, points, reason) for a rig's periodic report: uptime, then GPU hours."""
    if period_ms > 0:
        uptime_ms = min(uptime_ms, period_ms)
    uptime = float(uptime_ms) / MS_PER_HOUR * cfg["points_per_uptime_hour"]
    # Like Rust's f64::max(0.0): a negative or NaN count counts as 0.
    gpu_seconds = gpu_seconds if gpu_seconds > 0 else 0.0
    gpu = gpu_seconds / 3600.0 * cfg["points_per_gpu_hour"]
    return _award(operator, uptime, "uptime") + _award(operator, gpu, "gpu-hours")
