//! Log-probabilities as vLLM's OpenAI server asks for and answers them.
//!
//! Chat takes `logprobs: true` and `top_logprobs: N` and answers, per choice (per chunk when
//! streamed), `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
//! "logprob", "bytes"}]}]}`. Text completions take `logprobs: N` and answer `{"text_offset",
//! "token_logprobs", "tokens", "top_logprobs": [{token: logprob}]}`, where each map holds the
//! `N` most likely tokens and the generated one (so up to `N + 1`), and `text_offset` counts
//! characters from the start of the completion, across a stream's chunks.

use serde::Serialize;
use serde::ser::SerializeMap as _;
use serde_json::Value;

use crate::api::ApiError;
use crate::model::{self, MAX_LOGPROBS, Step, TokenId, VOCAB};

/// How many top log-probabilities a chat request wants, `None` for no log-probabilities: its
/// `logprobs` (a boolean) and `top_logprobs`, checked as vLLM checks them.
pub(crate) fn chat_request(
    logprobs: Option<&Value>,
    top_logprobs: Option<&Value>,
) -> Result<Option<usize>, ApiError> {
    let on = match logprobs {
        None | Some(Value::Null) => false,
        Some(Value::Bool(on)) => *on,
        Some(_) => return Err(invalid("logprobs", "`logprobs` must be a boolean.")),
    };
    let top = match top_logprobs {
        None | Some(Value::Null) => 0,
        Some(value) => value
            .as_i64()
            .ok_or_else(|| invalid("top_logprobs", "`top_logprobs` must be an integer."))?,
    };
    if top < -1 {
        return Err(invalid(
            "top_logprobs",
            "`top_logprobs` must be a positive value or -1.",
        ));
    }
    if top != 0 && !on {
        return Err(invalid(
            "top_logprobs",
            "when using `top_logprobs`, `logprobs` must be set to true.",
        ));
    }
    on.then(|| within_limit("top_logprobs", top)).transpose()
}

/// How many top log-probabilities a text completion wants: its `logprobs` (an integer).
pub(crate) fn completion_request(logprobs: Option<&Value>) -> Result<Option<usize>, ApiError> {
    let top = match logprobs {
        None | Some(Value::Null) => return Ok(None),
        Some(value) => value
            .as_i64()
            .ok_or_else(|| invalid("logprobs", "`logprobs` must be an integer."))?,
    };
    if top < -1 {
        return Err(invalid(
            "logprobs",
            "`logprobs` must be a positive value or -1.",
        ));
    }
    within_limit("logprobs", top).map(Some)
}

/// `-1` is the whole vocabulary; more than vLLM's `--max-logprobs` (20 by default) is refused,
/// with vLLM's message.
fn within_limit(param: &'static str, top: i64) -> Result<usize, ApiError> {
    let top = if top == -1 {
        VOCAB.len()
    } else {
        usize::try_from(top).unwrap_or(usize::MAX)
    };
    if top > MAX_LOGPROBS {
        return Err(ApiError::Invalid {
            param,
            message: format!(
                "Requested sample logprobs of {top}, which is greater than max allowed: \
                 {MAX_LOGPROBS}"
            ),
        });
    }
    Ok(top)
}

fn invalid(param: &'static str, message: &str) -> ApiError {
    ApiError::Invalid {
        param,
        message: message.to_owned(),
    }
}

/// A choice's `logprobs`, in the shape of its endpoint.
#[derive(Serialize)]
#[serde(untagged)]
pub(crate) enum Logprobs {
    Chat { content: Vec<ChatToken> },
    Completion(CompletionLogprobs),
}

/// One generated token of a chat answer.
#[derive(Serialize)]
pub(crate) struct ChatToken {
    token: &'static str,
    logprob: f32,
    bytes: &'static [u8],
    top_logprobs: Vec<ChatTop>,
}

/// One of the most likely tokens at a step of a chat answer.
#[derive(Serialize)]
pub(crate) struct ChatTop {
    token: &'static str,
    logprob: f32,
    bytes: &'static [u8],
}

#[derive(Serialize)]
pub(crate) struct CompletionLogprobs {
    text_offset: Vec<usize>,
    token_logprobs: Vec<f32>,
    tokens: Vec<&'static str>,
    top_logprobs: Vec<TopMap>,
}

/// `{token: logprob}`, most likely first: serialised by hand, as a JSON object keeps the order
/// it is written in and a map type would sort it.
pub(crate) struct TopMap(Vec<(&'static str, f32)>);

impl Serialize for TopMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

/// Chat's log-probabilities of `tokens`, one `step` each.
pub(crate) fn chat(tokens: &[TokenId], steps: &[Step]) -> Logprobs {
    let entry = |token: TokenId, logprob: f32| {
        let text = model::token_text(token);
        (text, logprob, text.as_bytes())
    };
    let content = tokens
        .iter()
        .zip(steps)
        .map(|(&token, step)| {
            let (token, logprob, bytes) = entry(token, step.logprob);
            ChatToken {
                token,
                logprob,
                bytes,
                top_logprobs: step
                    .top
                    .iter()
                    .map(|&(top, logprob)| {
                        let (token, logprob, bytes) = entry(top, logprob);
                        ChatTop {
                            token,
                            logprob,
                            bytes,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    Logprobs::Chat { content }
}

/// A text completion's log-probabilities of `tokens`, one `step` each; the first token starts
/// `offset` characters into the completion (the text of the chunks streamed before).
pub(crate) fn completion(tokens: &[TokenId], steps: &[Step], mut offset: usize) -> Logprobs {
    let mut logprobs = CompletionLogprobs {
        text_offset: Vec::with_capacity(tokens.len()),
        token_logprobs: Vec::with_capacity(tokens.len()),
        tokens: Vec::with_capacity(tokens.len()),
        top_logprobs: Vec::with_capacity(tokens.len()),
    };
    for (&token, step) in tokens.iter().zip(steps) {
        let text = model::token_text(token);
        logprobs.text_offset.push(offset);
        offset += text.chars().count();
        logprobs.token_logprobs.push(step.logprob);
        logprobs.tokens.push(text);
        let mut top: Vec<(&'static str, f32)> = step
            .top
            .iter()
            .map(|&(top, logprob)| (model::token_text(top), logprob))
            .collect();
        if !step.top.iter().any(|&(top, _)| top == token) {
            top.push((text, step.logprob));
        }
        logprobs.top_logprobs.push(TopMap(top));
    }
    Logprobs::Completion(logprobs)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn requests_are_checked_as_vllm_checks_them() {
        let wants = |logprobs: Value, top: Value| {
            chat_request(Some(&logprobs), Some(&top)).map_err(|e| format!("{e:?}"))
        };
        assert_eq!(wants(json!(null), json!(null)), Ok(None));
        assert_eq!(wants(json!(false), json!(0)), Ok(None));
        assert_eq!(wants(json!(true), json!(null)), Ok(Some(0)));
        assert_eq!(wants(json!(true), json!(20)), Ok(Some(20)));
        for (logprobs, top, error) in [
            (json!(false), json!(2), "must be set to true"),
            (json!(true), json!(-2), "positive value or -1"),
            (json!(true), json!(21), "greater than max allowed: 20"),
            (json!(true), json!(-1), "logprobs of 128, which is greater"),
            (json!(true), json!("3"), "must be an integer"),
            (json!(1), json!(null), "must be a boolean"),
        ] {
            let got = wants(logprobs, top).expect_err(error);
            assert!(got.contains(error), "{got}");
        }
        assert_eq!(completion_request(Some(&json!(0))).ok(), Some(Some(0)));
        assert!(completion_request(Some(&json!(-3))).is_err());
        assert!(completion_request(Some(&json!(true))).is_err());
    }

    #[test]
    fn completion_maps_hold_the_generated_token_too() {
        let steps = [Step {
            logprob: -2.0,
            top: vec![(1, -0.5)],
        }];
        let value = serde_json::to_value(completion(&[0], &steps, 4)).unwrap_or_default();
        assert_eq!(
            value,
            json!({"text_offset": [4], "token_logprobs": [-2.0], "tokens": ["the "],
                   "top_logprobs": [{"quick ": -0.5, "the ": -2.0}]})
        );
    }
}
