//! Turning a user's input file into the batch input JSONL the Batch API takes.
//!
//! Each non-blank line is one of:
//! - a **request line**: a JSON object with a `custom_id`, kept as it is, except that a missing
//!   `method` becomes `POST`, a missing `url` the batch's endpoint, and a missing `body.model`
//!   the `--model`;
//! - a **prompt**: a JSON string (decoded), or any other text taken verbatim, wrapped into a
//!   request with `custom_id` `line-N` (N the 1-based line number in the input).
//!
//! Rejected here, with line numbers, before anything is uploaded: a line that starts with `{` but
//! is not valid JSON, a JSON object without a string `custom_id` (it is neither a request nor a
//! prompt we could send as meant), and a `custom_id` used twice (the output could not be matched
//! to the input). Anything else wrong with a request line (a bad `url`, no `body`, an unknown
//! model) is left for the gateway to report, as OpenAI would.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value, json};

/// The endpoints a batch can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
    #[value(name = "/v1/chat/completions")]
    ChatCompletions,
    #[value(name = "/v1/completions")]
    Completions,
    #[value(name = "/v1/embeddings")]
    Embeddings,
    #[value(name = "/v1/responses")]
    Responses,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Responses => "/v1/responses",
        }
    }

    /// The request body for one prompt.
    fn body(self, model: &str, prompt: &str, max_tokens: Option<u32>) -> Value {
        let mut body = Map::new();
        body.insert("model".into(), model.into());
        match self {
            Endpoint::ChatCompletions => {
                body.insert(
                    "messages".into(),
                    json!([{"role": "user", "content": prompt}]),
                );
            }
            Endpoint::Completions => {
                body.insert("prompt".into(), prompt.into());
            }
            Endpoint::Embeddings | Endpoint::Responses => {
                body.insert("input".into(), prompt.into());
            }
        }
        // Embeddings have no output tokens to cap; the command line refuses that combination.
        let cap = match self {
            Endpoint::ChatCompletions | Endpoint::Completions => Some("max_tokens"),
            Endpoint::Responses => Some("max_output_tokens"),
            Endpoint::Embeddings => None,
        };
        if let (Some(max_tokens), Some(cap)) = (max_tokens, cap) {
            body.insert(cap.into(), max_tokens.into());
        }
        Value::Object(body)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

/// What fills in what a line leaves out.
#[derive(Debug, Clone)]
pub struct RequestDefaults {
    pub endpoint: Endpoint,
    pub model: String,
    /// Added to prompt lines only; request lines say what they mean themselves.
    pub max_tokens: Option<u32>,
}

/// The converted input, ready to upload.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchInput {
    /// One request per line, each line ending in `\n`.
    pub jsonl: String,
    pub requests: usize,
}

/// One line that cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineProblem {
    /// 1-based line number in the input.
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("the input has no requests (only blank lines)")]
    Empty,
    #[error("{}", describe_problems(.0))]
    BadLines(Vec<LineProblem>),
}

/// Enough to fix the first few without drowning the terminal on a wholly wrong file.
const PROBLEMS_SHOWN: usize = 10;

fn describe_problems(problems: &[LineProblem]) -> String {
    let mut text = match problems.len() {
        1 => "1 bad line in the input:".to_owned(),
        n => format!("{n} bad lines in the input:"),
    };
    for problem in problems.iter().take(PROBLEMS_SHOWN) {
        text.push_str(&format!("\n  line {}: {}", problem.line, problem.reason));
    }
    if problems.len() > PROBLEMS_SHOWN {
        text.push_str(&format!(
            "\n  ... and {} more",
            problems.len() - PROBLEMS_SHOWN
        ));
    }
    text
}

/// Converts an input file's text into batch input JSONL.
pub fn to_batch_jsonl(text: &str, defaults: &RequestDefaults) -> Result<BatchInput, InputError> {
    // Editors on Windows like to start UTF-8 files with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut jsonl = String::with_capacity(text.len() * 2);
    let mut requests = 0;
    let mut problems = Vec::new();
    let mut first_use: HashMap<String, usize> = HashMap::new();

    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let request = match convert_line(line, number, defaults) {
            Ok(request) => request,
            Err(reason) => {
                problems.push(LineProblem {
                    line: number,
                    reason,
                });
                continue;
            }
        };
        if let Some(Value::String(custom_id)) = request.get("custom_id") {
            if let Some(first) = first_use.get(custom_id) {
                problems.push(LineProblem {
                    line: number,
                    reason: format!("custom_id {custom_id:?} is already used on line {first}"),
                });
                continue;
            }
            first_use.insert(custom_id.clone(), number);
        }
        jsonl.push_str(&Value::Object(request).to_string());
        jsonl.push('\n');
        requests += 1;
    }

    if !problems.is_empty() {
        return Err(InputError::BadLines(problems));
    }
    if requests == 0 {
        return Err(InputError::Empty);
    }
    Ok(BatchInput { jsonl, requests })
}

fn convert_line(
    line: &str,
    number: usize,
    defaults: &RequestDefaults,
) -> Result<Map<String, Value>, String> {
    let trimmed = line.trim();
    if trimmed.starts_with('{') {
        let request = serde_json::from_str::<Map<String, Value>>(trimmed).map_err(|err| {
            format!("starts like a JSON request but is not valid JSON ({err}); to send it as a prompt, write it as a JSON string")
        })?;
        return complete_request(request, defaults);
    }
    let prompt = if trimmed.starts_with('"') {
        // `"Hi," she said` is not JSON: it is a prompt, taken verbatim.
        serde_json::from_str::<String>(trimmed).unwrap_or_else(|_| line.to_owned())
    } else {
        line.to_owned()
    };
    Ok(prompt_request(&prompt, number, defaults))
}

fn complete_request(
    mut request: Map<String, Value>,
    defaults: &RequestDefaults,
) -> Result<Map<String, Value>, String> {
    match request.get("custom_id") {
        Some(Value::String(_)) => {}
        Some(_) => return Err("custom_id must be a string".into()),
        None => {
            return Err(
                "a JSON object is a request line and needs a \"custom_id\"; \
                        to send it as a prompt, write it as a JSON string"
                    .into(),
            );
        }
    }
    request
        .entry("method")
        .or_insert_with(|| Value::from("POST"));
    request
        .entry("url")
        .or_insert_with(|| Value::from(defaults.endpoint.path()));
    if let Some(Value::Object(body)) = request.get_mut("body") {
        body.entry("model")
            .or_insert_with(|| Value::from(defaults.model.as_str()));
    }
    Ok(request)
}

fn prompt_request(prompt: &str, number: usize, defaults: &RequestDefaults) -> Map<String, Value> {
    let mut request = Map::new();
    request.insert("custom_id".into(), format!("line-{number}").into());
    request.insert("method".into(), "POST".into());
    request.insert("url".into(), defaults.endpoint.path().into());
    request.insert(
        "body".into(),
        defaults
            .endpoint
            .body(&defaults.model, prompt, defaults.max_tokens),
    );
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(endpoint: Endpoint, max_tokens: Option<u32>) -> RequestDefaults {
        RequestDefaults {
            endpoint,
            model: "m".into(),
            max_tokens,
        }
    }

    fn chat() -> RequestDefaults {
        defaults(Endpoint::ChatCompletions, None)
    }

    /// The converted requests, parsed back.
    fn convert(text: &str, defaults: &RequestDefaults) -> Vec<Value> {
        let input = to_batch_jsonl(text, defaults).expect("a valid input");
        assert!(input.jsonl.ends_with('\n'));
        let lines: Vec<Value> = input
            .jsonl
            .lines()
            .map(|line| serde_json::from_str(line).expect("JSON lines"))
            .collect();
        assert_eq!(lines.len(), input.requests);
        lines
    }

    fn problems(text: &str) -> Vec<LineProblem> {
        match to_batch_jsonl(text, &chat()) {
            Err(InputError::BadLines(problems)) => problems,
            other => panic!("expected bad lines, got {other:?}"),
        }
    }

    #[test]
    fn plain_text_becomes_a_chat_request_numbered_by_line() {
        let requests = convert("Hello there\n\n  Why is the sky blue?  \n", &chat());
        assert_eq!(
            requests,
            vec![
                json!({"custom_id": "line-1", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [{"role": "user", "content": "Hello there"}]}}),
                json!({"custom_id": "line-3", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [{"role": "user", "content": "  Why is the sky blue?  "}]}}),
            ]
        );
    }

    #[test]
    fn the_request_line_keeps_openai_key_order() {
        let input =
            to_batch_jsonl("hi", &defaults(Endpoint::Completions, Some(5))).expect("a valid input");
        assert_eq!(
            input.jsonl,
            "{\"custom_id\":\"line-1\",\"method\":\"POST\",\"url\":\"/v1/completions\",\
             \"body\":{\"model\":\"m\",\"prompt\":\"hi\",\"max_tokens\":5}}\n"
        );
    }

    #[test]
    fn a_json_string_is_decoded_into_the_prompt() {
        let requests = convert("\"line one\\nline two \\\"quoted\\\"\"\n", &chat());
        assert_eq!(
            requests[0]["body"]["messages"][0]["content"],
            "line one\nline two \"quoted\""
        );
    }

    #[test]
    fn text_that_only_starts_like_a_json_string_is_verbatim() {
        let requests = convert("\"Hi,\" she said.", &chat());
        assert_eq!(
            requests[0]["body"]["messages"][0]["content"],
            "\"Hi,\" she said."
        );
    }

    #[test]
    fn other_json_values_are_prompts_taken_verbatim() {
        let requests = convert("42\n[1, 2]\nnull\n", &chat());
        let prompts: Vec<&Value> = requests
            .iter()
            .map(|r| &r["body"]["messages"][0]["content"])
            .collect();
        assert_eq!(prompts, [&json!("42"), &json!("[1, 2]"), &json!("null")]);
    }

    #[test]
    fn each_endpoint_shapes_its_body() {
        let completions = convert("p", &defaults(Endpoint::Completions, Some(16)));
        assert_eq!(completions[0]["url"], "/v1/completions");
        assert_eq!(
            completions[0]["body"],
            json!({"model": "m", "prompt": "p", "max_tokens": 16})
        );

        let embeddings = convert("p", &defaults(Endpoint::Embeddings, None));
        assert_eq!(embeddings[0]["url"], "/v1/embeddings");
        assert_eq!(embeddings[0]["body"], json!({"model": "m", "input": "p"}));

        let responses = convert("p", &defaults(Endpoint::Responses, Some(16)));
        assert_eq!(responses[0]["url"], "/v1/responses");
        assert_eq!(
            responses[0]["body"],
            json!({"model": "m", "input": "p", "max_output_tokens": 16})
        );

        let chat = convert("p", &defaults(Endpoint::ChatCompletions, Some(16)));
        assert_eq!(
            chat[0]["body"],
            json!({"model": "m", "messages": [{"role": "user", "content": "p"}], "max_tokens": 16})
        );
    }

    #[test]
    fn a_full_request_line_is_kept_as_is() {
        let line = json!({"custom_id": "q1", "method": "POST", "url": "/v1/completions",
                          "body": {"model": "other", "prompt": "x", "temperature": 0}});
        let requests = convert(&line.to_string(), &defaults(Endpoint::Completions, Some(9)));
        // `--max-tokens` is for prompt lines: a request line says what it means.
        assert_eq!(requests, vec![line]);
    }

    #[test]
    fn a_request_line_gets_method_url_and_model_when_missing() {
        let requests = convert(
            r#"{"custom_id": "q1", "body": {"messages": [{"role": "user", "content": "hi"}]}}"#,
            &chat(),
        );
        assert_eq!(
            requests[0],
            json!({"custom_id": "q1",
                   "body": {"messages": [{"role": "user", "content": "hi"}], "model": "m"},
                   "method": "POST", "url": "/v1/chat/completions"})
        );
    }

    #[test]
    fn a_request_line_without_a_body_is_left_for_the_gateway_to_report() {
        let requests = convert(r#"{"custom_id": "q1", "url": "/v1/nowhere"}"#, &chat());
        assert_eq!(
            requests[0],
            json!({"custom_id": "q1", "url": "/v1/nowhere", "method": "POST"})
        );
    }

    #[test]
    fn prompts_and_request_lines_mix() {
        let text = "first\n{\"custom_id\": \"mine\", \"body\": {}}\n\"third\"\n";
        let ids: Vec<Value> = convert(text, &chat())
            .into_iter()
            .map(|r| r["custom_id"].clone())
            .collect();
        assert_eq!(ids, [json!("line-1"), json!("mine"), json!("line-3")]);
    }

    #[test]
    fn crlf_line_ends_and_a_byte_order_mark_are_not_part_of_prompts() {
        let requests = convert("\u{feff}one\r\ntwo\r\n", &chat());
        assert_eq!(requests[0]["body"]["messages"][0]["content"], "one");
        assert_eq!(requests[1]["body"]["messages"][0]["content"], "two");
        assert_eq!(requests[1]["custom_id"], "line-2");
    }

    #[test]
    fn an_object_without_custom_id_is_rejected_with_its_line() {
        let problems = problems("ok\n{\"body\": {\"prompt\": \"x\"}}\n{\"custom_id\": 7}\n");
        assert_eq!(problems.iter().map(|p| p.line).collect::<Vec<_>>(), [2, 3]);
        assert!(problems[0].reason.contains("needs a \"custom_id\""));
        assert_eq!(problems[1].reason, "custom_id must be a string");
    }

    #[test]
    fn broken_json_objects_are_rejected_not_sent_as_prompts() {
        let problems = problems("{\"custom_id\": \"a\", \n");
        assert_eq!(problems[0].line, 1);
        assert!(
            problems[0].reason.contains("not valid JSON"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_reused_custom_id_is_rejected_even_when_generated() {
        let problems = problems("hello\n{\"custom_id\": \"line-1\", \"body\": {}}\n");
        assert_eq!(
            problems,
            [LineProblem {
                line: 2,
                reason: "custom_id \"line-1\" is already used on line 1".into()
            }]
        );
    }

    #[test]
    fn blank_input_is_rejected() {
        assert_eq!(
            to_batch_jsonl("\n  \n\t\n", &chat()),
            Err(InputError::Empty)
        );
        assert_eq!(to_batch_jsonl("", &chat()), Err(InputError::Empty));
    }

    #[test]
    fn many_problems_are_summed_up() {
        let text = "{}\n".repeat(12);
        let message = to_batch_jsonl(&text, &chat())
            .expect_err("bad lines")
            .to_string();
        assert!(
            message.starts_with("12 bad lines in the input:"),
            "{message}"
        );
        assert!(message.contains("line 10:"));
        assert!(!message.contains("line 11:"));
        assert!(message.ends_with("... and 2 more"), "{message}");
    }
}
