//! The gateway's own token counts: with a model's tokenizer (its `tokenizer.json`, Hugging
//! Face's format, read with their `tokenizers` crate), the prompt is counted from the request
//! and the completion from the text the gateway forwarded, so what a key pays and a rig earns
//! does not depend on what the rig says it did.
//!
//! Counting is what the model would see, within a tolerance: the prompt is counted message by
//! message (each message's text, plus the tokens the model's chat template adds per message,
//! `chat_template_tokens` of [`TokenizerConfig`]), and the completion by tokenizing the text
//! forwarded, which may split or merge a token where generation did not, and leaves out special
//! tokens that print nothing (the end-of-sequence token). A rig's report within
//! [`agrees`]'s tolerance of the count agrees; beyond it, it is a failed check.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use crate::config::TokenizerConfig;
use crate::ledger::billing::Usage;

#[derive(Debug, thiserror::Error)]
#[error("cannot load the tokenizer of `{model}` from {path}: {message}")]
pub struct TokenizerError {
    pub model: String,
    pub path: String,
    pub message: String,
}

/// Claude Code's attribution block in a system prompt, which vLLM leaves out of the prompt.
const BILLING_HEADER: &str = "x-anthropic-billing-header";

/// Completion and prompt tokens a report may differ from the gateway's count by and still
/// agree: at least [`TOLERANCE_TOKENS`], else [`TOLERANCE_SHARE`] of the count.
pub const TOLERANCE_TOKENS: u64 = 4;
/// See [`TOLERANCE_TOKENS`].
pub const TOLERANCE_SHARE: f64 = 0.02;

/// Whether `reported` agrees with `counted` within the tolerance.
pub fn agrees(reported: u64, counted: u64) -> bool {
    let tolerance = TOLERANCE_TOKENS.max((counted as f64 * TOLERANCE_SHARE).ceil() as u64);
    reported.abs_diff(counted) <= tolerance
}

/// One model's tokenizer.
pub struct ModelTokenizer {
    tokenizer: tokenizers::Tokenizer,
    chat_template_tokens: u64,
}

impl ModelTokenizer {
    /// Tokens of a text, without special tokens (the template's are counted apart).
    pub fn count(&self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        self.tokenizer
            .encode_fast(text, false)
            .map_or(0, |encoding| encoding.len() as u64)
    }

    /// Prompt tokens of a request body, counted as the endpoint reads it: chat `messages`,
    /// completions and embeddings `prompt`/`input` (text or token ids), Responses `input`.
    /// `None` for a body it cannot read (it was checked already; a rerank or score request).
    pub fn count_prompt(&self, path: &str, body: &[u8]) -> Option<u64> {
        let request: Value = serde_json::from_slice(body).ok()?;
        match path {
            "/chat/completions" => {
                let messages = request.get("messages")?.as_array()?;
                Some(
                    messages
                        .iter()
                        .map(|m| {
                            self.chat_template_tokens
                                + m.get("content").map_or(0, |c| self.count_value(c))
                        })
                        .sum(),
                )
            }
            "/completions" => Some(self.count_value(request.get("prompt")?)),
            "/embeddings" => Some(self.count_value(request.get("input")?)),
            "/responses" => {
                let input = request.get("input")?;
                Some(match input {
                    Value::Array(items) => items
                        .iter()
                        .map(|item| match item.get("content") {
                            Some(content) => self.chat_template_tokens + self.count_value(content),
                            None => self.count_value(item),
                        })
                        .sum(),
                    other => self.count_value(other),
                })
            }
            "/messages" | "/messages/count_tokens" => self.count_messages(&request),
            _ => None,
        }
    }

    /// Prompt tokens of an Anthropic Messages request, read as vLLM turns it into a chat: the
    /// system prompt (the `system` text and any `system` messages, but Claude Code's billing
    /// header) as one message, then the messages, where a user's tool result is a message of
    /// its own and a user message of tool results alone is none. Text counts; tool calls and
    /// thinking do not; the chat template adds its tokens to each message.
    fn count_messages(&self, request: &Value) -> Option<u64> {
        let messages = request.get("messages")?.as_array()?;
        let template = self.chat_template_tokens;
        fn text(block: &Value) -> Option<&str> {
            (block.get("type").and_then(Value::as_str) == Some("text"))
                .then(|| block.get("text").and_then(Value::as_str))
                .flatten()
                .filter(|text| !text.is_empty())
        }
        let system_texts = |value: &Value| -> Vec<String> {
            match value {
                Value::String(text) => vec![text.clone()],
                Value::Array(blocks) => blocks
                    .iter()
                    .filter_map(text)
                    .filter(|text| !text.starts_with(BILLING_HEADER))
                    .map(str::to_owned)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut system: Vec<String> = request.get("system").map(system_texts).unwrap_or_default();
        let mut tokens = 0;
        for message in messages {
            let role = message
                .get("role")
                .and_then(Value::as_str)
                .unwrap_or("user");
            let content = message.get("content").unwrap_or(&Value::Null);
            if role == "system" {
                system.extend(system_texts(content));
                continue;
            }
            let Value::Array(blocks) = content else {
                tokens += template + self.count_value(content);
                continue;
            };
            let mut parts = None;
            for block in blocks {
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if let Some(text) = text(block) {
                            *parts.get_or_insert(0) += self.count(text);
                        }
                    }
                    Some("image") => {
                        parts.get_or_insert(0);
                    }
                    Some("tool_result") if role != "assistant" => {
                        let result = block.get("content").unwrap_or(&Value::Null);
                        tokens += template + self.count_value(result);
                    }
                    Some("tool_result") => {
                        let result = block.get("content").unwrap_or(&Value::Null);
                        *parts.get_or_insert(0) +=
                            self.count("Tool result:") + self.count_value(result);
                    }
                    _ => {}
                }
            }
            match parts {
                Some(parts) => tokens += template + parts,
                None if role == "assistant" => tokens += template,
                None => {}
            }
        }
        let system = system.concat();
        if !system.is_empty() {
            tokens += template + self.count(&system);
        }
        Some(tokens)
    }

    /// Tokens of a prompt-like value: a text, token ids, a list of either, or content parts
    /// (`{"type": "text", "text": ...}`; media parts count nothing here, and are bounded by
    /// the billing rules instead).
    fn count_value(&self, value: &Value) -> u64 {
        match value {
            Value::String(text) => self.count(text),
            // A token id: one token.
            Value::Number(_) => 1,
            Value::Array(items) => items.iter().map(|item| self.count_value(item)).sum(),
            Value::Object(part) => part
                .get("text")
                .filter(|_| {
                    part.get("type")
                        .is_none_or(|t| t == "text" || t == "input_text")
                })
                .map_or(0, |text| self.count_value(text)),
            Value::Null | Value::Bool(_) => 0,
        }
    }
}

/// The tokenizers of the models the config names.
#[derive(Default)]
pub struct Tokenizers {
    by_model: HashMap<String, Arc<ModelTokenizer>>,
}

impl Tokenizers {
    /// Loads every tokenizer the config names; a file that cannot be read or parsed stops the
    /// start (billing on the rig's word by mistake is worse than not starting).
    pub fn load(config: &BTreeMap<String, TokenizerConfig>) -> Result<Self, TokenizerError> {
        let mut by_model = HashMap::new();
        for (model, entry) in config {
            let tokenizer =
                tokenizers::Tokenizer::from_file(&entry.file).map_err(|e| TokenizerError {
                    model: model.clone(),
                    path: entry.file.display().to_string(),
                    message: e.to_string(),
                })?;
            by_model.insert(
                model.clone(),
                Arc::new(ModelTokenizer {
                    tokenizer,
                    chat_template_tokens: u64::from(entry.chat_template_tokens),
                }),
            );
        }
        Ok(Tokenizers { by_model })
    }

    pub fn get(&self, model: &str) -> Option<&Arc<ModelTokenizer>> {
        self.by_model.get(model)
    }

    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }
}

/// What the gateway counted against what the backend reported, for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub counted: Usage,
    /// The backend's report agreed with the count (within the tolerance).
    pub agreed: bool,
}

/// Compares a report with the gateway's count. A stream cut short reports nothing: nothing to
/// check (`agreed` stays true: the rig did not lie).
pub fn check(reported: Option<Usage>, counted: Usage) -> Check {
    let agreed = reported.is_none_or(|r| {
        agrees(r.prompt_tokens, counted.prompt_tokens)
            && agrees(r.completion_tokens, counted.completion_tokens)
    });
    Check { counted, agreed }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per whitespace-separated word, as the simulated engine counts.
    fn words() -> ModelTokenizer {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"WhitespaceSplit"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":1},
            "unk_token":"[UNK]"}}"#;
        ModelTokenizer {
            tokenizer: json.parse().expect("a tokenizer"),
            chat_template_tokens: 3,
        }
    }

    #[test]
    fn prompts_are_counted_as_each_endpoint_reads_them() {
        let t = words();
        let chat = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hello there you"},
            {"type":"image_url","image_url":{"url":"data:x"}}]}]}"#;
        // 2 + 3 words, 3 template tokens per message.
        assert_eq!(t.count_prompt("/chat/completions", chat), Some(11));
        let completions = br#"{"model":"m","prompt":["a b","c"]}"#;
        assert_eq!(t.count_prompt("/completions", completions), Some(3));
        let ids = br#"{"model":"m","prompt":[1,2,3,4]}"#;
        assert_eq!(t.count_prompt("/completions", ids), Some(4));
        let responses = br#"{"model":"m","input":"one two three"}"#;
        assert_eq!(t.count_prompt("/responses", responses), Some(3));
        assert_eq!(t.count_prompt("/rerank", responses), None);
        // Anthropic's Messages: the system prompt (its billing header left out) as a message,
        // each turn, a user's tool result as a message of its own; the tool call, the image
        // and the tool definitions count nothing.
        let messages = br#"{"model":"m","max_tokens":9,
            "system":[{"type":"text","text":"x-anthropic-billing-header: cc=1"},
                      {"type":"text","text":"be brief"}],
            "tools":[{"name":"ls","input_schema":{"type":"object"}}],
            "messages":[{"role":"user","content":"hello there"},
              {"role":"assistant","content":[{"type":"text","text":"hi"},
                {"type":"tool_use","id":"t1","name":"ls","input":{"path":"a b c"}}]},
              {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1",
                "content":[{"type":"text","text":"a.txt b.txt"}]},
                {"type":"image","source":{"type":"url","url":"u"}},
                {"type":"text","text":"what now"}]}]}"#;
        // Nine words and five messages of three template tokens.
        assert_eq!(t.count_prompt("/messages", messages), Some(9 + 5 * 3));
        assert_eq!(
            t.count_prompt("/messages/count_tokens", messages),
            Some(9 + 5 * 3)
        );
        // Tool results alone are no user message; no system prompt, no system message.
        let results = br#"{"messages":[{"role":"user","content":[
            {"type":"tool_result","tool_use_id":"t1","content":"one two"}]}]}"#;
        assert_eq!(t.count_prompt("/messages", results), Some(2 + 3));
        assert_eq!(t.count_prompt("/chat/completions", b"not json"), None);
    }

    #[test]
    fn a_report_agrees_within_the_tolerance() {
        assert!(agrees(104, 100));
        assert!(!agrees(105, 100));
        assert!(agrees(1020, 1000));
        assert!(!agrees(1021, 1000));
        assert!(!agrees(300, 100), "three times the tokens");
        let counted = Usage {
            prompt_tokens: 10,
            completion_tokens: 50,
        };
        assert!(check(None, counted).agreed);
        assert!(check(Some(counted), counted).agreed);
        let inflated = Usage {
            prompt_tokens: 30,
            completion_tokens: 150,
        };
        assert!(!check(Some(inflated), counted).agreed);
    }
}
