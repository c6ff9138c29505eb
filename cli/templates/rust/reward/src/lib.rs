//! {{name}}: a reward policy. Pays rig operators for verified work (tokens the gateway counted
//! on a rig that passed its checks) by model weight, and for the hours their rigs stay up.
use garage_plugin_sdk::{Award, Host, Reward, RigReport, UsageEvent, config};

pub struct Policy;

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Config {
    points_per_1k_tokens: Option<f64>,
    model_weights: std::collections::BTreeMap<String, f64>,
    points_per_uptime_hour: f64,
}

impl Reward for Policy {
    fn on_usage(host: &dyn Host, event: &UsageEvent) -> Result<Vec<Award>, String> {
        let config: Config = config::parse(host)?;
        if !event.is_verified_work() {
            return Ok(Vec::new());
        }
        let weight = config.model_weights.get(&event.model).unwrap_or(&1.0);
        let tokens = event.prompt_tokens.saturating_add(event.completion_tokens) as f64;
        let rate = config.points_per_1k_tokens.unwrap_or(1.0) * weight;
        Ok(pay(&event.operator, tokens / 1000.0 * rate, "tokens"))
    }
    fn on_report(host: &dyn Host, report: &RigReport) -> Result<Vec<Award>, String> {
        let config: Config = config::parse(host)?;
        let hours = report.uptime_ms.min(report.period_ms) as f64 / 3_600_000.0;
        let points = hours * config.points_per_uptime_hour;
        Ok(pay(&report.operator, points, "uptime"))
    }
}
garage_plugin_sdk::export_reward!(Policy);

/// One award, or none when there is nobody (a static upstream) or nothing to pay.
fn pay(operator: &str, points: f64, reason: &str) -> Vec<Award> {
    let paid = !operator.is_empty() && points > 0.0;
    paid.then(|| Award::new(operator, points, reason))
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests;
