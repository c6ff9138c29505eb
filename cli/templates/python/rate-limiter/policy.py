"""{{name}}: a rate limiter. At most `rpm` requests per key and minute (config, or the key's
metadata `{"rpm": N}`), counted in the host's key-value store; a refusal says when the minute
ends (`retry-after`)."""
import json

from garage_policy import Admission, Decision, Host, PolicyError, RateLimitHeaders, load_config
from garage_policy import rate_limiter

DEFAULTS = {"rpm": None}
WINDOW_MS = 60_000


def rpm_of(value, where: str) -> int | None:
    """`value` as a limit: `None` for no limit, else a whole number >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
            or not float(value).is_integer():
        raise PolicyError(f"invalid plugin config: {where} rpm must be a whole number >= 0")
    return int(value)


def key_rpm(request: Admission) -> int | None:
    """The key's own limit; metadata that is not an object with a valid `rpm` sets none."""
    try:
        metadata = json.loads(request.key_metadata or "{}")
        return rpm_of(metadata.get("rpm"), "key") if isinstance(metadata, dict) else None
    except (ValueError, PolicyError):
        return None


@rate_limiter
def admit(host: Host, request: Admission) -> Decision:
    # A bad config raises, which traps: the gateway's fail-open or fail-closed setting decides.
    configured = rpm_of(load_config(host, DEFAULTS).rpm, "config")
    rpm = key_rpm(request)
    if rpm is None:
        rpm = configured
    if rpm is None:
        return Decision(settle=False)
    now = host.now_ms()
    start = now - now % WINDOW_MS
    reset_ms = start + WINDOW_MS - now
    used = host.kv_reserve(f"rpm:{request.key_id}:{start}", 1, rpm, reset_ms)
    headers = {"limit_requests": rpm, "remaining_requests": 0 if used is None else rpm - used,
               "reset_requests_ms": reset_ms}
    if used is None:
        return Decision.deny(reset_ms, f"Rate limit reached: {rpm} requests per minute",
                             **headers)
    return Decision(headers=RateLimitHeaders(**headers), settle=False)
