//! {{name}}: a reward policy. Pays rig operators for verified work (tokens the gateway counted
//! on a rig that passed its checks) by model weight, and for the hours their rigs stay up.
use garage_plugin_sdk::{Award, Host, Reward, RigReport, UsageEvent, config};

pub struct Policy;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "one")]
    points_per_1k_tokens: f64,
    #[serde(default)]
    model_weights: std::collections::BTreeMap<String, f64>,
    #[serde(default)]
    points_per_uptime_hour: f64,
}
fn one() -> f64 { 1.0 }

impl Reward for Policy {
    fn on_usage(host: &dyn Host, event: &UsageEvent) -> Result<Vec<Award>, String> {
        let config: Config = config::parse(host)?;
        let weight = config.model_weights.get(&event.model).copied().unwrap_or(1.0);
        let tokens = event.prompt_tokens.saturating_add(event.completion_tokens) as f64;
        let points = tokens / 1000.0 * config.points_per_1k_tokens * weight;
        Ok(pay(&event.operator, if event.is_verified_work() { points } else { 0.0 }, "tokens"))
    }
    fn on_report(host: &dyn Host, report: &RigReport) -> Result<Vec<Award>, String> {
        let config: Config = config::parse(host)?;
        let hours = report.uptime_ms.min(report.period_ms) as f64 / 3_600_000.0;
        Ok(pay(&report.operator, hours * config.points_per_uptime_hour, "uptime"))
    }
}
garage_plugin_sdk::export_reward!(Policy);

/// One award, or none when there is nobody (a static upstream) or nothing to pay.
fn pay(operator: &str, points: f64, reason: &str) -> Vec<Award> {
    let paid = !operator.is_empty() && points > 0.0;
    paid.then(|| Award::new(operator, points, reason)).into_iter().collect()
}

#[cfg(test)]
mod tests;
