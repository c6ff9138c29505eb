//! {{name}}: a rate limiter. At most `rpm` requests per key and minute (config, or the key's
//! metadata `{"rpm": N}`), counted in the host's key-value store; a refusal says when the
//! minute ends (`retry-after`).
use garage_plugin_sdk::limits::FixedWindow;
use garage_plugin_sdk::{Admission, Decision, Host, RateLimitHeaders, RateLimiter, config};

pub struct Policy;

#[derive(serde::Deserialize, Default)]
struct Limits {
    rpm: Option<u64>,
}

impl RateLimiter for Policy {
    fn admit(host: &dyn Host, request: &Admission) -> Decision {
        let key: Limits =
            config::from_json("key metadata", &request.key_metadata).unwrap_or_default();
        // A bad config traps: the gateway's fail-open or fail-closed setting decides.
        let config: Limits = config::parse(host).unwrap_or_else(|err| panic!("{err}"));
        let Some(rpm) = key.rpm.or(config.rpm) else {
            // No limit for this key: the gateway need not ask again about its requests for a
            // minute (it forgets the promise when this config or the key's metadata changes).
            return Decision::allow(RateLimitHeaders::default()).unlimited_for(60_000);
        };
        let window = FixedWindow::new(60_000).at(host.now_ms());
        let counter = window.key(&format!("rpm:{}", request.key_id));
        let limit = i64::try_from(rpm).unwrap_or(i64::MAX);
        let used = host.kv_reserve(&counter, 1, limit, Some(window.reset_ms));
        let headers = RateLimitHeaders {
            limit_requests: Some(rpm),
            remaining_requests: Some(used.map_or(0, |used| rpm.saturating_sub(used as u64))),
            reset_requests_ms: Some(window.reset_ms),
            ..RateLimitHeaders::default()
        };
        match used {
            Some(_) => Decision::allow(headers).without_settle(),
            None => Decision::deny(
                window.reset_ms,
                format!("Rate limit reached: {rpm} requests per minute"),
                headers,
            ),
        }
    }
}
garage_plugin_sdk::export_rate_limiter!(Policy);

#[cfg(test)]
mod tests;
