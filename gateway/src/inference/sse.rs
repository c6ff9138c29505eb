//! Server-sent events from a backend, passed through chunk by chunk while the gateway reads the
//! usage out of them.
//!
//! The gateway always asks the backend for `stream_options.include_usage`, so that it learns the
//! token counts of every stream. When the client did not ask for it, the extra usage chunk (the
//! one with `"choices": []`) is taken out before it reaches the client. Everything else is
//! forwarded byte for byte as soon as an event is complete: nothing waits for more than one
//! event.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

pub use crate::ledger::billing::Usage;

#[derive(Deserialize)]
struct ChunkHead {
    #[serde(default)]
    usage: Option<Reported>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
    /// A Responses API event's response (`response.completed` has the usage).
    #[serde(default)]
    response: Option<ResponseHead>,
    /// An Anthropic `message_start` event's message (with the input tokens).
    #[serde(default)]
    message: Option<ResponseHead>,
}

#[derive(Deserialize)]
struct ResponseHead {
    #[serde(default)]
    usage: Option<Reported>,
}

/// A usage report as it came: a count it leaves out is not a zero. Anthropic's streams report
/// in two parts (the input tokens in `message_start`, the output tokens in `message_delta`).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct Reported {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
}

impl Reported {
    /// The usage so far, `earlier` brought up to date with what this report says.
    fn over(self, earlier: Option<Usage>) -> Usage {
        let earlier = earlier.unwrap_or_default();
        Usage {
            prompt_tokens: self.prompt_tokens.unwrap_or(earlier.prompt_tokens),
            completion_tokens: self.completion_tokens.unwrap_or(earlier.completion_tokens),
        }
    }
}

/// Usage of a whole (non-streamed) response body: its top-level `usage` member, if it reports
/// one. Read from the end when the answer ends with it, as vLLM's and OpenAI's do; otherwise
/// the whole body is parsed. (A hand-written forward scan that tracks nesting measured slower
/// than serde_json's skipping, on short answers and on 16 KB ones alike.)
pub fn usage_of_body(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        usage: Option<Usage>,
    }
    if let Some(usage) = usage_at_the_end(body) {
        return usage;
    }
    serde_json::from_slice::<Body>(body).ok()?.usage
}

/// The answer's `usage` when it is the last member of the top-level object, found without
/// reading the rest: the last `"usage"` in the body, which must start a member (after `{` or
/// `,`), whose value must parse and be followed by nothing but the closing `}`. Those bytes
/// cannot be inside a string (a string's own quotes are escaped), and a `usage` nested in
/// another member is followed by that member's closing bracket too. `None`: not that shape;
/// parse the whole body. (Unlike the full parse, it does not check the bytes before it.)
fn usage_at_the_end(body: &[u8]) -> Option<Option<Usage>> {
    usage_member_at_the_end(body).map(|(_, usage)| usage)
}

/// [`usage_at_the_end`], with where the `"usage"` key starts.
pub(super) fn usage_member_at_the_end(body: &[u8]) -> Option<(usize, Option<Usage>)> {
    // The last match in the tail is the last in the body. (The forward searcher is vectorised;
    // the reverse one is not, and cost more on the whole body than this on the tail.)
    let tail = body.len().saturating_sub(USAGE_TAIL_BYTES);
    let at = tail + usage_finder().find_iter(&body[tail..]).last()?;
    let before = body[..at].iter().rev().find(|b| !b.is_ascii_whitespace())?;
    if !matches!(before, b'{' | b',') {
        return None;
    }
    let value = body[at + USAGE_KEY.len()..].trim_ascii_start();
    let value = value.strip_prefix(b":")?.trim_ascii_end();
    let value = value.strip_suffix(b"}")?;
    let usage = serde_json::from_slice::<Option<Usage>>(value).ok()?;
    Some((at, usage))
}

/// The usage of the chunk that reports it and nothing else, as vLLM and OpenAI write it: its
/// data ends with `"choices": [], "usage": {…}}`. Read without parsing the rest of the chunk
/// (id, model and the like): `usage` is the top-level object's last member (see
/// [`usage_at_the_end`]), and the member a single comma before it is its sibling, so an empty
/// `choices` there is the chunk's own. (Those bytes cannot be inside a string either: a quote
/// in a string is escaped, so it never follows `{` or `,`.) `None`: another shape, such as
/// usage on a chunk with content; parse the whole chunk.
fn usage_only_chunk(data: &[u8]) -> Option<Usage> {
    let (at, usage) = usage_member_at_the_end(data)?;
    let before = data[..at].trim_ascii_end().strip_suffix(b",")?;
    let before = before.trim_ascii_end().strip_suffix(b"]")?;
    let before = before.trim_ascii_end().strip_suffix(b"[")?;
    let before = before.trim_ascii_end().strip_suffix(b":")?;
    let before = before.trim_ascii_end().strip_suffix(b"\"choices\"")?;
    match before.trim_ascii_end().last() {
        Some(b'{' | b',') => usage,
        _ => None,
    }
}

/// Incremental SSE scanner.
pub struct SseTap {
    pending: BytesMut,
    /// Drop the usage-only chunk: the gateway asked for it, not the client.
    hide_usage_chunk: bool,
    usage: Option<Usage>,
    /// The client was just sent the stream's final usage report (the usage-only chunk, a
    /// Responses stream's `response.completed`, Anthropic's `message_delta`), for its cost.
    sent_final_usage: bool,
}

const USAGE_KEY: &[u8] = b"\"usage\"";

/// How far from the end of an answer its `usage` is looked for (vLLM's member takes under 200
/// bytes). A larger one gets the full parse.
const USAGE_TAIL_BYTES: usize = 1024;

/// The searcher for [`USAGE_KEY`], built once: it is looked for in every answer and every
/// streamed chunk.
fn usage_finder() -> &'static memchr::memmem::Finder<'static> {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(USAGE_KEY));
    &FINDER
}

impl SseTap {
    pub fn new(hide_usage_chunk: bool) -> Self {
        SseTap {
            pending: BytesMut::new(),
            hide_usage_chunk,
            usage: None,
            sent_final_usage: false,
        }
    }

    /// The usage seen so far: each report's counts replace the earlier ones, and a count a
    /// report leaves out stays as it was.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Takes a chunk from the backend; returns what to send to the client now (possibly empty).
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if !self.pending.is_empty() {
            return self.feed_events(&chunk);
        }
        let Some(at) = first_usage_report(&chunk) else {
            // Fast path: whole events, none of which report usage, pass through untouched
            // without a copy. This is almost every chunk of a stream.
            if ends_with_blank_line(&chunk) {
                return chunk;
            }
            return self.feed_events(&chunk);
        };
        // A chunk gathered from many events, usage among the last: the events before the one
        // that reports it pass in one piece, and only the rest is taken event by event.
        let start = start_of_event_at(&chunk, at);
        let rest = self.feed_events(&chunk[start..]);
        if start == 0 {
            return rest;
        }
        if rest.is_empty() {
            return chunk.slice(..start);
        }
        let mut out = BytesMut::with_capacity(start + rest.len());
        out.extend_from_slice(&chunk[..start]);
        out.extend_from_slice(&rest);
        out.freeze()
    }

    /// The slow path: `chunk` joins what is pending, and each complete event is read and kept
    /// or dropped.
    fn feed_events(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end).freeze();
            if self.keep(&event) {
                out.extend_from_slice(&event);
            }
        }
        out.freeze()
    }

    /// Whatever is left when the backend ends the stream (an unterminated last event).
    pub fn finish(&mut self) -> Bytes {
        let rest = self.pending.split().freeze();
        if !rest.is_empty() && self.keep(&rest) {
            rest
        } else {
            Bytes::new()
        }
    }

    /// Reads usage from an event and decides whether the client sees it.
    fn keep(&mut self, event: &[u8]) -> bool {
        if no_usage_reported(event) {
            return true;
        }
        let Some(data) = event_data(event) else {
            return true;
        };
        if let Some(usage) = usage_only_chunk(&data) {
            self.usage = Some(usage);
            self.sent_final_usage |= !self.hide_usage_chunk;
            return !self.hide_usage_chunk;
        }
        let Ok(head) = serde_json::from_slice::<ChunkHead>(&data) else {
            return true;
        };
        let of_response = head.response.and_then(|r| r.usage);
        // The stream's last report: a chunk of usage alone, a Responses stream's
        // `response.completed`, Anthropic's `message_delta` (not `message_start`, and not a
        // chunk of text that also reports usage so far).
        let usage_only = head.choices.as_ref().is_some_and(|c| c.is_empty());
        let last_report = of_response.is_some()
            || (head.usage.is_some() && (usage_only || head.choices.is_none()));
        let Some(reported) = head
            .usage
            .or(of_response)
            .or(head.message.and_then(|m| m.usage))
        else {
            return true;
        };
        self.usage = Some(reported.over(self.usage));
        let kept = !(self.hide_usage_chunk && usage_only);
        self.sent_final_usage |= kept && last_report;
        kept
    }

    /// Whether the events fed since the last call sent the client the stream's last usage
    /// report (the one its cost goes into).
    pub fn take_final_usage(&mut self) -> bool {
        std::mem::take(&mut self.sent_final_usage)
    }
}

/// Where each event of `bytes` (whole events) starts and ends.
pub fn events(bytes: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= bytes.len() {
            return None;
        }
        let end = event_end(&bytes[start..]).map_or(bytes.len(), |end| start + end);
        let range = start..end;
        start = end;
        Some(range)
    })
}

/// Whether `bytes` report usage (see [`no_usage_reported`]).
pub fn reports_usage(bytes: &[u8]) -> bool {
    !no_usage_reported(bytes)
}

/// True when `bytes` report no usage: no `"usage"` member, or only `"usage": null` ones (what
/// OpenAI sends on every chunk but the last when usage was asked for). Such events need no
/// parsing. A quoted `usage` inside a JSON string is escaped (`\"usage\"`), so it cannot match;
/// anything else that matches the name goes to the parser.
fn no_usage_reported(bytes: &[u8]) -> bool {
    first_usage_report(bytes).is_none()
}

/// Where the first `"usage"` that is not `"usage": null` starts (see [`no_usage_reported`]).
fn first_usage_report(bytes: &[u8]) -> Option<usize> {
    usage_finder().find_iter(bytes).find(|&at| {
        let rest = &bytes[at + USAGE_KEY.len()..];
        let rest = rest.trim_ascii_start();
        !rest
            .strip_prefix(b":")
            .is_some_and(|value| value.trim_ascii_start().starts_with(b"null"))
    })
}

/// Where the event holding byte `at` starts: just after the blank line before it, or 0 when
/// there is none.
fn start_of_event_at(buf: &[u8], at: usize) -> usize {
    let mut end = at;
    while let Some(nl) = memchr::memrchr(b'\n', &buf[..end]) {
        // A line break preceded by another (`\n\n` or `\n\r\n`) ends the previous event.
        let before = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
        if before.ends_with(b"\n") {
            return nl + 1;
        }
        end = nl;
    }
    0
}

fn ends_with_blank_line(chunk: &[u8]) -> bool {
    chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\n\r\n")
}

/// Length of the first complete event in `buf` (through its terminating blank line).
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let nl = from + i;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => from = nl + 1,
        }
    }
    None
}

/// The `data:` payload of one event (multiple data lines joined by newlines, as SSE defines).
/// Borrowed when there is one data line, as there is in every event vLLM and OpenAI send.
fn event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            data = Some(match data {
                None => Cow::Borrowed(value),
                Some(joined) => {
                    let mut joined = joined.into_owned();
                    joined.push(b'\n');
                    joined.extend_from_slice(value);
                    Cow::Owned(joined)
                }
            });
        }
    }
    data
}

/// Whether `chunk` holds a typed event that carries output: a Responses API `response.*.delta`
/// (text, reasoning, refusal, tool call arguments) or an Anthropic `content_block_delta`. The
/// type is read from the `event:` line when the backend writes one (vLLM, OpenAI and Anthropic
/// do), else from the data's `type`. An event cut by the chunk's end may be missed; the next
/// one is not.
pub fn carries_output(chunk: &[u8]) -> bool {
    let mut rest = chunk;
    while !rest.is_empty() {
        let (event, next) = rest.split_at(event_end(rest).unwrap_or(rest.len()));
        if is_output_event(event) {
            return true;
        }
        rest = next;
    }
    false
}

fn is_output_event(event: &[u8]) -> bool {
    let output = |kind: &[u8]| {
        kind == b"content_block_delta"
            || (kind.starts_with(b"response.") && kind.ends_with(b".delta"))
    };
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(kind) = line.strip_prefix(b"event:") {
            return output(kind.trim_ascii());
        }
    }
    #[derive(Deserialize)]
    struct Typed<'a> {
        #[serde(borrow, rename = "type")]
        kind: Cow<'a, str>,
    }
    event_data(event)
        .and_then(|data| {
            serde_json::from_slice::<Typed<'_>>(&data)
                .ok()
                .map(|typed| output(typed.kind.as_bytes()))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn run(tap: &mut SseTap, pieces: &[&str]) -> String {
        let mut out = Vec::new();
        for piece in pieces {
            out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(piece.as_bytes())));
        }
        out.extend_from_slice(&tap.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn hides_usage_chunk_when_asked() {
        let mut tap = SseTap::new(true);
        let out = run(&mut tap, &[CONTENT, USAGE, DONE]);
        assert_eq!(out, format!("{CONTENT}{DONE}"));
        assert_eq!(
            tap.usage(),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5
            })
        );
    }

    #[test]
    fn keeps_usage_chunk_for_clients_that_asked() {
        let mut tap = SseTap::new(false);
        let out = run(&mut tap, &[CONTENT, USAGE, DONE]);
        assert_eq!(out, format!("{CONTENT}{USAGE}{DONE}"));
        assert_eq!(tap.usage().unwrap().completion_tokens, 5);
    }

    /// A Responses API stream: typed events, the usage (`input_tokens`, `output_tokens`) in
    /// the response of the last one, and `"usage": null` in the first. Every byte passes.
    #[test]
    fn reads_the_usage_of_a_responses_stream_and_passes_it_whole() {
        let created = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"usage\":null}}\n\n";
        let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi \\\"usage\\\": 5\"}\n\n";
        let completed = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"output\":[],\"usage\":{\"input_tokens\":7,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":2,\"total_tokens\":9},\"user\":null},\"sequence_number\":3}\n\n";
        for pieces in [
            vec![created, delta, completed],
            vec![&*format!("{created}{delta}{completed}")],
        ] {
            let mut tap = SseTap::new(false);
            let out = run(&mut tap, &pieces);
            assert_eq!(out, format!("{created}{delta}{completed}"));
            assert_eq!(
                tap.usage(),
                Some(Usage {
                    prompt_tokens: 7,
                    completion_tokens: 2
                })
            );
        }
        // A non-streamed response's usage is not its last member.
        let body = br#"{"id":"resp_1","object":"response","usage":{"input_tokens":4,"output_tokens":1},"user":null}"#;
        assert_eq!(usage_of_body(body).unwrap().completion_tokens, 1);
    }

    /// An Anthropic Messages stream: the input tokens in `message_start`'s message, the output
    /// tokens in `message_delta`, which may leave the input out (Anthropic's) or repeat it
    /// (vLLM's). Every byte passes.
    #[test]
    fn reads_the_usage_of_a_messages_stream_from_its_two_reports() {
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n";
        let block = "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n";
        let delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi \\\"usage\\\": 9\"}}\n\n";
        let anthropic_end = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":5}}\n\n";
        let vllm_end = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":13,\"output_tokens\":6}}\n\n";
        let stop = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        for (end, usage) in [(anthropic_end, (12, 5)), (vllm_end, (13, 6))] {
            let all = format!("{start}{block}{delta}{end}{stop}");
            for pieces in [vec![start, block, delta, end, stop], vec![all.as_str()]] {
                let mut tap = SseTap::new(false);
                assert_eq!(run(&mut tap, &pieces), all);
                assert_eq!(
                    tap.usage(),
                    Some(Usage {
                        prompt_tokens: usage.0,
                        completion_tokens: usage.1
                    })
                );
            }
        }
        // Only the start: the input tokens, and no output yet.
        let mut tap = SseTap::new(false);
        run(&mut tap, &[start, block, delta]);
        assert_eq!(tap.usage().map(|u| u.prompt_tokens), Some(12));
        // The first token is the first delta.
        assert!(!carries_output(format!("{start}{block}").as_bytes()));
        assert!(carries_output(delta.as_bytes()));
    }

    #[test]
    fn output_events_are_told_from_the_opening_ones() {
        let created = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"instructions\":\"end in .delta\"}}\n\n";
        let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n";
        assert!(!carries_output(created.as_bytes()));
        assert!(carries_output(delta.as_bytes()));
        assert!(carries_output(format!("{created}{delta}").as_bytes()));
        // No `event:` lines: the data's type says it; CRLF line ends too.
        let data_only = |event: &str| event.split_once('\n').unwrap().1.replace('\n', "\r\n");
        assert!(!carries_output(data_only(created).as_bytes()));
        assert!(carries_output(
            format!("{}{}", data_only(created), data_only(delta)).as_bytes()
        ));
        let arguments =
            "data: {\"type\":\"response.function_call_arguments.delta\",\"delta\":\"{\"}\n\n";
        assert!(carries_output(arguments.as_bytes()));
        // Chat chunks and the end of a stream are not Responses events.
        assert!(!carries_output(CONTENT.as_bytes()));
        assert!(!carries_output(DONE.as_bytes()));
    }

    #[test]
    fn events_split_across_chunks_and_crlf() {
        let all = format!("{CONTENT}{USAGE}{DONE}").replace("\n\n", "\r\n\r\n");
        let bytes = all.as_bytes();
        let mut tap = SseTap::new(true);
        // Feed one byte at a time: the worst fragmentation a backend can produce.
        let pieces: Vec<String> = bytes.iter().map(|b| (*b as char).to_string()).collect();
        let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let out = run(&mut tap, &refs);
        let expected = format!("{CONTENT}{DONE}").replace("\n\n", "\r\n\r\n");
        assert_eq!(out, expected);
        assert_eq!(tap.usage().unwrap().prompt_tokens, 3);
    }

    /// A backend that writes faster than the gateway reads: many events in one chunk, the usage
    /// report among the last.
    #[test]
    fn a_chunk_of_many_events_keeps_them_all_but_the_hidden_usage() {
        let many = CONTENT.repeat(5);
        for (newline, hide) in [("\n\n", true), ("\r\n\r\n", true), ("\n\n", false)] {
            let crlf = |s: &str| s.replace("\n\n", newline);
            let mut tap = SseTap::new(hide);
            let out = tap.feed(Bytes::from(crlf(&format!("{many}{USAGE}{DONE}"))));
            let expected = if hide {
                format!("{many}{DONE}")
            } else {
                format!("{many}{USAGE}{DONE}")
            };
            assert_eq!(out, crlf(&expected), "{newline:?} hide={hide}");
            assert_eq!(tap.usage().unwrap().completion_tokens, 5);
            // Cut inside the usage event: the events before it pass now, the rest when it ends.
            let whole = crlf(&format!("{many}{USAGE}{DONE}"));
            let cut = crlf(&many).len() + 10;
            let mut tap = SseTap::new(hide);
            let first = tap.feed(Bytes::copy_from_slice(&whole.as_bytes()[..cut]));
            assert_eq!(first, crlf(&many));
            let second = tap.feed(Bytes::copy_from_slice(&whole.as_bytes()[cut..]));
            assert_eq!(
                [first, second].concat(),
                crlf(&expected).into_bytes(),
                "{newline:?} hide={hide}"
            );
            assert_eq!(tap.usage().unwrap().prompt_tokens, 3);
        }
        // The usage first, or its data on two lines: still read, and the events around it kept.
        let split_usage = "data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\n";
        for chunk in [
            format!("{USAGE}{CONTENT}{DONE}"),
            format!("{CONTENT}{split_usage}{DONE}"),
        ] {
            let mut tap = SseTap::new(false);
            assert_eq!(tap.feed(Bytes::from(chunk.clone())), chunk);
            assert_eq!(tap.usage().unwrap().completion_tokens, 5);
        }
        assert_eq!(start_of_event_at(b"data: a\n\ndata: b\n\n", 14), 9);
        assert_eq!(start_of_event_at(b"data: a\r\n\r\ndata: b", 15), 11);
        assert_eq!(start_of_event_at(b"data: a\ndata: b", 12), 0);
    }

    #[test]
    fn content_mentioning_usage_is_not_dropped() {
        let tricky = "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\"\"}}]}\n\n";
        let named = "data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}],\"usage\":null}\n\n";
        let mut tap = SseTap::new(true);
        let out = run(&mut tap, &[tricky, named]);
        assert_eq!(out, format!("{tricky}{named}"));
        assert_eq!(tap.usage(), None);
    }

    #[test]
    fn null_usage_needs_no_parse_and_real_usage_is_never_missed() {
        assert!(no_usage_reported(br#"{"choices":[]}"#));
        assert!(no_usage_reported(br#"{"usage":null}"#));
        assert!(no_usage_reported(
            b"{\"usage\" :\n null, \"x\": {\"usage\":null}}"
        ));
        assert!(!no_usage_reported(br#"{"usage":{"prompt_tokens":1}}"#));
        assert!(!no_usage_reported(
            br#"{"a":{"usage":null},"usage":{"prompt_tokens":1}}"#
        ));
        // The name as a value: not a member, so it goes to the parser.
        assert!(!no_usage_reported(br#"{"role":"usage"}"#));
        // OpenAI's shape: `"usage": null` on every chunk, the counts on the last one.
        let content = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        let mut tap = SseTap::new(true);
        let chunk = Bytes::from(format!("{content}{content}"));
        let passed = tap.feed(chunk.clone());
        // Passed on as it came: the same bytes, not a copy.
        assert_eq!(passed.as_ptr(), chunk.as_ptr());
        let out = run(&mut tap, &[USAGE, DONE]);
        assert_eq!(out, DONE);
        assert_eq!(tap.usage().unwrap().completion_tokens, 5);
    }

    /// The usage-only chunk is read from its end; every other shape gets the full parse, and
    /// a chunk with content that also reports usage (vLLM's `continuous_usage_stats`) is
    /// never hidden.
    #[test]
    fn usage_only_chunks_are_read_from_their_end() {
        let counts = Usage {
            prompt_tokens: 10,
            completion_tokens: 16,
        };
        let vllm = br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":10,"total_tokens":26,"completion_tokens":16}}"#;
        assert_eq!(usage_only_chunk(vllm), Some(counts));
        let spaced = b"{\"id\": \"x\",\n \"choices\" : [ ] ,\n \"usage\": {\"prompt_tokens\": 10, \"completion_tokens\": 16}\n}";
        assert_eq!(usage_only_chunk(spaced), Some(counts));
        for other in [
            // Content and usage together.
            &br#"{"choices":[{"delta":{"content":"hi"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#[..],
            // Choices after usage, or not the member before it.
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"choices":[]}"#,
            br#"{"choices":[],"id":"x","usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
            // An empty `choices` nested in the member before usage.
            br#"{"x":{"choices":[]},"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
            // The words inside a string.
            br#"{"id":"\"choices\":[],","usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
            // No counts.
            br#"{"choices":[],"usage":null}"#,
        ] {
            assert_eq!(usage_only_chunk(other), None, "{}", String::from_utf8_lossy(other));
        }
        let with_content = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n";
        let mut tap = SseTap::new(true);
        let out = run(&mut tap, &[with_content, USAGE, DONE]);
        assert_eq!(out, format!("{with_content}{DONE}"));
        assert_eq!(tap.usage().unwrap().completion_tokens, 5);
    }

    #[test]
    fn body_usage() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#;
        assert_eq!(usage_of_body(body).unwrap().prompt_tokens, 7);
        assert_eq!(usage_of_body(b"not json"), None);
    }

    /// Only the answer's own `usage` counts: not one nested in its members, not the word in its
    /// text.
    #[test]
    fn body_usage_is_the_top_level_member_only() {
        let usage = |p: u64, c: u64| {
            Some(Usage {
                prompt_tokens: p,
                completion_tokens: c,
            })
        };
        let cases: &[(&str, Option<Usage>)] = &[
            // vLLM's shape: usage last.
            (
                r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
                usage(3, 1),
            ),
            // First, with spaces and newlines around the colon.
            (
                "{\n  \"usage\" \n : {\"prompt_tokens\": 5, \"completion_tokens\": 6},\n \"id\": \"x\"}",
                usage(5, 6),
            ),
            // A nested `usage` (a tool's, a vendor extension's) is not the answer's.
            (
                r#"{"choices":[{"usage":{"prompt_tokens":99,"completion_tokens":99}}],"x":{"usage":{"prompt_tokens":98}},"usage":{"prompt_tokens":2,"completion_tokens":4}}"#,
                usage(2, 4),
            ),
            (
                r#"{"choices":[{"usage":{"prompt_tokens":99,"completion_tokens":99}}]}"#,
                None,
            ),
            // The word in content, escaped quotes and braces included, is text.
            (
                r#"{"choices":[{"message":{"content":"{\"usage\": {\"prompt_tokens\": 99}} \\\\"}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
                usage(1, 2),
            ),
            (
                r#"{"choices":[{"message":{"content":"\"usage\":{\"prompt_tokens\":99}}"}}]}"#,
                None,
            ),
            // A value that spells the key is not a key; nor is a string in an array.
            (
                r#"{"object":"usage","list":["usage",{"a":1}],"usage":{"prompt_tokens":8,"completion_tokens":0}}"#,
                usage(8, 0),
            ),
            (r#"{"object":"usage"}"#, None),
            // Reported as null, or not reported.
            (r#"{"id":"x","usage":null}"#, None),
            (r#"{"id":"x"}"#, None),
            // Unicode escapes and multi-byte text before it.
            (
                r#"{"content":"caf\u00e9 \\ \" ☕","usage":{"prompt_tokens":4,"completion_tokens":5}}"#,
                usage(4, 5),
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(usage_of_body(body.as_bytes()), *expected, "{body}");
        }
        // The shapes read from the end, and those left to the full parse.
        let read_from_the_end = |body: &str| usage_at_the_end(body.as_bytes()).is_some();
        assert!(read_from_the_end(cases[0].0));
        assert!(read_from_the_end(cases[2].0));
        assert!(read_from_the_end(r#"{"id":"x","usage":null}"#));
        assert!(read_from_the_end(
            "{\"id\":\"x\",\n \"usage\" : {\"prompt_tokens\":1} \n}\n"
        ));
        for nested_or_not_last in [
            cases[1].0,
            cases[3].0,
            r#"{"a":{"usage":{"prompt_tokens":9}}}"#,
            r#"{"a":[{"usage":{"prompt_tokens":9}}]}"#,
            r#"{"usage":{"prompt_tokens":1},"id":"x"}"#,
            r#"{"object":"usage"}"#,
            r#"{"t":"say \"usage","n":1}"#,
        ] {
            assert!(
                !read_from_the_end(nested_or_not_last),
                "{nested_or_not_last}"
            );
        }
        // A long answer: its usage is still read from the end. A usage member longer than the
        // tail that is searched is left to the full parse, which finds it.
        let text = "usage ".repeat(1000);
        let long = format!(
            r#"{{"content":"{text}","usage":{{"prompt_tokens":6,"completion_tokens":7}}}}"#
        );
        assert!(read_from_the_end(&long));
        assert_eq!(usage_of_body(long.as_bytes()), usage(6, 7));
        let padding = " ".repeat(USAGE_TAIL_BYTES);
        let wide = format!(
            r#"{{"content":"{text}","usage":{{"prompt_tokens":6,{padding}"completion_tokens":7}}}}"#
        );
        assert!(!read_from_the_end(&wide));
        assert_eq!(usage_of_body(wide.as_bytes()), usage(6, 7));
        // Broken text: no usage.
        assert_eq!(usage_of_body(br#"{"content":"never closed"#), None);
        assert_eq!(usage_of_body(br#"{"content":"ends in an escape\"#), None);
    }
}
