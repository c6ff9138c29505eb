//! What a request cost, in its answer: `cost` in credits beside the token counts of the usage
//! object (the last chunk of a stream), as OpenRouter reports it; an extra field the OpenAI and
//! Anthropic SDKs pass through. The cost is the price quoted at admission times the tokens
//! billed: what the default meter charges.
//!
//! The answer is changed as little as it can be: `usage` is the last member of vLLM's and
//! OpenAI's answers and chunks, so `,"cost":…` goes in before its closing brace without
//! parsing the rest; any other shape is parsed, changed and written again.

use bytes::{Bytes, BytesMut};

use crate::plugins::Price;

/// The response header with the cost, on an answer whose cost is known before its body is
/// sent (a whole answer); and its price, on every answer that was quoted one.
pub const COST_HEADER: &str = "x-garage-cost";
pub const PRICE_HEADER: &str = "x-garage-price";

/// Credits to the nanocredit: the cost's digits, without float noise
/// (`0.0045`, not `0.004500000000000001`).
pub fn cost(price: &Price, prompt_tokens: u64, completion_tokens: u64) -> f64 {
    (price.cost(prompt_tokens, completion_tokens) * 1e9).round() / 1e9
}

/// `x-garage-price`: `prompt=<credits per 1,000>, completion=<credits per 1,000>`.
pub fn price_header(price: &Price) -> String {
    format!(
        "prompt={}, completion={}",
        price.prompt_per_1k, price.completion_per_1k
    )
}

/// `body`, a JSON object, with `"cost": cost` in its top-level `usage` object; `None` when it
/// has none (or is not JSON).
pub fn with_cost(body: &[u8], cost: f64) -> Option<Bytes> {
    let number = serde_json::Number::from_f64(cost)?.to_string();
    if let Some(at) = usage_close(body) {
        let before = body[..at].trim_ascii_end();
        let comma = if before.ends_with(b"{") { "" } else { "," };
        let mut out = BytesMut::with_capacity(body.len() + number.len() + 9);
        out.extend_from_slice(&body[..at]);
        out.extend_from_slice(comma.as_bytes());
        out.extend_from_slice(b"\"cost\":");
        out.extend_from_slice(number.as_bytes());
        out.extend_from_slice(&body[at..]);
        return Some(out.freeze());
    }
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    // At the top, or in a Responses stream's `response.completed`.
    let usage = match value.get("usage") {
        Some(serde_json::Value::Object(_)) => value.get_mut("usage"),
        _ => value.get_mut("response")?.get_mut("usage"),
    }?
    .as_object_mut()?;
    usage.insert(
        "cost".into(),
        serde_json::Value::Number(number.parse().ok()?),
    );
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// An SSE event (`data: {…}` lines, a blank line) with the cost in its data's usage; `None`
/// when its data has no usage object.
pub fn event_with_cost(event: &[u8], cost: f64) -> Option<Bytes> {
    let start = event
        .windows(5)
        .position(|w| w == b"data:")
        .map(|at| at + 5)?;
    let data_start = start + (event.len() - start - event[start..].trim_ascii_start().len());
    let data_len = event[data_start..]
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .unwrap_or(event.len() - data_start);
    let data = &event[data_start..data_start + data_len];
    let changed = with_cost(data, cost)?;
    let mut out = BytesMut::with_capacity(event.len() + changed.len() - data.len());
    out.extend_from_slice(&event[..data_start]);
    out.extend_from_slice(&changed);
    out.extend_from_slice(&event[data_start + data_len..]);
    Some(out.freeze())
}

/// Where the closing brace of the top-level `usage` object is, when `usage` is the object's
/// last member (see `sse::usage_member_at_the_end`) and its value an object.
fn usage_close(body: &[u8]) -> Option<usize> {
    let (at, usage) = super::sse::usage_member_at_the_end(body)?;
    usage?;
    // The top-level object's `}`, then the usage object's.
    let top = body.iter().rposition(|&b| b == b'}')?;
    let close = body[..top].iter().rposition(|b| !b.is_ascii_whitespace())?;
    (body[close] == b'}' && close > at).then_some(close)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Option<Bytes>) -> String {
        String::from_utf8(bytes.expect("changed").to_vec()).unwrap()
    }

    #[test]
    fn the_cost_goes_into_the_usage_object_of_an_answer() {
        let body = br#"{"id":"x","choices":[{"text":"hi"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let changed = text(with_cost(body, 0.0045));
        assert_eq!(
            changed,
            r#"{"id":"x","choices":[{"text":"hi"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"cost":0.0045}}"#
        );
        let value: serde_json::Value = serde_json::from_str(&changed).unwrap();
        assert_eq!(value["usage"]["cost"], 0.0045);
        // Pretty-printed, with whitespace: still valid JSON.
        let pretty = b"{\n  \"usage\": {\n    \"prompt_tokens\": 1\n  }\n}\n";
        let value: serde_json::Value =
            serde_json::from_slice(&with_cost(pretty, 1.5).unwrap()).unwrap();
        assert_eq!(value["usage"]["cost"], 1.5);
    }

    #[test]
    fn other_shapes_are_parsed_and_no_usage_is_no_change() {
        // `usage` not last: parsed.
        let body = br#"{"usage":{"input_tokens":4,"output_tokens":1},"stop_reason":"end_turn"}"#;
        let value: serde_json::Value =
            serde_json::from_slice(&with_cost(body, 2.0).unwrap()).unwrap();
        assert_eq!(value["usage"]["cost"], 2.0);
        assert_eq!(value["stop_reason"], "end_turn");
        // An empty usage object: no stray comma.
        let value: serde_json::Value =
            serde_json::from_slice(&with_cost(br#"{"usage":{}}"#, 1.0).unwrap()).unwrap();
        assert_eq!(value["usage"]["cost"], 1.0);
        assert_eq!(with_cost(br#"{"usage":null}"#, 1.0), None);
        assert_eq!(with_cost(br#"{"data":[1,2]}"#, 1.0), None);
        assert_eq!(with_cost(b"not json", 1.0), None);
        assert_eq!(with_cost(br#"{"usage":{}}"#, f64::NAN), None);
        // A `usage` inside a string is not the answer's.
        let tricky = br#"{"choices":[{"text":"\"usage\":{}}"}],"usage":{"prompt_tokens":1}}"#;
        let value: serde_json::Value =
            serde_json::from_slice(&with_cost(tricky, 3.0).unwrap()).unwrap();
        assert_eq!(value["usage"]["cost"], 3.0);
        assert_eq!(value["choices"][0]["text"], "\"usage\":{}}");
    }

    #[test]
    fn the_cost_goes_into_an_events_data() {
        let event =
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n";
        assert_eq!(
            text(event_with_cost(event, 0.25)),
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"cost\":0.25}}\n\n"
        );
        // Anthropic's named events.
        let delta = b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\r\n\r\n";
        assert_eq!(
            text(event_with_cost(delta, 1.0)),
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7,\"cost\":1.0}}\r\n\r\n"
        );
        assert_eq!(event_with_cost(b"data: [DONE]\n\n", 1.0), None);
    }

    #[test]
    fn costs_are_rounded_to_the_nanocredit() {
        let price = Price {
            prompt_per_1k: 0.3,
            completion_per_1k: 0.6,
        };
        assert_eq!(cost(&price, 5, 5), 0.0045);
        assert_eq!(price_header(&price), "prompt=0.3, completion=0.6");
    }
}
