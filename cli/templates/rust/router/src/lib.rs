//! {{name}}: a router. Least loaded first, load counted in seconds of work: a candidate's
//! requests (in flight here, running and waiting in its engine, plus this one) over its
//! measured tokens per second. A rig not measured yet counts at `unmeasured_tps` (config).
use garage_plugin_sdk::{Candidate, Candidates, Host, RouteRequest, Router, config};

pub struct Policy;

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Config {
    unmeasured_tps: Option<f64>,
}

impl Router for Policy {
    fn route(
        host: &dyn Host,
        _: &RouteRequest,
        candidates: &Candidates,
    ) -> Result<Vec<u32>, String> {
        let config: Config = config::parse(host)?;
        let unmeasured = config.unmeasured_tps.unwrap_or(10.0);
        let seconds = |c: &Candidate| {
            let tps = f64::from(c.tokens_per_second);
            let speed = if tps.is_finite() && tps > 0.0 {
                tps
            } else {
                unmeasured
            };
            (c.load() + 1) as f64 / speed
        };
        let seconds: Vec<f64> = candidates.iter().map(|c| seconds(&c)).collect();
        let mut order: Vec<u32> = (0..candidates.len() as u32).collect();
        // A stable sort: ties keep the gateway's order. The gateway tries the first few only
        // (`dispatch.max_attempts`): answering them alone would do.
        order.sort_by(|&a, &b| seconds[a as usize].total_cmp(&seconds[b as usize]));
        Ok(order)
    }
}
garage_plugin_sdk::export_router!(Policy);

#[cfg(test)]
mod tests;
