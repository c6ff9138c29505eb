//! Receipts: what a rig signs for every answer it serves, so that the gateway and the rig's
//! owner can both check what was served and billed.
//!
//! At enrollment a rig makes an Ed25519 key pair, keeps the private key in its state file and
//! registers the public key ([`crate::EnrollRequest::public_key`], or later
//! [`RECEIPT_KEY_PATH`]). For every answer it sends through the tunnel it adds an HTTP/2
//! trailer, [`RECEIPT_TRAILER`]: the base64 (standard alphabet, padded) of a [`Receipt`]'s
//! canonical bytes followed by their 64-byte Ed25519 signature.
//!
//! # Canonical bytes, version 1
//!
//! Integers are big-endian; a string is its length as a `u16` then its UTF-8 bytes.
//!
//! | bytes | field |
//! | --- | --- |
//! | 14 | `garage-receipt` (ASCII): what the signature is for, so it can mean nothing else |
//! | 1 | version: `1` |
//! | string | the rig's node id |
//! | string | the request id (the `x-request-id` the gateway sent) |
//! | string | the model (the request's `model`) |
//! | 2 | the answer's HTTP status |
//! | 1 | `1` when the engine reported usage, `0` when it did not (the counts are then 0) |
//! | 8 | prompt tokens, as the engine reported them |
//! | 8 | completion tokens, as the engine reported them |
//! | 8 | the answer's length in bytes (the whole body, streamed or not) |
//! | 32 | SHA-256 of those bytes |
//!
//! Nothing else may follow; a reader refuses any other version, a flag other than 0 or 1, and
//! counts without the flag.
//!
//! # Batch lines
//!
//! A batch line's answer does not pass through the tunnel: the rig sends it in
//! [`crate::BatchLineResult`], its body a JSON value, and the receipt in that result's `receipt`
//! (the same base64 a trailer carries). Its request id is [`batch_request_id`],
//! `{batch_id}:{line}`; its model the line's; its status the engine's; its usage the body's
//! `usage` member. Its answer's length and SHA-256 are those of the body's
//! [`canonical_json`], not of the bytes the engine wrote: the body is parsed and written again
//! on its way (and the order of an object's members depends on how serde_json was built), so
//! both sides hash one form of it that neither can change.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// The trailer of a tunnel answer that carries its receipt.
pub const RECEIPT_TRAILER: &str = "garage-receipt";
/// Registers the public key of a rig enrolled before receipts (node credential).
pub const RECEIPT_KEY_PATH: &str = "/node/v1/receipt-key";
/// The rig's statement: its requests as the gateway's ledger has them, with their receipts.
pub const STATEMENT_PATH: &str = "/node/v1/statement";

/// The version of the canonical bytes written by [`Receipt::canonical`].
pub const RECEIPT_VERSION: u8 = 1;
const DOMAIN: &[u8; 14] = b"garage-receipt";
const SIGNATURE_LEN: usize = 64;
const PUBLIC_KEY_LEN: usize = 32;
const SEED_LEN: usize = 32;
/// Bytes after the strings: status, usage flag, two counts, length, hash.
const FIXED_TAIL: usize = 2 + 1 + 8 + 8 + 8 + 32;

/// Why a receipt or a key could not be read or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// The text is not base64.
    #[error("not base64")]
    Base64,
    /// The bytes are not a receipt's: what is wrong with them.
    #[error("malformed receipt: {0}")]
    Malformed(&'static str),
    /// A version of the canonical bytes this reader does not know.
    #[error("receipt version {0} is not one this gateway reads")]
    Version(u8),
    /// The signature is not the key's.
    #[error("the signature does not verify with the rig's key")]
    Signature,
    /// A key of the wrong size, or no randomness to make one.
    #[error("not an Ed25519 key of 32 bytes")]
    Key,
    /// A string field over 65,535 bytes.
    #[error("a field is longer than a receipt can hold (65,535 bytes)")]
    TooLong,
}

/// Token counts as the engine reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// `usage.prompt_tokens` (`input_tokens` in the Responses API).
    pub prompt_tokens: u64,
    /// `usage.completion_tokens` (`output_tokens`).
    pub completion_tokens: u64,
}

/// What a rig says it served for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The rig that served it.
    pub node_id: String,
    /// The `x-request-id` the gateway sent with the request.
    pub request_id: String,
    /// The request's `model`.
    pub model: String,
    /// The answer's HTTP status.
    pub status: u16,
    /// The usage the engine reported in the answer; `None`: it reported none.
    pub usage: Option<TokenCounts>,
    /// Length of the answer's body, bytes.
    pub answer_bytes: u64,
    /// SHA-256 of the answer's body, every byte the rig sent.
    pub answer_sha256: [u8; 32],
}

impl Receipt {
    /// The canonical bytes (see the module's documentation): what is signed.
    pub fn canonical(&self) -> Result<Vec<u8>, ReceiptError> {
        let mut out = Vec::with_capacity(
            DOMAIN.len()
                + 1
                + 6
                + self.node_id.len()
                + self.request_id.len()
                + self.model.len()
                + FIXED_TAIL,
        );
        out.extend_from_slice(DOMAIN);
        out.push(RECEIPT_VERSION);
        for text in [&self.node_id, &self.request_id, &self.model] {
            let len = u16::try_from(text.len()).map_err(|_| ReceiptError::TooLong)?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(text.as_bytes());
        }
        out.extend_from_slice(&self.status.to_be_bytes());
        let counts = self.usage.unwrap_or_default();
        out.push(u8::from(self.usage.is_some()));
        out.extend_from_slice(&counts.prompt_tokens.to_be_bytes());
        out.extend_from_slice(&counts.completion_tokens.to_be_bytes());
        out.extend_from_slice(&self.answer_bytes.to_be_bytes());
        out.extend_from_slice(&self.answer_sha256);
        Ok(out)
    }

    /// The trailer's value: the canonical bytes and their signature with `key`, in base64.
    pub fn sign(&self, key: &SigningKey) -> Result<String, ReceiptError> {
        let mut signed = self.canonical()?;
        let signature = key.pair.sign(&signed);
        signed.extend_from_slice(signature.as_ref());
        Ok(BASE64.encode(signed))
    }

    /// Reads a trailer's value (without checking its signature: see [`SignedReceipt::verify`]).
    pub fn parse(value: &str) -> Result<SignedReceipt, ReceiptError> {
        let bytes = BASE64
            .decode(value.trim())
            .map_err(|_| ReceiptError::Base64)?;
        let Some(split) = bytes.len().checked_sub(SIGNATURE_LEN) else {
            return Err(ReceiptError::Malformed("shorter than a signature"));
        };
        let (message, signature) = bytes.split_at(split);
        let receipt = Self::from_canonical(message)?;
        let mut sig = [0; SIGNATURE_LEN];
        sig.copy_from_slice(signature);
        Ok(SignedReceipt {
            receipt,
            message: message.to_vec(),
            signature: sig,
        })
    }

    fn from_canonical(bytes: &[u8]) -> Result<Receipt, ReceiptError> {
        let mut reader = Reader(bytes);
        if reader.take(DOMAIN.len())? != DOMAIN {
            return Err(ReceiptError::Malformed("not a garage receipt"));
        }
        let version = reader.take(1)?[0];
        if version != RECEIPT_VERSION {
            return Err(ReceiptError::Version(version));
        }
        let node_id = reader.string()?;
        let request_id = reader.string()?;
        let model = reader.string()?;
        let status = u16::from_be_bytes(reader.array()?);
        let flag = reader.take(1)?[0];
        let counts = TokenCounts {
            prompt_tokens: u64::from_be_bytes(reader.array()?),
            completion_tokens: u64::from_be_bytes(reader.array()?),
        };
        let usage = match flag {
            1 => Some(counts),
            0 if counts == TokenCounts::default() => None,
            0 => return Err(ReceiptError::Malformed("token counts without usage")),
            _ => return Err(ReceiptError::Malformed("usage flag")),
        };
        let answer_bytes = u64::from_be_bytes(reader.array()?);
        let answer_sha256 = reader.array()?;
        if !reader.0.is_empty() {
            return Err(ReceiptError::Malformed("bytes after the hash"));
        }
        Ok(Receipt {
            node_id,
            request_id,
            model,
            status,
            usage,
            answer_bytes,
            answer_sha256,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ReceiptError> {
        if self.0.len() < n {
            return Err(ReceiptError::Malformed("cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReceiptError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn string(&mut self) -> Result<String, ReceiptError> {
        let len = u16::from_be_bytes(self.array()?);
        let bytes = self.take(usize::from(len))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ReceiptError::Malformed("not UTF-8"))
    }
}

/// A receipt as read from a trailer, with what was signed.
#[derive(Debug, Clone)]
pub struct SignedReceipt {
    /// What it says.
    pub receipt: Receipt,
    message: Vec<u8>,
    signature: [u8; SIGNATURE_LEN],
}

impl SignedReceipt {
    /// Whether `key` signed it.
    pub fn verify(&self, key: &PublicKey) -> Result<(), ReceiptError> {
        UnparsedPublicKey::new(&ED25519, &key.0)
            .verify(&self.message, &self.signature)
            .map_err(|_| ReceiptError::Signature)
    }
}

/// A rig's private key: an Ed25519 key pair made from a 32-byte seed.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public_key", &self.public_key().to_base64())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new key, and its seed in base64 (what the rig keeps in its state file).
    pub fn generate() -> Result<(SigningKey, String), ReceiptError> {
        use ring::rand::SecureRandom as _;
        let mut seed = [0u8; SEED_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| ReceiptError::Key)?;
        Ok((Self::from_seed_bytes(&seed)?, BASE64.encode(seed)))
    }

    /// The key of a seed in base64, as [`SigningKey::generate`] gave it.
    pub fn from_seed(seed: &str) -> Result<SigningKey, ReceiptError> {
        let bytes = BASE64
            .decode(seed.trim())
            .map_err(|_| ReceiptError::Base64)?;
        Self::from_seed_bytes(&bytes)
    }

    fn from_seed_bytes(seed: &[u8]) -> Result<SigningKey, ReceiptError> {
        if seed.len() != SEED_LEN {
            return Err(ReceiptError::Key);
        }
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| ReceiptError::Key)?;
        Ok(SigningKey { pair })
    }

    /// The public half, to register with the gateway.
    pub fn public_key(&self) -> PublicKey {
        let mut key = [0; PUBLIC_KEY_LEN];
        key.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(key)
    }
}

/// A rig's public key: 32 bytes, written in base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    /// A key in base64 (standard alphabet, padded): 44 characters.
    pub fn parse(text: &str) -> Result<PublicKey, ReceiptError> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|_| ReceiptError::Base64)?;
        let key: [u8; PUBLIC_KEY_LEN] = bytes.try_into().map_err(|_| ReceiptError::Key)?;
        Ok(PublicKey(key))
    }

    /// The key as [`PublicKey::parse`] reads it.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }
}

/// The request id a batch line's receipt names: `{batch_id}:{line}`, as the gateway meters it.
pub fn batch_request_id(batch_id: &str, line: u64) -> String {
    format!("{batch_id}:{line}")
}

/// The canonical JSON of a value: what a batch line's receipt hashes (`answer_bytes` is its
/// length, `answer_sha256` its SHA-256). An object's members are sorted by their keys' UTF-8
/// bytes, nothing separates tokens (no whitespace), and strings and numbers are written as
/// serde_json writes them (escapes as short as JSON allows; floats in their shortest form that
/// reads back the same, which both sides need serde_json's `float_roundtrip` for).
///
/// ```
/// use garage_node_protocol::receipt::canonical_json;
///
/// let body = serde_json::json!({"b": [1, 2.5, "x\ny"], "a": {"z": null, "y": true}});
/// assert_eq!(
///     canonical_json(&body),
///     br#"{"a":{"y":true,"z":null},"b":[1,2.5,"x\ny"]}"#
/// );
/// ```
pub fn canonical_json(value: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(&mut out, value);
    out
}

fn write_canonical(out: &mut Vec<u8>, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(members) => {
            let mut members: Vec<(&String, &Value)> = members.iter().collect();
            members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(out, key.as_str());
                out.push(b':');
                write_canonical(out, value);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item);
            }
            out.push(b']');
        }
        scalar => write_scalar(out, scalar),
    }
}

fn write_scalar<T: Serialize + ?Sized>(out: &mut Vec<u8>, scalar: &T) {
    // Writing a string, a number, a bool or null into a Vec cannot fail.
    let _ = serde_json::to_writer(out, scalar);
}

/// SHA-256 and length of an answer's bytes, fed as they pass.
#[derive(Clone)]
pub struct AnswerHasher {
    digest: ring::digest::Context,
    bytes: u64,
}

impl Default for AnswerHasher {
    fn default() -> Self {
        AnswerHasher {
            digest: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
        }
    }
}

impl AnswerHasher {
    /// Feeds the next bytes of the answer.
    pub fn update(&mut self, bytes: &[u8]) {
        self.digest.update(bytes);
        self.bytes += bytes.len() as u64;
    }

    /// The hash and the length of everything fed.
    pub fn finish(self) -> ([u8; 32], u64) {
        let mut hash = [0; 32];
        hash.copy_from_slice(self.digest.finish().as_ref());
        (hash, self.bytes)
    }
}

/// `POST /node/v1/receipt-key` body, and its answer: a rig's public key, base64.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReceiptKey {
    /// The Ed25519 public key (32 bytes), base64.
    pub public_key: String,
}

/// What the gateway made of an answer's receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReceiptCheck {
    /// Signed by the rig's key, for this request, model and the very bytes the gateway got.
    Verified,
    /// A receipt that does not hold (a bad signature, another request, model or answer): a
    /// failed check of the rig.
    Refused,
    /// The rig registered a key but sent no receipt: a failed check.
    Missing,
    /// The rig registered no key (enrolled before receipts): no receipt to check.
    NoKey,
    /// The answer did not reach its end at the gateway (the client went away, the stream broke
    /// off): there was nothing whole to check a receipt against.
    Unchecked,
}

/// One request a rig served, as the gateway billed it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatementEntry {
    /// The gateway's request id (a UUIDv7: ordered by time).
    pub request_id: String,
    /// The model asked for.
    pub model: String,
    /// Unix milliseconds.
    pub finished_at_ms: u64,
    /// Prompt tokens billed (and rewarded): the gateway's count, or the rig's report within
    /// its bounds.
    pub prompt_tokens: u64,
    /// Completion tokens billed.
    pub completion_tokens: u64,
    /// What the answer itself reported, if anything.
    #[serde(default)]
    pub reported_prompt_tokens: Option<u64>,
    /// See `reported_prompt_tokens`.
    #[serde(default)]
    pub reported_completion_tokens: Option<u64>,
    /// Points awarded to the rig's operator for it, once the ledger has processed it.
    #[serde(default)]
    pub points: Option<f64>,
    /// The receipt as the rig sent it (the trailer's value).
    #[serde(default)]
    pub receipt: Option<String>,
    /// What the gateway made of it.
    pub receipt_check: ReceiptCheck,
    /// Why a receipt was refused or missing.
    #[serde(default)]
    pub detail: Option<String>,
}

/// `GET /node/v1/statement` answer: a page of the rig's requests, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Statement {
    /// Always `list`.
    pub object: String,
    /// The rig.
    pub node_id: String,
    /// Its requests, by request id (oldest first).
    pub data: Vec<StatementEntry>,
    /// More entries follow: ask again with `after` = `next_after`.
    pub has_more: bool,
    /// The last request id of this page.
    pub next_after: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> Receipt {
        Receipt {
            node_id: "node_1".into(),
            request_id: "0190f3c2-0000-7000-8000-000000000001".into(),
            model: "m".into(),
            status: 200,
            usage: Some(TokenCounts {
                prompt_tokens: 12,
                completion_tokens: 34,
            }),
            answer_bytes: 5,
            answer_sha256: [7; 32],
        }
    }

    /// The canonical bytes are pinned: a change to them is a new version, not an accident.
    #[test]
    fn canonical_bytes_are_pinned() {
        let bytes = receipt().canonical().unwrap();
        let mut expected = b"garage-receipt\x01".to_vec();
        expected.extend_from_slice(b"\x00\x06node_1");
        expected.extend_from_slice(b"\x00\x24");
        expected.extend_from_slice(b"0190f3c2-0000-7000-8000-000000000001");
        expected.extend_from_slice(b"\x00\x01m");
        expected.extend_from_slice(&[0, 200, 1]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 12]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 34]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 5]);
        expected.extend_from_slice(&[7; 32]);
        assert_eq!(bytes, expected);
        assert_eq!(Receipt::from_canonical(&bytes).unwrap(), receipt());
    }

    #[test]
    fn a_signed_receipt_verifies_with_its_key_only() {
        let (key, seed) = SigningKey::generate().unwrap();
        let value = receipt().sign(&key).unwrap();
        let signed = Receipt::parse(&value).unwrap();
        assert_eq!(signed.receipt, receipt());
        signed.verify(&key.public_key()).unwrap();
        // The seed gives the key back.
        let again = SigningKey::from_seed(&seed).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let public = PublicKey::parse(&key.public_key().to_base64()).unwrap();
        signed.verify(&public).unwrap();

        let (other, _) = SigningKey::generate().unwrap();
        assert_eq!(
            signed.verify(&other.public_key()),
            Err(ReceiptError::Signature)
        );
        // A receipt whose fields were changed after signing does not verify.
        let mut bytes = BASE64.decode(&value).unwrap();
        let last_of_hash = bytes.len() - SIGNATURE_LEN - 1;
        bytes[last_of_hash] ^= 1;
        let tampered = Receipt::parse(&BASE64.encode(bytes)).unwrap();
        assert_eq!(
            tampered.verify(&key.public_key()),
            Err(ReceiptError::Signature)
        );
    }

    #[test]
    fn malformed_receipts_are_refused() {
        let (key, _) = SigningKey::generate().unwrap();
        let no_usage = Receipt {
            usage: None,
            ..receipt()
        };
        let signed = Receipt::parse(&no_usage.sign(&key).unwrap()).unwrap();
        assert_eq!(signed.receipt.usage, None);

        let canonical = receipt().canonical().unwrap();
        let with_signature = |bytes: &[u8]| {
            let mut bytes = bytes.to_vec();
            bytes.extend_from_slice(&[0; SIGNATURE_LEN]);
            BASE64.encode(bytes)
        };
        let version_at = DOMAIN.len();
        let mut v2 = canonical.clone();
        v2[version_at] = 2;
        assert_eq!(
            Receipt::parse(&with_signature(&v2)).unwrap_err(),
            ReceiptError::Version(2)
        );
        let mut longer = canonical.clone();
        longer.push(0);
        assert!(matches!(
            Receipt::parse(&with_signature(&longer)),
            Err(ReceiptError::Malformed(_))
        ));
        assert!(matches!(
            Receipt::parse(&with_signature(&canonical[..canonical.len() - 1])),
            Err(ReceiptError::Malformed(_))
        ));
        assert_eq!(
            Receipt::parse("not base64!").unwrap_err(),
            ReceiptError::Base64
        );
        assert!(matches!(
            Receipt::parse(&BASE64.encode([0; 10])),
            Err(ReceiptError::Malformed(_))
        ));
        assert_eq!(PublicKey::parse("AAAA").unwrap_err(), ReceiptError::Key);
        let long = Receipt {
            model: "m".repeat(70_000),
            ..receipt()
        };
        assert_eq!(long.canonical().unwrap_err(), ReceiptError::TooLong);
    }

    /// What a receipt costs (docs/trust.md has the numbers):
    /// `cargo test -p garage-node-protocol --release -- --ignored --nocapture receipt_cost`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn receipt_cost() {
        let (key, _) = SigningKey::generate().unwrap();
        let public = key.public_key();
        let receipt = Receipt {
            model: "meta-llama/Llama-3.1-8B-Instruct".into(),
            answer_bytes: 4096,
            ..receipt()
        };
        let value = receipt.sign(&key).unwrap();
        let rounds = 20_000;
        let per_round =
            |started: std::time::Instant| started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            let signed = Receipt::parse(std::hint::black_box(&value)).unwrap();
            signed.verify(&public).unwrap();
        }
        println!("parse and verify: {:.1} µs", per_round(started));
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(receipt.sign(&key).unwrap());
        }
        println!("encode and sign: {:.1} µs", per_round(started));
        let answer = vec![b'x'; 4096];
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            let mut hasher = AnswerHasher::default();
            hasher.update(std::hint::black_box(&answer));
            std::hint::black_box(hasher.finish());
        }
        println!("SHA-256 of 4 KiB: {:.2} µs", per_round(started));
        println!("trailer: {} bytes", value.len());
    }

    #[test]
    fn canonical_json_does_not_depend_on_member_order() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":2,"ab":3,"B":4,"é":5,"":6}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#" { "é" : 5 , "" : 6, "ab":3, "a":2 ,"B":4,"b":1 } "#).unwrap();
        // By UTF-8 bytes: "" < "B" < "a" < "ab" < "b" < "é" (0xC3).
        let expected = r#"{"":6,"B":4,"a":2,"ab":3,"b":1,"é":5}"#;
        assert_eq!(canonical_json(&a), expected.as_bytes());
        assert_eq!(canonical_json(&b), expected.as_bytes());
    }

    #[test]
    fn canonical_json_sorts_nested_objects_and_keeps_array_order() {
        let value: serde_json::Value = serde_json::from_str(
            r#"{"usage": {"prompt_tokens": 3, "completion_tokens": 4},
                "choices": [{"index": 1, "logprobs": null}, {"index": 0, "text": "hi"}],
                "nested": [[{"z": [], "y": {}}], -0.5, 1e300, -7, 18446744073709551615]}"#,
        )
        .unwrap();
        let expected = concat!(
            r#"{"choices":[{"index":1,"logprobs":null},{"index":0,"text":"hi"}],"#,
            r#""nested":[[{"y":{},"z":[]}],-0.5,1e+300,-7,18446744073709551615],"#,
            r#""usage":{"completion_tokens":4,"prompt_tokens":3}}"#
        );
        assert_eq!(String::from_utf8(canonical_json(&value)).unwrap(), expected);
        assert_eq!(canonical_json(&serde_json::json!([])), b"[]");
        assert_eq!(canonical_json(&serde_json::json!({})), b"{}");
        assert_eq!(canonical_json(&serde_json::json!("x")), br#""x""#);
    }

    #[test]
    fn canonical_json_escapes_as_serde_json_does() {
        let value = serde_json::json!({
            "quote\"key": "a \"b\" \\ / \n\r\t \u{1} \u{1f} \u{7f} é 😀",
        });
        let expected =
            "{\"quote\\\"key\":\"a \\\"b\\\" \\\\ / \\n\\r\\t \\u0001 \\u001f \u{7f} é 😀\"}";
        assert_eq!(String::from_utf8(canonical_json(&value)).unwrap(), expected);
        // What it writes reads back as the same value, and is written the same again.
        let back: serde_json::Value = serde_json::from_slice(&canonical_json(&value)).unwrap();
        assert_eq!(back, value);
        assert_eq!(canonical_json(&back), canonical_json(&value));
    }

    /// A body goes from the rig to the gateway as JSON and is parsed again there: its floats
    /// must read back as the very numbers, or the hashes differ (serde_json's `float_roundtrip`).
    #[test]
    fn canonical_json_survives_the_trip_to_the_gateway() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let logprobs: Vec<f64> = (0..2000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                -((state >> 11) as f64 / (1u64 << 53) as f64) * 20.0
            })
            .collect();
        let body = serde_json::json!({"choices": [{"logprobs": {"token_logprobs": logprobs}}]});
        let sent = serde_json::to_vec(&body).unwrap();
        let received: serde_json::Value = serde_json::from_slice(&sent).unwrap();
        assert_eq!(canonical_json(&received), canonical_json(&body));
    }

    #[test]
    fn a_batch_lines_request_id_is_its_batch_and_line() {
        assert_eq!(batch_request_id("batch_abc", 7), "batch_abc:7");
    }

    #[test]
    fn the_answer_hash_is_sha256_of_every_byte() {
        let mut hasher = AnswerHasher::default();
        hasher.update(b"ab");
        hasher.update(b"");
        hasher.update(b"c");
        let (hash, bytes) = hasher.finish();
        assert_eq!(bytes, 3);
        // SHA-256("abc"), FIPS 180-2's first example.
        assert_eq!(
            hash[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "sha256(abc) starts ba7816bf"
        );
    }
}
