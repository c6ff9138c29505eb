//! {{name}}: a meter. Prices tokens per 1,000 (prompt, completion) times the model's
//! multiplier, quotes that price at admission and charges a request the price it was quoted.
use garage_plugin_sdk::{Charge, Host, Meter, Price, QuoteRequest, UsageEvent, config};

pub struct Policy;

#[derive(serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Config {
    prompt_per_1k: Option<f64>,
    completion_per_1k: Option<f64>,
    model_multipliers: std::collections::BTreeMap<String, f64>,
}

fn price(host: &dyn Host, model: &str) -> Result<Price, String> {
    let config: Config = config::parse(host)?;
    let multiplier = config.model_multipliers.get(model).unwrap_or(&1.0);
    Ok(Price {
        prompt_per_thousand: config.prompt_per_1k.unwrap_or(1.0) * multiplier,
        completion_per_thousand: config.completion_per_1k.unwrap_or(2.0) * multiplier,
    })
}

impl Meter for Policy {
    fn quote(host: &dyn Host, request: &QuoteRequest) -> Result<Option<Price>, String> {
        price(host, &request.model).map(Some)
    }
    fn charge(host: &dyn Host, event: &UsageEvent) -> Result<Charge, String> {
        let price = match event.price {
            Some(quoted) => quoted,
            None => price(host, &event.model)?,
        };
        let credits = price.cost(event.prompt_tokens, event.completion_tokens);
        Ok(Charge {
            credits,
            ..Charge::default()
        })
    }
}
garage_plugin_sdk::export_meter!(Policy);

#[cfg(test)]
mod tests;
