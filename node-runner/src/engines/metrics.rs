//! An engine's load, read from vLLM's Prometheus `/metrics`.
//!
//! A small reader of the text exposition format rather than the `prometheus-parse` crate: that
//! crate's sample pattern is `\w+`, which stops at the `:` in every vLLM name
//! (`vllm:num_requests_running`), so it silently finds nothing.

use garage_node_protocol::EngineStats;

const RUNNING: &str = "vllm:num_requests_running";
const WAITING: &str = "vllm:num_requests_waiting";
const KV_CACHE: &str = "vllm:kv_cache_usage_perc";
/// vLLM's name for [`KV_CACHE`] before v0.10 (still what older engines export).
const KV_CACHE_LEGACY: &str = "vllm:gpu_cache_usage_perc";

/// The load in a `/metrics` page, or `None` when it holds none of vLLM's request gauges (not a
/// vLLM engine, or a truncated page).
///
/// Request counts are summed over label sets (one per model name, or per data-parallel rank);
/// KV-cache use is a fraction per cache, so label sets are averaged to stay within 0–1.
pub fn parse(text: &str) -> Option<EngineStats> {
    let mut running = Sum::default();
    let mut waiting = Sum::default();
    let mut kv_cache = Sum::default();
    let mut kv_cache_legacy = Sum::default();
    for (name, value) in samples(text) {
        match name {
            RUNNING => running.add(value),
            WAITING => waiting.add(value),
            KV_CACHE => kv_cache.add(value),
            KV_CACHE_LEGACY => kv_cache_legacy.add(value),
            _ => {}
        }
    }
    if running.count == 0 && waiting.count == 0 {
        return None;
    }
    let kv_cache = if kv_cache.count > 0 {
        kv_cache
    } else {
        kv_cache_legacy
    };
    Some(EngineStats {
        requests_running: running.total,
        requests_waiting: waiting.total,
        kv_cache_usage: kv_cache.mean(),
    })
}

#[derive(Default)]
struct Sum {
    total: f64,
    count: u32,
}

impl Sum {
    fn add(&mut self, value: f64) {
        if value.is_finite() {
            self.total += value;
            self.count += 1;
        }
    }

    fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.total / f64::from(self.count)
        }
    }
}

/// `(metric name, value)` of every sample line; comments and malformed lines are skipped.
fn samples(text: &str) -> impl Iterator<Item = (&str, f64)> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
        let (name, rest) = line.split_at(name_end);
        let rest = if rest.starts_with('{') {
            &rest[labels_end(rest)?..]
        } else {
            rest
        };
        // What follows is the value, then an optional timestamp.
        let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
        Some((name, value))
    })
}

/// The byte just past the `}` closing the label set `text` starts with; label values are quoted
/// and may contain `}` or escaped quotes.
fn labels_end(text: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(at + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_gauges_summed_over_label_sets() {
        let page = r#"
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="a \"quoted} name"} 4 1712345678000
vllm:num_requests_waiting{engine="1",model_name="llama"} NaN
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.25
vllm:gpu_cache_usage_perc{engine="0",model_name="llama"} 0.9
vllm:prompt_tokens_total{model_name="llama"} 1234
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="llama"} 7
garbage line
vllm:num_requests_running{unterminated="x 9
"#;
        let stats = parse(page).unwrap();
        assert_eq!(stats.requests_running, 5.0);
        assert_eq!(stats.requests_waiting, 4.0);
        assert_eq!(stats.kv_cache_usage, 0.375);
    }

    #[test]
    fn falls_back_to_the_legacy_kv_cache_name() {
        let page = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n\
                    vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.75\n";
        let stats = parse(page).unwrap();
        assert_eq!(stats.requests_running, 1.0);
        assert_eq!(stats.kv_cache_usage, 0.75);
    }

    #[test]
    fn a_page_without_vllm_gauges_has_no_stats() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("process_cpu_seconds_total 12\n"), None);
    }

    #[test]
    fn reads_the_simulated_engines_page() {
        let state = garage_sim_engine::SimState::new(garage_sim_engine::SimConfig::default());
        let stats = parse(&state.render_metrics()).unwrap();
        assert_eq!(stats, EngineStats::default());
    }
}
