//! Reading an input file: its valid lines, or every problem found, at most so many.

use super::*;

/// Reads an input file: the valid lines, or every problem found (OpenAI reports them all).
pub(super) fn validate(
    content: &[u8],
    endpoint: &str,
    known_models: &BTreeSet<String>,
    max_requests: usize,
    max_errors: usize,
) -> Result<Vec<Line>, Vec<BatchError>> {
    let mut errors = ErrorList::new(max_errors);
    let mut lines = Vec::new();
    let mut seen = HashSet::new();
    let error = |code: &str, message: String, param: Option<&str>, line: u64| BatchError {
        code: code.into(),
        message,
        param: param.map(str::to_owned),
        line: Some(line),
    };
    for (index, raw) in content.split(|b| *b == b'\n').enumerate() {
        let number = index as u64 + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_slice(raw) {
            Ok(serde_json::Value::Object(map)) => serde_json::Value::Object(map),
            _ => {
                errors.push(error(
                    "invalid_json_line",
                    "This line is not parseable as valid JSON.".into(),
                    None,
                    number,
                ));
                continue;
            }
        };
        let Some(custom_id) = value.get("custom_id").and_then(|v| v.as_str()) else {
            errors.push(error(
                "missing_required_parameter",
                "Each line needs a `custom_id` string.".into(),
                Some("custom_id"),
                number,
            ));
            continue;
        };
        if !seen.insert(custom_id.to_owned()) {
            errors.push(error(
                "duplicate_custom_id",
                format!("The custom_id `{custom_id}` is used by an earlier line; each request in a batch needs its own."),
                Some("custom_id"),
                number,
            ));
            continue;
        }
        let method = value
            .get("method")
            .and_then(|v| v.as_str())
            .unwrap_or("POST");
        if !method.eq_ignore_ascii_case("POST") {
            errors.push(error(
                "invalid_method",
                format!("The method must be POST, not `{method}`."),
                Some("method"),
                number,
            ));
            continue;
        }
        let url = value
            .get("url")
            .and_then(|v| v.as_str())
            .unwrap_or(endpoint);
        if url != endpoint {
            errors.push(error(
                "url_mismatch",
                format!("The url `{url}` does not match the batch's endpoint `{endpoint}`."),
                Some("url"),
                number,
            ));
            continue;
        }
        let Some(body) = value.get("body").filter(|b| b.is_object()) else {
            errors.push(error(
                "missing_required_parameter",
                "Each line needs a `body` object: the request.".into(),
                Some("body"),
                number,
            ));
            continue;
        };
        let Some(model) = body.get("model").and_then(|m| m.as_str()) else {
            errors.push(error(
                "missing_required_parameter",
                "The request body needs a `model`.".into(),
                Some("body.model"),
                number,
            ));
            continue;
        };
        if !known_models.contains(model) {
            errors.push(error(
                "model_not_found",
                format!("The model `{model}` does not exist or is not available to this key."),
                Some("body.model"),
                number,
            ));
            continue;
        }
        if body.get("stream").and_then(|s| s.as_bool()) == Some(true) {
            errors.push(error(
                "invalid_request",
                "Batch requests cannot stream.".into(),
                Some("body.stream"),
                number,
            ));
            continue;
        }
        lines.push(Line {
            number,
            model: model.to_owned(),
            body: body.clone(),
        });
    }
    if errors.is_empty() && lines.is_empty() {
        errors.push_always(BatchError {
            code: "empty_file".into(),
            message: "The input file has no requests.".into(),
            param: None,
            line: None,
        });
    }
    if lines.len() > max_requests {
        errors.push_always(BatchError {
            code: "too_many_tasks".into(),
            message: format!(
                "The input file has {} requests; a batch may have at most {max_requests}.",
                lines.len()
            ),
            param: None,
            line: None,
        });
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors.finish())
    }
}

/// The problems of an input file, at most `max` of them with a line each: a file of 200,000
/// bad lines is no reason to store 200,000 errors in a batch object that every read of the
/// batch decodes. Past `max`, one last `too_many_errors` entry says how many more there were,
/// as OpenAI's shape allows.
pub(super) struct ErrorList {
    pub(super) errors: Vec<BatchError>,
    pub(super) max: usize,
    /// Line errors not kept.
    pub(super) more: u64,
}

impl ErrorList {
    pub(super) fn new(max: usize) -> Self {
        ErrorList {
            errors: Vec::new(),
            max: max.max(1),
            more: 0,
        }
    }

    pub(super) fn push(&mut self, error: BatchError) {
        if self.errors.len() < self.max {
            self.errors.push(error);
        } else {
            self.more += 1;
        }
    }

    /// A problem of the file as a whole: always kept.
    pub(super) fn push_always(&mut self, error: BatchError) {
        self.errors.push(error);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.errors.is_empty() && self.more == 0
    }

    pub(super) fn finish(mut self) -> Vec<BatchError> {
        if self.more > 0 {
            self.errors.push(BatchError {
                code: "too_many_errors".into(),
                message: format!(
                    "{} more lines have problems; fix the ones above and upload the file again.",
                    self.more
                ),
                param: None,
                line: None,
            });
        }
        self.errors
    }
}

pub(super) fn check_metadata(metadata: &Option<BTreeMap<String, String>>) -> Result<(), ApiError> {
    let Some(metadata) = metadata else {
        return Ok(());
    };
    let bad = metadata.len() > 16
        || metadata
            .iter()
            .any(|(k, v)| k.chars().count() > 64 || v.chars().count() > 512);
    if bad {
        return Err(ApiError::bad_request(
            "metadata holds at most 16 pairs, keys up to 64 characters and values up to 512.",
            Some("metadata"),
        ));
    }
    Ok(())
}
