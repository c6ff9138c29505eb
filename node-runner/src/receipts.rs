//! Receipts: the rig signs what it served, and checks the gateway's statement of it.
//!
//! Every answer an engine gives through the tunnel ends with a trailer, `garage-receipt`: the
//! request id the gateway sent, the model, the usage the engine reported and the SHA-256 of the
//! answer's bytes, signed with the rig's Ed25519 key (the encoding is
//! [`garage_node_protocol::receipt`]'s). A batch line's result carries its receipt in a field
//! instead, over the canonical JSON of its body. The key is made at enrollment and kept in the
//! state file beside the credential. `node-runner statement` fetches the gateway's statement of the
//! rig's requests and checks each receipt in it against the rig's own key.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use garage_node_protocol::receipt::{
    AnswerHasher, PublicKey, Receipt, SigningKey, TokenCounts, batch_request_id, canonical_json,
};
use garage_node_protocol::{
    BatchLineResult, RECEIPT_TRAILER, ReceiptCheck, STATEMENT_PATH, Statement, StatementEntry,
};
use hyper::body::{Body, Frame, SizeHint};
use serde::Deserialize;

use crate::gateways::Gateways;

/// How an agent signs its answers. [`Receipts::Signed`] is what node-runner does; the others
/// make a dishonest or outdated rig, to test the gateway's checks against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Receipts {
    /// A key registered at enrollment, every answer signed with it.
    #[default]
    Signed,
    /// As a node-runner from before receipts: no key registered, nothing signed.
    Unsigned,
    /// A key registered, but no answer signed.
    Withheld,
    /// Signed with another key than the one registered.
    WrongKey,
    /// Signed over other bytes than those sent.
    WrongHash,
    /// Signed for another request than the one the gateway sent.
    WrongRequestId,
    /// As a node-runner from before batch receipts: a key registered and tunnel answers
    /// signed, batch lines not, and its heartbeats do not say it signs them.
    TunnelOnly,
}

impl Receipts {
    /// Whether the rig registers a key.
    pub(crate) fn registers_a_key(self) -> bool {
        self != Receipts::Unsigned
    }

    /// Whether its heartbeats say it signs batch lines (with a key registered).
    pub(crate) fn claims_batch_receipts(self) -> bool {
        self.registers_a_key() && self != Receipts::TunnelOnly
    }
}

/// Signs the receipts of one rig.
pub(crate) struct Signer {
    node_id: String,
    key: SigningKey,
    mode: Receipts,
}

impl Signer {
    /// `None` when the rig signs nothing.
    pub(crate) fn new(node_id: &str, key: SigningKey, mode: Receipts) -> Option<Arc<Signer>> {
        let key = match mode {
            Receipts::Unsigned | Receipts::Withheld => return None,
            // A key of its own, not the one the gateway knows.
            Receipts::WrongKey => SigningKey::generate().map_or(key, |(other, _)| other),
            _ => key,
        };
        Some(Arc::new(Signer {
            node_id: node_id.to_owned(),
            key,
            mode,
        }))
    }

    /// An answer's receipt, signed (or signed wrongly, as the mode says).
    fn sign(&self, mut receipt: Receipt) -> Option<String> {
        match self.mode {
            Receipts::WrongHash => receipt.answer_sha256[0] ^= 0xff,
            Receipts::WrongRequestId => receipt.request_id.push_str("-0"),
            _ => {}
        }
        match receipt.sign(&self.key) {
            Ok(value) => Some(value),
            Err(err) => {
                tracing::warn!(request_id = %receipt.request_id, error = %err, "cannot sign this answer's receipt");
                None
            }
        }
    }

    /// The trailer of an answer: its receipt, signed.
    fn trailer(&self, receipt: Receipt) -> Option<http::HeaderMap> {
        let value = http::HeaderValue::from_str(&self.sign(receipt)?).ok()?;
        let mut trailers = http::HeaderMap::with_capacity(1);
        trailers.insert(RECEIPT_TRAILER, value);
        Some(trailers)
    }

    /// The receipt of a batch line's result, for [`BatchLineResult::receipt`]: request id
    /// `{batch_id}:{line}`, the line's model, the engine's status, the body's `usage`, and the
    /// length and SHA-256 of the body's canonical JSON.
    pub(crate) fn batch_receipt(&self, result: &BatchLineResult) -> Option<String> {
        if self.mode == Receipts::TunnelOnly {
            return None;
        }
        let mut hasher = AnswerHasher::default();
        hasher.update(&canonical_json(&result.body));
        let (answer_sha256, answer_bytes) = hasher.finish();
        let usage = result
            .body
            .get("usage")
            .and_then(|usage| EngineUsage::deserialize(usage).ok())
            .map(EngineUsage::counts);
        self.sign(Receipt {
            node_id: self.node_id.clone(),
            request_id: batch_request_id(&result.batch_id, result.line),
            model: result.model.clone(),
            status: result.status_code,
            usage,
            answer_bytes,
            answer_sha256,
        })
    }
}

/// An engine's answer on its way to the gateway: every byte hashed, the usage read, and the
/// signed receipt sent as a trailer once the engine ended it. An answer that breaks off gets no
/// receipt.
pub(crate) struct SignedBody<B> {
    inner: B,
    signer: Arc<Signer>,
    request_id: String,
    model: String,
    status: u16,
    hasher: AnswerHasher,
    usage: UsageScan,
    done: bool,
}

impl<B> SignedBody<B> {
    pub(crate) fn new(
        inner: B,
        signer: Arc<Signer>,
        request_id: String,
        model: String,
        status: u16,
        event_stream: bool,
    ) -> Self {
        SignedBody {
            inner,
            signer,
            request_id,
            model,
            status,
            hasher: AnswerHasher::default(),
            usage: if event_stream {
                UsageScan::Events {
                    line: Vec::new(),
                    usage: None,
                }
            } else {
                UsageScan::Whole(Some(Vec::new()))
            },
            done: false,
        }
    }

    fn trailer(&mut self) -> Option<http::HeaderMap> {
        let (answer_sha256, answer_bytes) = std::mem::take(&mut self.hasher).finish();
        self.signer.trailer(Receipt {
            node_id: self.signer.node_id.clone(),
            request_id: std::mem::take(&mut self.request_id),
            model: std::mem::take(&mut self.model),
            status: self.status,
            usage: self.usage.finish(),
            answer_bytes,
            answer_sha256,
        })
    }
}

impl<B> Body for SignedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.hasher.update(data);
                    this.usage.feed(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(err)) => {
                this.done = true;
                Poll::Ready(Some(Err(err)))
            }
            None => {
                this.done = true;
                Poll::Ready(this.trailer().map(|trailers| Ok(Frame::trailers(trailers))))
            }
        }
    }

    /// Not before the trailer went: hyper would end the stream with the last data.
    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Most bytes of an answer (or of one line of a stream) kept to read its usage: an answer
/// bigger than this is signed with no usage.
const USAGE_SCAN_LIMIT: usize = 16 << 20;

/// Reads the usage the engine reported, as the answer passes.
enum UsageScan {
    /// A whole JSON answer: its top-level `usage`, read at the end (`None`: too big).
    Whole(Option<Vec<u8>>),
    /// Server-sent events: the usage of the `data:` lines (a chat stream's last chunk, a
    /// Responses stream's `response.completed`, an Anthropic stream's `message_start` and
    /// `message_delta`), read line by line, each report's counts replacing the earlier ones
    /// (a count a report leaves out stays as it was), as the gateway reads them.
    Events {
        line: Vec<u8>,
        usage: Option<TokenCounts>,
    },
}

#[derive(Deserialize)]
struct UsageOf {
    #[serde(default)]
    usage: Option<EngineUsage>,
    /// A Responses API event's response.
    #[serde(default)]
    response: Option<Box<UsageOf>>,
    /// An Anthropic `message_start` event's message.
    #[serde(default)]
    message: Option<Box<UsageOf>>,
}

#[derive(Deserialize)]
struct EngineUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
}

impl EngineUsage {
    fn counts(self) -> TokenCounts {
        self.over(None)
    }

    /// The counts so far: `earlier`, brought up to date with what this report says.
    fn over(self, earlier: Option<TokenCounts>) -> TokenCounts {
        let earlier = earlier.unwrap_or_default();
        TokenCounts {
            prompt_tokens: self.prompt_tokens.unwrap_or(earlier.prompt_tokens),
            completion_tokens: self.completion_tokens.unwrap_or(earlier.completion_tokens),
        }
    }
}

impl UsageOf {
    fn usage(self) -> Option<EngineUsage> {
        self.usage
            .or_else(|| self.response.and_then(|response| response.usage))
            .or_else(|| self.message.and_then(|message| message.usage))
    }

    fn counts(self) -> Option<TokenCounts> {
        Some(self.usage()?.counts())
    }
}

impl UsageScan {
    fn feed(&mut self, data: &[u8]) {
        match self {
            UsageScan::Whole(kept) => match kept {
                Some(body) if body.len() + data.len() <= USAGE_SCAN_LIMIT => {
                    body.extend_from_slice(data)
                }
                _ => *kept = None,
            },
            UsageScan::Events { line, usage } => {
                let mut rest = data;
                while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                    if line.len() + end <= USAGE_SCAN_LIMIT {
                        line.extend_from_slice(&rest[..end]);
                        if let Some(found) = usage_of_line(line) {
                            *usage = Some(found.over(*usage));
                        }
                    }
                    line.clear();
                    rest = &rest[end + 1..];
                }
                if line.len() + rest.len() <= USAGE_SCAN_LIMIT {
                    line.extend_from_slice(rest);
                }
            }
        }
    }

    fn finish(&mut self) -> Option<TokenCounts> {
        match self {
            UsageScan::Whole(body) => serde_json::from_slice::<UsageOf>(body.as_deref()?)
                .ok()?
                .counts(),
            UsageScan::Events { line, usage } => match usage_of_line(line) {
                Some(found) => Some(found.over(*usage)),
                None => *usage,
            },
        }
    }
}

/// The usage one `data:` line of an event stream reports, if it reports one.
fn usage_of_line(line: &[u8]) -> Option<EngineUsage> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    // Most events carry no usage: only those that name it are parsed.
    if !data.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    serde_json::from_slice::<UsageOf>(data).ok()?.usage()
}

/// What a rig found in the gateway's statement of its requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatementReport {
    /// Requests in the statement.
    pub entries: u64,
    /// Receipts that verify with this rig's key and match their entry.
    pub receipts_verified: u64,
    /// Receipts in the statement that do not hold for this rig: another key, another
    /// request or model, or changed since it was signed. Each with why.
    pub mismatches: Vec<String>,
    /// Requests without a receipt the rig could check, by what the gateway said of them
    /// (`no_key`, `missing`, `unchecked`...).
    pub without_receipt: BTreeMap<String, u64>,
    /// Tokens the gateway billed for the requests with a verified receipt...
    pub billed: TokenCounts,
    /// ...and what the rig's receipts say its engines reported for them.
    pub signed: TokenCounts,
}

impl std::fmt::Display for StatementReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "requests in the statement: {}", self.entries)?;
        writeln!(
            f,
            "receipts verified with this rig's key: {}",
            self.receipts_verified
        )?;
        writeln!(
            f,
            "tokens billed for them: {} prompt, {} completion (the rig's engines reported {} and {})",
            self.billed.prompt_tokens,
            self.billed.completion_tokens,
            self.signed.prompt_tokens,
            self.signed.completion_tokens
        )?;
        for (check, count) in &self.without_receipt {
            writeln!(f, "without a receipt ({check}): {count}")?;
        }
        writeln!(f, "mismatches: {}", self.mismatches.len())?;
        for mismatch in &self.mismatches {
            writeln!(f, "  {mismatch}")?;
        }
        Ok(())
    }
}

/// Checks a statement's entries against this rig's key: every receipt must verify and name its
/// entry's request and model.
pub fn check_statement(
    node_id: &str,
    key: &PublicKey,
    entries: &[StatementEntry],
) -> StatementReport {
    let mut report = StatementReport::default();
    for entry in entries {
        report.entries += 1;
        let Some(value) = &entry.receipt else {
            let check = serde_json::to_value(entry.receipt_check)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            *report.without_receipt.entry(check).or_default() += 1;
            continue;
        };
        let id = &entry.request_id;
        let signed = match Receipt::parse(value) {
            Ok(signed) => signed,
            Err(err) => {
                report
                    .mismatches
                    .push(format!("{id}: unreadable receipt: {err}"));
                continue;
            }
        };
        if let Err(err) = signed.verify(key) {
            report.mismatches.push(format!("{id}: {err}"));
            continue;
        }
        let receipt = &signed.receipt;
        let wrong = if receipt.node_id != node_id {
            Some(format!("signed for rig {}", receipt.node_id))
        } else if receipt.request_id != *id {
            Some(format!("signed for request {}", receipt.request_id))
        } else if receipt.model != entry.model {
            Some(format!(
                "signed for model {}, listed as {}",
                receipt.model, entry.model
            ))
        } else {
            None
        };
        if let Some(wrong) = wrong {
            report.mismatches.push(format!("{id}: {wrong}"));
            continue;
        }
        if entry.receipt_check != ReceiptCheck::Verified {
            report.mismatches.push(format!(
                "{id}: a receipt this rig signed, which the gateway says is {:?}",
                entry.receipt_check
            ));
        }
        report.receipts_verified += 1;
        report.billed.prompt_tokens += entry.prompt_tokens;
        report.billed.completion_tokens += entry.completion_tokens;
        let counts = receipt.usage.unwrap_or_default();
        report.signed.prompt_tokens += counts.prompt_tokens;
        report.signed.completion_tokens += counts.completion_tokens;
    }
    report
}

#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    #[error("cannot reach the gateway: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error("the gateway refused the statement ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("this rig has no receipt key in its state file (enrolled before receipts?)")]
    NoKey,
    #[error("the state file's receipt key is unreadable: {0}")]
    BadKey(#[from] garage_node_protocol::receipt::ReceiptError),
}

/// Entries per page asked of the gateway.
const STATEMENT_PAGE: u32 = 500;

/// The rig's whole statement, page after page, from whichever replica answers.
pub async fn fetch_statement(
    http: &reqwest::Client,
    gateways: &Gateways,
    credential: &str,
) -> Result<Vec<StatementEntry>, StatementError> {
    let mut entries = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = match &after {
            Some(after) => format!("?limit={STATEMENT_PAGE}&after={after}"),
            None => format!("?limit={STATEMENT_PAGE}"),
        };
        let (_, response) = gateways
            .send(|base| {
                http.get(format!("{base}{STATEMENT_PATH}{query}"))
                    .bearer_auth(credential)
                    .timeout(std::time::Duration::from_secs(60))
            })
            .await?;
        let status = response.status();
        if !status.is_success() {
            return Err(StatementError::Refused {
                status: status.as_u16(),
                message: response.text().await.unwrap_or_default(),
            });
        }
        let page: Statement = response.json().await?;
        entries.extend(page.data);
        match page.next_after {
            Some(next) if page.has_more => after = Some(next),
            _ => return Ok(entries),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn signer(mode: Receipts) -> (Arc<Signer>, PublicKey) {
        let (key, _) = SigningKey::generate().unwrap();
        let public = key.public_key();
        (Signer::new("node_1", key, mode).unwrap(), public)
    }

    async fn signed(
        frames: &[&str],
        event_stream: bool,
        mode: Receipts,
    ) -> (Bytes, Option<Receipt>, PublicKey) {
        let (signer, public) = signer(mode);
        let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = frames
            .iter()
            .map(|f| Ok(Frame::data(Bytes::copy_from_slice(f.as_bytes()))))
            .collect();
        let inner = http_body_util::StreamBody::new(futures::stream::iter(chunks));
        let body = SignedBody::new(inner, signer, "req-1".into(), "m".into(), 200, event_stream);
        let collected = body.collect().await.unwrap();
        let receipt = collected
            .trailers()
            .and_then(|t| t.get(RECEIPT_TRAILER))
            .map(|v| {
                let signed = Receipt::parse(v.to_str().unwrap()).unwrap();
                if mode != Receipts::WrongKey {
                    signed.verify(&public).unwrap();
                }
                signed.receipt
            });
        (collected.to_bytes(), receipt, public)
    }

    #[tokio::test]
    async fn a_stream_is_signed_with_its_hash_and_last_usage() {
        let frames = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi \\\"usage\\\"\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,",
            "\"completion_tokens\":2}}\r\n\r\ndata: [DONE]\n\n",
        ];
        let (bytes, receipt, _) = signed(&frames, true, Receipts::Signed).await;
        assert_eq!(bytes, frames.concat());
        let receipt = receipt.expect("a receipt");
        let mut hasher = AnswerHasher::default();
        hasher.update(frames.concat().as_bytes());
        let (hash, len) = hasher.finish();
        assert_eq!(receipt.answer_sha256, hash);
        assert_eq!(receipt.answer_bytes, len);
        assert_eq!(receipt.request_id, "req-1");
        assert_eq!(receipt.node_id, "node_1");
        assert_eq!(
            receipt.usage,
            Some(TokenCounts {
                prompt_tokens: 7,
                completion_tokens: 2
            })
        );
    }

    #[tokio::test]
    async fn a_whole_answer_and_a_responses_stream_report_their_usage() {
        let whole = r#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let (_, receipt, _) = signed(&[&whole[..10], &whole[10..]], false, Receipts::Signed).await;
        assert_eq!(receipt.unwrap().usage.unwrap().completion_tokens, 4);
        let completed = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":6}}}\n\n";
        let created = "data: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n";
        let (_, receipt, _) = signed(&[created, completed], true, Receipts::Signed).await;
        assert_eq!(
            receipt.unwrap().usage,
            Some(TokenCounts {
                prompt_tokens: 5,
                completion_tokens: 6
            })
        );
        let (_, receipt, _) = signed(&["{}"], false, Receipts::Signed).await;
        assert_eq!(receipt.unwrap().usage, None);
    }

    /// An Anthropic Messages stream reports its input tokens in `message_start` and its output
    /// tokens in `message_delta`, which may leave the input out: the receipt has both, as the
    /// gateway reads them.
    #[tokio::test]
    async fn a_messages_stream_is_signed_with_both_parts_of_its_usage() {
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n";
        let delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n";
        let end = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":4}}\n\n";
        let (_, receipt, _) = signed(&[start, delta, end], true, Receipts::Signed).await;
        assert_eq!(
            receipt.unwrap().usage,
            Some(TokenCounts {
                prompt_tokens: 9,
                completion_tokens: 4
            })
        );
    }

    #[tokio::test]
    async fn dishonest_modes_sign_what_they_should_not() {
        let (_, honest, _) = signed(&["{}"], false, Receipts::Signed).await;
        let honest = honest.unwrap();
        let (_, receipt, _) = signed(&["{}"], false, Receipts::WrongHash).await;
        assert_ne!(receipt.unwrap().answer_sha256, honest.answer_sha256);
        let (_, receipt, _) = signed(&["{}"], false, Receipts::WrongRequestId).await;
        assert_ne!(receipt.unwrap().request_id, honest.request_id);
        let (_, receipt, public) = signed(&["{}"], false, Receipts::WrongKey).await;
        let (key, _) = SigningKey::generate().unwrap();
        let value = receipt.unwrap().sign(&key).unwrap();
        assert!(Receipt::parse(&value).unwrap().verify(&public).is_err());
        let (key, _) = SigningKey::generate().unwrap();
        assert!(Signer::new("n", key, Receipts::Withheld).is_none());
    }

    fn batch_line(body: serde_json::Value) -> BatchLineResult {
        BatchLineResult {
            batch_id: "batch_1".into(),
            model: "m".into(),
            line: 7,
            status_code: 200,
            body,
            latency_ms: 3,
            receipt: None,
        }
    }

    #[test]
    fn a_batch_line_is_signed_over_its_bodys_canonical_json() {
        let (signer, public) = signer(Receipts::Signed);
        let body = serde_json::json!({
            "id": "x",
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            "choices": [{"message": {"content": "hi", "role": "assistant"}, "index": 0}],
        });
        let value = signer.batch_receipt(&batch_line(body.clone())).unwrap();
        let signed = Receipt::parse(&value).unwrap();
        signed.verify(&public).unwrap();
        let receipt = signed.receipt;
        assert_eq!(receipt.node_id, "node_1");
        assert_eq!(receipt.request_id, "batch_1:7");
        assert_eq!(receipt.model, "m");
        assert_eq!(receipt.status, 200);
        assert_eq!(
            receipt.usage,
            Some(TokenCounts {
                prompt_tokens: 3,
                completion_tokens: 4
            })
        );
        // What the gateway hashes after the body's trip as JSON, whatever its members' order.
        let received: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&body).unwrap()).unwrap();
        let mut hasher = AnswerHasher::default();
        hasher.update(&canonical_json(&received));
        let (hash, len) = hasher.finish();
        assert_eq!((receipt.answer_sha256, receipt.answer_bytes), (hash, len));

        // The Responses API's names, and no usage at all.
        let responses = serde_json::json!({"usage": {"input_tokens": 5, "output_tokens": 6}});
        let value = signer.batch_receipt(&batch_line(responses)).unwrap();
        assert_eq!(
            Receipt::parse(&value).unwrap().receipt.usage,
            Some(TokenCounts {
                prompt_tokens: 5,
                completion_tokens: 6
            })
        );
        let error = serde_json::json!({"error": {"message": "no", "usage": {"prompt_tokens": 1}}});
        let value = signer.batch_receipt(&batch_line(error)).unwrap();
        assert_eq!(Receipt::parse(&value).unwrap().receipt.usage, None);
    }

    #[test]
    fn dishonest_modes_sign_batch_lines_wrongly_too() {
        let body = serde_json::json!({"usage": {"prompt_tokens": 1, "completion_tokens": 2}});
        let line = batch_line(body);
        let (honest, _) = signer(Receipts::Signed);
        let honest = Receipt::parse(&honest.batch_receipt(&line).unwrap())
            .unwrap()
            .receipt;
        let (wrong_hash, public) = signer(Receipts::WrongHash);
        let signed = Receipt::parse(&wrong_hash.batch_receipt(&line).unwrap()).unwrap();
        signed.verify(&public).unwrap();
        assert_ne!(signed.receipt.answer_sha256, honest.answer_sha256);
        let (wrong_id, _) = signer(Receipts::WrongRequestId);
        let signed = Receipt::parse(&wrong_id.batch_receipt(&line).unwrap()).unwrap();
        assert_ne!(signed.receipt.request_id, "batch_1:7");
        let (wrong_key, public) = signer(Receipts::WrongKey);
        let signed = Receipt::parse(&wrong_key.batch_receipt(&line).unwrap()).unwrap();
        assert!(signed.verify(&public).is_err());
    }

    #[test]
    fn a_statement_is_checked_against_the_rigs_key() {
        let (key, _) = SigningKey::generate().unwrap();
        let receipt = |id: &str| Receipt {
            node_id: "node_1".into(),
            request_id: id.into(),
            model: "m".into(),
            status: 200,
            usage: Some(TokenCounts {
                prompt_tokens: 1,
                completion_tokens: 2,
            }),
            answer_bytes: 0,
            answer_sha256: [0; 32],
        };
        let entry = |id: &str, receipt: Option<String>, check| StatementEntry {
            request_id: id.into(),
            model: "m".into(),
            finished_at_ms: 0,
            prompt_tokens: 1,
            completion_tokens: 2,
            reported_prompt_tokens: None,
            reported_completion_tokens: None,
            points: None,
            receipt,
            receipt_check: check,
            detail: None,
        };
        let (other, _) = SigningKey::generate().unwrap();
        let entries = [
            entry(
                "a",
                Some(receipt("a").sign(&key).unwrap()),
                ReceiptCheck::Verified,
            ),
            entry(
                "b",
                Some(receipt("x").sign(&key).unwrap()),
                ReceiptCheck::Verified,
            ),
            entry(
                "c",
                Some(receipt("c").sign(&other).unwrap()),
                ReceiptCheck::Refused,
            ),
            entry("d", None, ReceiptCheck::Unchecked),
        ];
        let report = check_statement("node_1", &key.public_key(), &entries);
        assert_eq!(report.entries, 4);
        assert_eq!(report.receipts_verified, 1);
        assert_eq!(report.mismatches.len(), 2, "{report}");
        assert_eq!(report.without_receipt["unchecked"], 1);
        assert_eq!(report.signed.completion_tokens, 2);
    }
}
