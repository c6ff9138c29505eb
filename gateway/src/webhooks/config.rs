//! The `[webhooks]` section: how deliveries are tried, and how long the usage export reaches
//! back.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Webhook deliveries and the usage export (docs/money.md).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Attempts per event and endpoint, the first included; then the delivery is `failed`.
    pub max_attempts: u32,
    /// The wait before the second attempt; each later wait doubles, up to `backoff_max_ms`,
    /// and is jittered down by up to half so that a receiver coming back is not hit by every
    /// delivery at once.
    pub backoff_base_ms: u64,
    /// The longest wait between two attempts.
    pub backoff_max_ms: u64,
    /// One attempt's time to connect, send and get the answer's head and first bytes.
    pub timeout_ms: u64,
    /// How often a replica looks for deliveries that are due (retries, and those another
    /// replica queued); an event emitted here is sent at once.
    pub poll_interval_ms: u64,
    /// How far back `GET /admin/usage/events` reaches: the per-hour copy of the ledger it reads
    /// is dropped after this many days (on the embedded store it also keeps no more than
    /// about `usage.ledger_max_entries` requests).
    pub export_retention_days: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            // 10 s, 20 s, 40 s … capped at 2 h: twelve attempts span about five hours, which
            // covers a receiver's redeploy or a night's outage without paging anyone.
            max_attempts: 12,
            backoff_base_ms: 10_000,
            backoff_max_ms: 2 * 3_600_000,
            // Receivers should answer at once and work afterwards (Standard Webhooks asks for
            // a quick 2xx); ten seconds is generous.
            timeout_ms: 10_000,
            poll_interval_ms: 1_000,
            // A month's invoice run, with a few days to spare.
            export_retention_days: 35,
        }
    }
}

impl WebhooksConfig {
    /// What a config may not say; the message names the field.
    pub fn problem(&self) -> Option<String> {
        if self.max_attempts == 0 {
            return Some("webhooks.max_attempts must be at least 1".into());
        }
        if self.timeout_ms == 0 {
            return Some("webhooks.timeout_ms must be at least 1".into());
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            return Some(format!(
                "webhooks.backoff_max_ms = {} is below webhooks.backoff_base_ms = {}",
                self.backoff_max_ms, self.backoff_base_ms
            ));
        }
        if self.poll_interval_ms == 0 {
            return Some("webhooks.poll_interval_ms must be at least 1".into());
        }
        if self.export_retention_days == 0 {
            return Some("webhooks.export_retention_days must be at least 1".into());
        }
        None
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    /// The wait after failed attempt `attempt` (1 for the first) before the next: the base
    /// doubled per attempt, capped, less up to half of it at random (`jitter` in 0..1).
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(40);
        let full = self
            .backoff_base_ms
            .saturating_mul(1u64 << doublings)
            .min(self.backoff_max_ms);
        let jitter = jitter.clamp(0.0, 1.0);
        let wait = full - (full as f64 * jitter / 2.0) as u64;
        Duration::from_millis(wait.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_jitters_down_by_half_at_most() {
        let config = WebhooksConfig::default();
        let secs = |attempt, jitter| config.backoff(attempt, jitter).as_secs();
        assert_eq!(
            (1..=12).map(|n| secs(n, 0.0)).collect::<Vec<_>>(),
            [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 7200, 7200]
        );
        assert_eq!(secs(1, 1.0), 5);
        assert_eq!(secs(12, 1.0), 3600);
        assert_eq!(secs(u32::MAX, 0.5), 5400);
        // Eleven waits between twelve attempts: about five hours without jitter.
        let total: u64 = (1..=11).map(|n| secs(n, 0.0)).sum();
        assert_eq!(total, 17_430);
    }
}
