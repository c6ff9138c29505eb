//! Default reward: points to rig operators for the verified tokens their rigs serve, weighted by
//! the size of the model, and for the hours their rigs stay up.
//!
//! Config (every field optional; the defaults shown):
//!
//! ```json
//! {
//!   "points_per_1k_tokens": 1.0,
//!   "model_weights": {"llama-3.1-70b": 8.0},
//!   "default_weight": 1.0,
//!   "batch_weight": 1.0,
//!   "points_per_uptime_hour": 1.0,
//!   "points_per_gpu_hour": 0.0,
//!   "verified_only": true,
//!   "gateway_counted_only": true
//! }
//! ```
//!
//! Only verified work pays: tokens the gateway counted itself with the model's tokenizer
//! (`counted_by: gateway`, so what a rig reports changes nothing), served by a rig that had
//! passed the gateway's spot checks (`trust: verified`). A rig not verified yet, suspect or
//! quarantined, and a model without a configured tokenizer, earn no token points; an operator
//! who wants to pay them anyway turns `verified_only` or `gateway_counted_only` off.
//!
//! A request pays `(prompt + completion tokens) / 1000 × points_per_1k_tokens × weight` with the
//! model's weight (`model_weights`, else `default_weight`: a 70B model costs a rig far more per
//! token than an 8B one), times `batch_weight` for Batch API requests (which can wait for idle
//! capacity, so an operator may pay them less), reason `tokens` or `batch-tokens`. A rig report
//! pays `uptime hours × points_per_uptime_hour` (reason `uptime`, uptime capped at the period) and
//! `gpu_seconds / 3600 × points_per_gpu_hour` (reason `gpu-hours`).
//!
//! Requests served by static upstreams (no operator) and zero amounts earn no award. The awards
//! are a pure function of the event and the config, so a redelivered event earns the same
//! awards, which the gateway deduplicates by request id. State: none.

use std::collections::BTreeMap;

use garage_plugin_sdk::{
    Award, CountedBy, Host, LogLevel, Reward, RigReport, Trust, UsageEvent, config,
};
use serde::Deserialize;

/// Points per token served, by model, and per uptime hour.
pub struct TokensAndUptime;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    points_per_1k_tokens: f64,
    model_weights: BTreeMap<String, f64>,
    default_weight: f64,
    batch_weight: f64,
    points_per_uptime_hour: f64,
    points_per_gpu_hour: f64,
    /// Pay tokens only for requests a verified rig served.
    verified_only: bool,
    /// Pay tokens only when the gateway counted them.
    gateway_counted_only: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            points_per_1k_tokens: 1.0,
            model_weights: BTreeMap::new(),
            default_weight: 1.0,
            batch_weight: 1.0,
            points_per_uptime_hour: 1.0,
            points_per_gpu_hour: 0.0,
            verified_only: true,
            gateway_counted_only: true,
        }
    }
}

const MS_PER_HOUR: f64 = 3_600_000.0;

impl Reward for TokensAndUptime {
    fn on_usage(host: &dyn Host, event: &UsageEvent) -> Result<Vec<Award>, String> {
        let config = load_config(host)?;
        let unverified = config.verified_only && event.trust != Trust::Verified;
        let rig_counted = config.gateway_counted_only && event.counted_by != CountedBy::Gateway;
        if unverified || rig_counted {
            return Ok(Vec::new());
        }
        let weight = config
            .model_weights
            .get(&event.model)
            .copied()
            .unwrap_or(config.default_weight);
        let (batch_weight, reason) = if event.batch {
            (config.batch_weight, "batch-tokens")
        } else {
            (1.0, "tokens")
        };
        let tokens = event.prompt_tokens.saturating_add(event.completion_tokens) as f64;
        let points = tokens / 1_000.0 * config.points_per_1k_tokens * weight * batch_weight;
        Ok(award(&event.operator, points, reason).into_iter().collect())
    }

    fn on_report(host: &dyn Host, report: &RigReport) -> Result<Vec<Award>, String> {
        let config = load_config(host)?;
        let uptime_ms = if report.period_ms > 0 {
            report.uptime_ms.min(report.period_ms)
        } else {
            report.uptime_ms
        };
        let uptime = uptime_ms as f64 / MS_PER_HOUR * config.points_per_uptime_hour;
        let gpu = report.gpu_seconds.max(0.0) / 3_600.0 * config.points_per_gpu_hour;
        Ok([
            award(&report.operator, uptime, "uptime"),
            award(&report.operator, gpu, "gpu-hours"),
        ]
        .into_iter()
        .flatten()
        .collect())
    }
}

garage_plugin_sdk::export_reward!(TokensAndUptime);

/// An award, unless there is nobody to pay or nothing to pay them.
fn award(operator: &str, points: f64, reason: &str) -> Option<Award> {
    (!operator.is_empty() && points > 0.0).then(|| Award::new(operator, points, reason))
}

fn load_config(host: &dyn Host) -> Result<std::sync::Arc<Config>, String> {
    let config = config::cached::<Config>(host)
        .map_err(|error| error.to_string())
        .and_then(|config| {
            let weights = [
                config.points_per_1k_tokens,
                config.default_weight,
                config.batch_weight,
                config.points_per_uptime_hour,
                config.points_per_gpu_hour,
            ];
            let all_valid = weights
                .iter()
                .chain(config.model_weights.values())
                .all(|w| w.is_finite() && *w >= 0.0);
            if all_valid {
                Ok(config)
            } else {
                Err("invalid plugin config: weights and points must be numbers >= 0".to_owned())
            }
        });
    config.inspect_err(|message| host.log(LogLevel::Error, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use garage_plugin_sdk::testing::MemoryHost;

    const CONFIG: &str = r#"{
        "points_per_1k_tokens": 2.0,
        "model_weights": {"llama-3.1-70b": 8.0},
        "batch_weight": 0.5,
        "points_per_uptime_hour": 10.0,
        "points_per_gpu_hour": 1.0
    }"#;

    fn served(model: &str, prompt: u64, completion: u64) -> UsageEvent {
        UsageEvent {
            request_id: "r1".into(),
            model: model.into(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            rig: "rig-1".into(),
            operator: "alice".into(),
            counted_by: CountedBy::Gateway,
            trust: Trust::Verified,
            ..UsageEvent::default()
        }
    }

    #[test]
    fn only_verified_gateway_counted_work_pays_by_default() {
        let host = MemoryHost::new();
        let paid = TokensAndUptime::on_usage(&host, &served("m", 1_000, 0)).unwrap();
        assert_eq!(paid, vec![Award::new("alice", 1.0, "tokens")]);
        for trust in [Trust::Unverified, Trust::Suspect, Trust::Quarantined] {
            let event = UsageEvent {
                trust,
                ..served("m", 1_000, 0)
            };
            assert_eq!(
                TokensAndUptime::on_usage(&host, &event),
                Ok(vec![]),
                "{trust:?}"
            );
        }
        // What the rig reported, however honest it looks, is not what pays.
        let reported = UsageEvent {
            counted_by: CountedBy::Backend,
            ..served("m", 1_000, 0)
        };
        assert_eq!(TokensAndUptime::on_usage(&host, &reported), Ok(vec![]));
    }

    #[test]
    fn an_operator_can_pay_unverified_or_rig_counted_work() {
        let host =
            MemoryHost::with_config(r#"{"verified_only": false, "gateway_counted_only": false}"#);
        let event = UsageEvent {
            trust: Trust::Unverified,
            counted_by: CountedBy::Backend,
            ..served("m", 1_000, 0)
        };
        assert_eq!(
            TokensAndUptime::on_usage(&host, &event),
            Ok(vec![Award::new("alice", 1.0, "tokens")])
        );
    }

    #[test]
    fn tokens_pay_by_model_weight() {
        let host = MemoryHost::with_config(CONFIG);
        let big = TokensAndUptime::on_usage(&host, &served("llama-3.1-70b", 300, 200)).unwrap();
        assert_eq!(big, vec![Award::new("alice", 0.5 * 2.0 * 8.0, "tokens")]);
        let small = TokensAndUptime::on_usage(&host, &served("qwen-7b", 300, 200)).unwrap();
        assert_eq!(small, vec![Award::new("alice", 0.5 * 2.0, "tokens")]);
    }

    #[test]
    fn batch_tokens_pay_the_batch_weight() {
        let host = MemoryHost::with_config(CONFIG);
        let batch = UsageEvent {
            batch: true,
            ..served("qwen-7b", 1_000, 0)
        };
        let awards = TokensAndUptime::on_usage(&host, &batch).unwrap();
        assert_eq!(awards, vec![Award::new("alice", 1.0, "batch-tokens")]);
    }

    #[test]
    fn static_upstreams_and_empty_requests_earn_nothing() {
        let host = MemoryHost::with_config(CONFIG);
        let upstream = UsageEvent {
            operator: String::new(),
            rig: String::new(),
            ..served("qwen-7b", 1_000, 1_000)
        };
        assert_eq!(TokensAndUptime::on_usage(&host, &upstream), Ok(vec![]));
        assert_eq!(
            TokensAndUptime::on_usage(&host, &served("qwen-7b", 0, 0)),
            Ok(vec![])
        );
    }

    #[test]
    fn reports_pay_uptime_capped_at_the_period_and_gpu_hours() {
        let host = MemoryHost::with_config(CONFIG);
        let report = RigReport {
            rig: "rig-1".into(),
            operator: "alice".into(),
            period_ms: 1_800_000,
            uptime_ms: 2_000_000,
            gpu_seconds: 7_200.0,
            at_ms: 0,
        };
        let awards = TokensAndUptime::on_report(&host, &report).unwrap();
        assert_eq!(
            awards,
            vec![
                Award::new("alice", 5.0, "uptime"),
                Award::new("alice", 2.0, "gpu-hours"),
            ]
        );
    }

    #[test]
    fn defaults_pay_a_point_per_thousand_tokens_and_per_uptime_hour() {
        let host = MemoryHost::new();
        let awards = TokensAndUptime::on_usage(&host, &served("any", 1_500, 500)).unwrap();
        assert_eq!(awards, vec![Award::new("alice", 2.0, "tokens")]);
        let report = RigReport {
            operator: "alice".into(),
            period_ms: 3_600_000,
            uptime_ms: 3_600_000,
            gpu_seconds: 3_600.0,
            ..RigReport::default()
        };
        let awards = TokensAndUptime::on_report(&host, &report).unwrap();
        assert_eq!(awards, vec![Award::new("alice", 1.0, "uptime")]);
    }

    #[test]
    fn bad_config_is_an_error() {
        for bad in [r#"{"default_weight": -1}"#, r#"{"model_weight": {}}"#] {
            let host = MemoryHost::with_config(bad);
            let error = TokensAndUptime::on_usage(&host, &served("m", 1, 1)).unwrap_err();
            assert!(error.starts_with("invalid plugin config"), "{bad}: {error}");
            assert!(
                host.logged(LogLevel::Error, "invalid plugin config"),
                "{bad}"
            );
        }
    }
}
