//! What a request is billed: the usage a backend reports, checked against what the gateway saw.
//!
//! A rig belongs to a stranger, and a client can hang up whenever it likes; neither may decide
//! what a request costs. So the gateway counts the output it forwards (text values and their
//! bytes) and bounds the reported usage by what it can check:
//!
//! - **prompt tokens** at most the request's bytes (a token is at least a byte of its text), plus
//!   room for the chat template and for media parts, whose tokens are not in the bytes;
//! - **completion tokens** at most `max_tokens` for every choice the request asked for, and at
//!   most what the forwarded output could hold (a token yields at least one byte of text, or is a
//!   special token, of which an event carries few); zero for endpoints that generate nothing;
//! - and never fewer than the output delivered: each non-empty text value took a token at least.
//!
//! When the backend reported nothing (a stream cut short by the client, the rig or a timeout),
//! the bill is estimated from what was delivered: the request's prompt estimate, and the larger
//! of the text values and a token per four bytes of text. Exact token counts, with the model's
//! tokenizer, are the trust issue's; these bounds are what any gateway must enforce.

use memchr::memmem::Finder;

/// Token counts as OpenAI reports them; the Responses API names them `input_tokens` and
/// `output_tokens`.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize, PartialEq, Eq)]
pub struct Usage {
    #[serde(default, alias = "input_tokens")]
    pub prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    pub completion_tokens: u64,
}

/// Prompt tokens a request may have beyond its bytes: the chat template (a few tokens a
/// message), a default system prompt the template adds (Llama 3.1's is about 30 tokens),
/// special tokens. A bound, not an estimate; the request's bytes already over-count its tokens
/// about four times.
const PROMPT_SLACK_TOKENS: u64 = 256;
/// Prompt tokens a media part (an image, audio or video) may add: its URL or id is a few bytes,
/// its tokens are many (a large image in a vision model runs to a few thousand, a video more).
const MEDIA_PART_TOKENS: u64 = 32_768;
/// Completion tokens beyond the output's bytes and text values, per choice: an end-of-sequence
/// token, special tokens that print nothing, whitespace the detokenizer cleaned up, a tool
/// call's name.
const OUTPUT_SLACK_TOKENS: u64 = 64;
/// Bytes of text per token when estimating the tokens of a stream that was cut short: the usual
/// figure for English text with the tokenizers of today's open models.
const BYTES_PER_TOKEN_ESTIMATE: u64 = 4;

/// Names of the members of a request that carry media, whose tokens are not in its bytes.
const MEDIA_KEYS: &[&[u8]] = &[
    b"\"image_url\"",
    b"\"input_image\"",
    b"\"input_audio\"",
    b"\"audio_url\"",
    b"\"video_url\"",
];

/// Which members of an answer hold generated text, per kind of endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TextKind {
    /// Chat completions: message `content`, reasoning, tool call arguments, refusals.
    Chat,
    /// A chat stream: the same members, in each chunk's `delta`.
    ChatStream,
    /// Completions: `text`.
    Completions,
    /// A Responses stream: the `delta` of its `response.*.delta` events (the full text comes
    /// again in the closing events, which are not counted).
    ResponsesStream,
    /// A whole Responses answer: the `text` of its output parts.
    Responses,
    /// Anthropic's Messages, whole or streamed: the `text` of text blocks and `text_delta`s,
    /// the `thinking` of thinking blocks and deltas, tool calls' `input` (an object in a whole
    /// answer, `partial_json` text in a stream).
    Messages,
    /// Embeddings, rerank, score: no generated text, no completion tokens.
    #[default]
    None,
}

struct Finders {
    /// A chat chunk's `"delta"`, and the `"text"` and `"delta"` members of completions and
    /// Responses events: one search per forwarded chunk, with a needle rare enough for the
    /// searcher's prefilter (a quote alone is everywhere in JSON).
    delta: Finder<'static>,
    message: Finder<'static>,
    text: Finder<'static>,
    input: Finder<'static>,
    media: Vec<Finder<'static>>,
}

fn finders() -> &'static Finders {
    static FINDERS: std::sync::LazyLock<Finders> = std::sync::LazyLock::new(|| Finders {
        delta: Finder::new(b"\"delta\""),
        message: Finder::new(b"\"message\""),
        text: Finder::new(b"\"text\""),
        input: Finder::new(b"\"input\""),
        media: MEDIA_KEYS.iter().map(Finder::new).collect(),
    });
    &FINDERS
}

/// Names of the members of a chat message or delta that hold generated text.
const CHAT_KEYS: &[&[u8]] = &[
    b"content",
    b"reasoning_content",
    b"reasoning",
    b"arguments",
    b"refusal",
];

/// Names of the members of Anthropic's content blocks and deltas that hold generated text.
const MESSAGES_KEYS: &[&[u8]] = &[b"text", b"thinking", b"partial_json"];

/// The output the gateway forwarded to the client, counted as it went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputCount {
    /// Non-empty text values: each took at least one token to generate.
    pub values: u64,
    /// Bytes of text in them (an escape counts as the bytes it stands for, about).
    pub text_bytes: u64,
}

impl OutputCount {
    /// Counts the text in `bytes`: a whole answer, or whole events of a stream (the tap hands
    /// over whole events only). Measured with bench/instructions.sh: a pass over every member of
    /// every chunk cost a streamed request a fifth more instructions, so a chunk is searched
    /// once for the member that holds its text, and only that member is read.
    pub fn scan(&mut self, bytes: &[u8], kind: TextKind) {
        self.scan_into(bytes, kind, None);
    }

    /// [`Self::scan`], appending the text counted to `sink` too (decoded), for a request whose
    /// tokens the gateway counts itself (see the `tokens` module of the ledger).
    pub fn scan_into(&mut self, bytes: &[u8], kind: TextKind, mut sink: Option<&mut String>) {
        let f = finders();
        match kind {
            // `"delta": {...}`: its members (content, tool call arguments...).
            TextKind::ChatStream => {
                for at in f.delta.find_iter(bytes) {
                    let Some(object) = member_value(bytes, at + b"\"delta\"".len()) else {
                        continue;
                    };
                    // Nearly every chunk: `{"content":"..."}` and nothing else, read as is.
                    if let Some(text) = object.strip_prefix(b"{\"content\":\"")
                        && let (len, Some(end)) = string_span(text)
                        && text.get(end + 1) == Some(&b'}')
                    {
                        if len > 0 {
                            self.values += 1;
                            self.text_bytes += len;
                            if let Some(sink) = sink.as_deref_mut() {
                                push_json_string(&text[..end], sink);
                            }
                        }
                        continue;
                    }
                    if object.first() == Some(&b'{') {
                        let object = &object[..object_end(object)];
                        self.scan_members(object, CHAT_KEYS, sink.as_deref_mut());
                    }
                }
            }
            // A whole answer: each choice's `"message": {...}`.
            TextKind::Chat => {
                for at in f.message.find_iter(bytes) {
                    if let Some(object) = member_value(bytes, at + b"\"message\"".len())
                        && object.first() == Some(&b'{')
                    {
                        self.scan_members(
                            &object[..object_end(object)],
                            CHAT_KEYS,
                            sink.as_deref_mut(),
                        );
                    }
                }
            }
            TextKind::Completions | TextKind::Responses => {
                self.scan_named(bytes, &f.text, b"\"text\"".len(), sink)
            }
            TextKind::ResponsesStream => self.scan_named(bytes, &f.delta, b"\"delta\"".len(), sink),
            TextKind::Messages => {
                self.scan_members(bytes, MESSAGES_KEYS, sink.as_deref_mut());
                // A tool call's input, whole: the JSON the model wrote (`{}` opens a stream's
                // tool_use block, whose input then comes as `partial_json`).
                for at in f.input.find_iter(bytes) {
                    if let Some(object) = member_value(bytes, at + b"\"input\"".len())
                        && object.first() == Some(&b'{')
                    {
                        let object = &object[..object_end(object)];
                        if object.len() > 2 {
                            self.values += 1;
                            self.text_bytes += object.len() as u64;
                            if let Some(sink) = sink.as_deref_mut() {
                                sink.push_str(&String::from_utf8_lossy(object));
                            }
                        }
                    }
                }
            }
            TextKind::None => {}
        }
    }

    /// Counts the string values of the members `finder` finds (a quoted name of `name_len`
    /// bytes); other values (a chat chunk's `"delta": {...}`) are not text.
    fn scan_named(
        &mut self,
        bytes: &[u8],
        finder: &Finder<'_>,
        name_len: usize,
        mut sink: Option<&mut String>,
    ) {
        for at in finder.find_iter(bytes) {
            if let Some(value) = member_value(bytes, at + name_len)
                && let Some(text) = value.strip_prefix(b"\"")
            {
                self.add(text, sink.as_deref_mut());
            }
        }
    }

    /// Counts the string values of the members of `bytes` named in `keys`, colon by colon: a
    /// name's closing quote before the colon, a value's opening quote after it (spaces allowed
    /// around). A colon in text never passes: the quotes around it there are escaped (`\"`).
    fn scan_members(&mut self, bytes: &[u8], keys: &[&[u8]], mut sink: Option<&mut String>) {
        for at in memchr::memchr_iter(b':', bytes) {
            let Some(value) = bytes[at + 1..].trim_ascii_start().strip_prefix(b"\"") else {
                continue;
            };
            let Some(name_end) = bytes[..at].trim_ascii_end().len().checked_sub(1) else {
                continue;
            };
            if bytes[name_end] == b'"' && named(bytes, name_end, keys) {
                self.add(value, sink.as_deref_mut());
            }
        }
    }

    /// Counts the string value that `value` starts with (just after its opening quote).
    fn add(&mut self, value: &[u8], sink: Option<&mut String>) {
        let (len, end) = string_span(value);
        if len > 0 {
            self.values += 1;
            self.text_bytes += len;
            if let Some(sink) = sink {
                push_json_string(&value[..end.unwrap_or(value.len())], sink);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.values == 0
    }
}

/// The value of a member whose quoted name ends just before `after`: what follows the colon
/// (spaces skipped), or `None` when no colon follows (the name was a string value).
fn member_value(bytes: &[u8], after: usize) -> Option<&[u8]> {
    let rest = bytes.get(after..)?.trim_ascii_start().strip_prefix(b":")?;
    Some(rest.trim_ascii_start())
}

/// Length of the JSON object `bytes` starts with, through its closing brace (all of `bytes`
/// when cut short), skipping strings so that braces in text do not count.
fn object_end(bytes: &[u8]) -> usize {
    let mut depth = 0usize;
    let mut at = 0;
    while let Some(i) = memchr::memchr3(b'{', b'}', b'"', &bytes[at..]) {
        at += i;
        match bytes[at] {
            b'{' => depth += 1,
            b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return at + 1;
                }
            }
            _ => {
                // A string: to its closing quote, over escapes.
                at += 1;
                while let Some(i) = memchr::memchr2(b'"', b'\\', &bytes[at..]) {
                    at += i;
                    if bytes[at] == b'"' {
                        break;
                    }
                    at += 2;
                    if at >= bytes.len() {
                        return bytes.len();
                    }
                }
            }
        }
        at += 1;
        if at >= bytes.len() {
            break;
        }
    }
    bytes.len()
}

/// Whether the member name that ends with the quote at `name_end` is one of `keys`, and is a
/// member's name: its opening quote follows `{` or `,`.
fn named(bytes: &[u8], name_end: usize, keys: &[&[u8]]) -> bool {
    let Some(start) = memchr::memrchr(b'"', &bytes[..name_end]) else {
        return false;
    };
    let name = &bytes[start + 1..name_end];
    keys.contains(&name) && matches!(bytes[..start].trim_ascii_end().last(), Some(b'{' | b','))
}

/// Appends the text of a JSON string's body (between its quotes, escapes undone) to `sink`.
fn push_json_string(raw: &[u8], sink: &mut String) {
    if memchr::memchr(b'\\', raw).is_none() {
        sink.push_str(&String::from_utf8_lossy(raw));
        return;
    }
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    if let Ok(text) = serde_json::from_slice::<String>(&quoted) {
        sink.push_str(&text);
    }
}

/// Bytes of the JSON string that `value` starts with (just after its opening quote), up to its
/// closing quote or the end of `value` (`\uXXXX` counts two bytes, other escapes one), and
/// where the closing quote is (`None`: cut short).
fn string_span(value: &[u8]) -> (u64, Option<usize>) {
    let mut at = 0;
    let mut bytes = 0u64;
    while let Some(i) = memchr::memchr2(b'"', b'\\', &value[at..]) {
        bytes += i as u64;
        at += i;
        if value[at] == b'"' {
            return (bytes, Some(at));
        }
        // An escape: `\uXXXX` stands for a character of one to three bytes, the others for one.
        if value.get(at + 1) == Some(&b'u') {
            bytes += 2;
            at += 6;
        } else {
            bytes += 1;
            at += 2;
        }
        if at >= value.len() {
            return (bytes, None);
        }
    }
    (bytes + (value.len() - at) as u64, None)
}

/// What the request allows, read when it was admitted.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestBounds {
    /// Bytes of the request body.
    pub request_bytes: u64,
    /// The gateway's estimate of its prompt tokens (billed when the backend reports none).
    pub prompt_estimate: u64,
    /// `max_tokens` (or its other names), if the request set it.
    pub max_tokens: Option<u32>,
    /// Outputs the request asks for: `n`, times the prompts of a completions request.
    pub choices: u32,
    /// Which members of the answer are generated text.
    pub text: TextKind,
}

/// A correction the gateway made to a reported usage, counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Correction {
    /// More prompt tokens than the request could hold.
    PromptOverRequest,
    /// More completion tokens than `max_tokens` allows (for every choice).
    CompletionOverMaxTokens,
    /// More completion tokens than the forwarded output could hold.
    CompletionOverOutput,
    /// Fewer completion tokens than the output delivered took.
    CompletionUnderOutput,
    /// No usage reported (cut short, or a backend that does not report it): estimated.
    Estimated,
    /// The report disagreed with the gateway's own count (the model's tokenizer), beyond the
    /// tolerance: the count is billed.
    Disputed,
}

impl Correction {
    pub fn as_str(self) -> &'static str {
        match self {
            Correction::PromptOverRequest => "prompt_over_request",
            Correction::CompletionOverMaxTokens => "completion_over_max_tokens",
            Correction::CompletionOverOutput => "completion_over_output",
            Correction::CompletionUnderOutput => "completion_under_output",
            Correction::Estimated => "estimated",
            Correction::Disputed => "disputed",
        }
    }

    /// Whether the backend said something the gateway could not believe (an estimate for a
    /// request cut short is not the backend's doing).
    pub fn is_anomaly(self) -> bool {
        !matches!(self, Correction::Estimated)
    }
}

/// The usage to bill, and the corrections made to get it (most one per field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Billed {
    pub usage: Usage,
    pub corrections: Vec<Correction>,
}

/// The most prompt tokens a request of `request_bytes` with `media_parts` can be billed: what
/// [`bill`] cuts a reported prompt down to (an account's hold covers it; see `accounts`).
pub fn most_prompt_tokens(request_bytes: u64, media_parts: u64) -> u64 {
    request_bytes
        .saturating_add(PROMPT_SLACK_TOKENS)
        .saturating_add(media_parts.saturating_mul(MEDIA_PART_TOKENS))
}

/// Media parts (images, audio, video) in a request body: each may add many prompt tokens that
/// are not in its bytes.
pub fn media_parts(request_body: &[u8]) -> u64 {
    finders()
        .media
        .iter()
        .map(|finder| finder.find_iter(request_body).count() as u64)
        .sum()
}

/// Bills a request: `reported` (if the backend reported usage) bounded by `bounds` and the
/// `output` the gateway forwarded; an estimate from them when nothing was reported.
/// `media_parts` is asked only when a reported prompt is over the plain bound (it reads the
/// request: see [`media_parts`]).
pub fn bill(
    reported: Option<Usage>,
    output: &OutputCount,
    bounds: &RequestBounds,
    media_parts: impl FnOnce() -> u64,
) -> Billed {
    let mut corrections = Vec::new();
    let choices = u64::from(bounds.choices.max(1));
    let generates = bounds.text != TextKind::None;
    let completion_max = if !generates {
        0
    } else {
        let by_output = output
            .text_bytes
            .saturating_add(output.values)
            .saturating_add(OUTPUT_SLACK_TOKENS.saturating_mul(choices));
        match bounds.max_tokens {
            Some(max) if max > 0 => by_output.min(u64::from(max).saturating_mul(choices)),
            _ => by_output,
        }
    };
    let completion_min = if generates {
        output.values.min(completion_max)
    } else {
        0
    };
    let Some(reported) = reported else {
        corrections.push(Correction::Estimated);
        let estimate = output
            .values
            .max(output.text_bytes.div_ceil(BYTES_PER_TOKEN_ESTIMATE));
        return Billed {
            usage: Usage {
                prompt_tokens: bounds.prompt_estimate,
                completion_tokens: estimate.clamp(completion_min, completion_max),
            },
            corrections,
        };
    };
    let mut prompt = reported.prompt_tokens;
    let plain_bound = bounds.request_bytes.saturating_add(PROMPT_SLACK_TOKENS);
    if prompt > plain_bound {
        let media = media_parts();
        let bound = plain_bound.saturating_add(media.saturating_mul(MEDIA_PART_TOKENS));
        if prompt > bound {
            prompt = bound;
            corrections.push(Correction::PromptOverRequest);
        }
    }
    let mut completion = reported.completion_tokens;
    if completion > completion_max {
        let by_max_tokens = bounds
            .max_tokens
            .is_some_and(|max| max > 0 && u64::from(max).saturating_mul(choices) == completion_max);
        corrections.push(if by_max_tokens {
            Correction::CompletionOverMaxTokens
        } else {
            Correction::CompletionOverOutput
        });
        completion = completion_max;
    } else if completion < completion_min {
        corrections.push(Correction::CompletionUnderOutput);
        completion = completion_min;
    }
    Billed {
        usage: Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
        },
        corrections,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(text: TextKind, max_tokens: Option<u32>) -> RequestBounds {
        RequestBounds {
            request_bytes: 200,
            prompt_estimate: 50,
            max_tokens,
            choices: 1,
            text,
        }
    }

    fn usage(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
        }
    }

    #[test]
    fn text_is_counted_in_the_members_that_hold_it() {
        let mut count = OutputCount::default();
        let chunk = br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}

data: {"choices":[{"delta":{"content":"Hel\"lo \u00e9"}}]}

data: {"choices":[{"delta":{"reasoning_content":"hm"}}]}

data: {"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]}}]}

"#;
        count.scan(chunk, TextKind::ChatStream);
        // "Hel\"lo \u00e9" is 9 bytes, "hm" 2, {"a":1} 7; the empty content is no text.
        assert_eq!(
            count,
            OutputCount {
                values: 3,
                text_bytes: 9 + 2 + 7,
            }
        );
        // The common chunk read as is, an escaped quote and brace in it; a delta with more
        // members read member by member.
        let mut count = OutputCount::default();
        count.scan(
            br#"data: {"choices":[{"delta":{"content":"a\"}"}}]}

data: {"choices":[{"delta":{"content":"x","reasoning_content":"yz"}}]}

"#,
            TextKind::ChatStream,
        );
        assert_eq!((count.values, count.text_bytes), (3, 3 + 1 + 2));
        // JSON written with spaces, and a colon inside text, which is no member.
        let mut count = OutputCount::default();
        count.scan(
            b"{\"id\": \"x: y\",\n \"choices\": [{\"message\": {\"content\" : \"a: b\"}}]}",
            TextKind::Chat,
        );
        assert_eq!((count.values, count.text_bytes), (1, 4));
        // A chat delta is an object, not text; "content" inside a string is text.
        let mut count = OutputCount::default();
        count.scan(
            br#"{"message":{"x":1,"content":"say \"content\": \"no\""}}"#,
            TextKind::Chat,
        );
        assert_eq!((count.values, count.text_bytes), (1, 19));
        // Responses streams count their deltas, not the full text of the closing events.
        let mut count = OutputCount::default();
        count.scan(
            br#"{"type":"response.output_text.delta","delta":"hi"}{"type":"response.output_text.done","text":"hi"}"#,
            TextKind::ResponsesStream,
        );
        assert_eq!((count.values, count.text_bytes), (1, 2));
        // Anthropic's Messages: text blocks, a tool call's input; not the ids, the types, the
        // tool's name or the stop sequence.
        let mut count = OutputCount::default();
        count.scan(
            br#"{"id":"msg_1","type":"message","content":[{"type":"text","text":"Hi there"},{"type":"tool_use","id":"t","name":"ls","input":{"path":"/"}}],"stop_sequence":"END"}"#,
            TextKind::Messages,
        );
        assert_eq!((count.values, count.text_bytes), (2, 8 + 12));
        // Streamed: the deltas (text, thinking, a tool's partial JSON), not the blocks' empty
        // openings.
        let mut count = OutputCount::default();
        let mut text = String::new();
        count.scan_into(
            br#"event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a\"b"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"thinking_delta","thinking":"hm"}}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"t","name":"ls","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"p\":1}"}}

"#,
            TextKind::Messages,
            Some(&mut text),
        );
        assert_eq!((count.values, count.text_bytes), (3, 3 + 2 + 7));
        assert_eq!(text, "a\"bhm{\"p\":1}");
        let mut count = OutputCount::default();
        count.scan(br#"{"data":[{"embedding":[0.1]}]}"#, TextKind::None);
        assert!(count.is_empty());
    }

    #[test]
    fn an_honest_report_is_billed_as_reported() {
        let mut output = OutputCount::default();
        output.scan(
            br#"{"choices":[{"message":{"content":"Hello there, friend"}}]}"#,
            TextKind::Chat,
        );
        let billed = bill(
            Some(usage(30, 5)),
            &output,
            &bounds(TextKind::Chat, Some(16)),
            || 0,
        );
        assert_eq!(billed.usage, usage(30, 5));
        assert!(billed.corrections.is_empty());
    }

    #[test]
    fn absurd_reports_are_clamped() {
        let mut output = OutputCount::default();
        output.scan(
            br#"{"choices":[{"message":{"content":"four score"}}]}"#,
            TextKind::Chat,
        );
        // A billion completion tokens for ten bytes of text and no max_tokens.
        let billed = bill(
            Some(usage(u64::MAX, 1_000_000_000)),
            &output,
            &bounds(TextKind::Chat, None),
            || media_parts(br#"{"messages":[]}"#),
        );
        assert_eq!(billed.usage.prompt_tokens, 200 + PROMPT_SLACK_TOKENS);
        // Ten bytes of text in one value, and the slack.
        assert_eq!(billed.usage.completion_tokens, 10 + 1 + OUTPUT_SLACK_TOKENS);
        assert_eq!(
            billed.corrections,
            [
                Correction::PromptOverRequest,
                Correction::CompletionOverOutput
            ]
        );
        // With max_tokens, that is the bound (times the choices asked for).
        let mut two = bounds(TextKind::Chat, Some(3));
        two.choices = 2;
        let billed = bill(Some(usage(1, u64::MAX)), &output, &two, || 0);
        assert_eq!(billed.usage.completion_tokens, 6);
        assert_eq!(billed.corrections, [Correction::CompletionOverMaxTokens]);
        // An embedding generates nothing.
        let billed = bill(
            Some(usage(5, 7)),
            &OutputCount::default(),
            &bounds(TextKind::None, None),
            || 0,
        );
        assert_eq!(billed.usage, usage(5, 0));
        // Media parts make room for their tokens.
        let body = br#"{"messages":[{"content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        let billed = bill(
            Some(usage(20_000, 1)),
            &output,
            &bounds(TextKind::Chat, None),
            || media_parts(body),
        );
        assert_eq!(billed.usage.prompt_tokens, 20_000);
        assert!(billed.corrections.is_empty());
    }

    #[test]
    fn under_reports_bill_what_was_delivered() {
        let mut output = OutputCount::default();
        for _ in 0..40 {
            output.scan(
                br#"{"choices":[{"message":{"content":"tok"}}]}"#,
                TextKind::Chat,
            );
        }
        let billed = bill(
            Some(usage(10, 1)),
            &output,
            &bounds(TextKind::Chat, None),
            || 0,
        );
        assert_eq!(billed.usage.completion_tokens, 40);
        assert_eq!(billed.corrections, [Correction::CompletionUnderOutput]);
    }

    #[test]
    fn a_stream_cut_short_is_estimated_from_what_it_delivered() {
        let mut output = OutputCount::default();
        for _ in 0..38 {
            output.scan(
                br#"{"choices":[{"message":{"content":" word"}}]}"#,
                TextKind::Chat,
            );
        }
        let billed = bill(None, &output, &bounds(TextKind::Chat, Some(100)), || 0);
        // 38 values of 5 bytes: 38 tokens at least, 48 by the bytes.
        assert_eq!(billed.usage, usage(50, 48));
        assert_eq!(billed.corrections, [Correction::Estimated]);
        // Never over max_tokens.
        let billed = bill(None, &output, &bounds(TextKind::Chat, Some(10)), || 0);
        assert_eq!(billed.usage.completion_tokens, 10);
        // Nothing delivered: the prompt.
        let billed = bill(
            None,
            &OutputCount::default(),
            &bounds(TextKind::Chat, None),
            || 0,
        );
        assert_eq!(billed.usage, usage(50, 0));
    }

    #[test]
    fn strings_are_measured_to_their_closing_quote() {
        assert_eq!(string_span(b"abc\" rest").0, 3);
        assert_eq!(string_span(b"a\\\"b\"").0, 3);
        assert_eq!(string_span(b"\\u00e9\"").0, 2);
        assert_eq!(string_span(b"cut off").0, 7);
        assert_eq!(string_span(b"cut \\").0, 5);
        assert_eq!(string_span(b"\"").0, 0);
    }
}
