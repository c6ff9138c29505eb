//! Receipts: every answer a rig serves ends with its signed receipt (an HTTP/2 trailer, see
//! [`garage_node_protocol::receipt`]); the gateway checks it against the rig's registered key
//! and keeps it in the rig's statement, which the rig's owner can read (`GET
//! /node/v1/statement`).
//!
//! What is checked, after the request ended and off its path: the signature (the rig's key,
//! registered at enrollment), the rig, the request id the gateway sent, the model, the status,
//! the length and SHA-256 of the bytes the gateway received from the rig (before it hid any
//! usage chunk), and the token counts against the usage the answer itself reported. A receipt
//! that fails any of it is refused, and so is a missing one from a rig that registered a key:
//! each is a failed check of the rig ([`CheckKind::Receipt`]). A rig without a key (enrolled
//! by an older node-runner) serves as before; its entries say `no_key`.
//!
//! A batch line's answer comes back in its result rather than through the tunnel, its receipt
//! with it (`crate::batch`): it is checked the same way, under the request id
//! `{batch_id}:{line}`, over the canonical JSON of the body the rig sent
//! ([`garage_node_protocol::receipt::canonical_json`]) and against the usage that body reported.
//!
//! The statement is kept per rig and UTC day (the day of the request id, a UUIDv7; a batch
//! line's, the day it was recorded), so that a page reads one day's entries at most; days older
//! than [`STATEMENT_DAYS`] are dropped.

use std::collections::HashSet;

use garage_node_protocol::receipt::{PublicKey, Receipt};
use garage_node_protocol::{ReceiptCheck, Statement, StatementEntry};

use super::*;
use crate::inference::sse::Usage;
use crate::store::keyspace::{node_statement, node_statement_days};
use trust::CheckKind;

/// Days of a rig's statement kept: a month's, with room to fetch it after the month ended.
pub const STATEMENT_DAYS: u64 = 35;
/// Entries of one rig and day the embedded store keeps (the newest): it holds everything in
/// this process's memory, and loses it at a restart anyway. Redis keeps every entry.
const EMBEDDED_ENTRIES_PER_DAY: usize = 10_000;
/// How long "this rig has no key" is believed before the store is asked again: a rig from
/// before receipts has no key for good, but one may register it when it restarts.
const NO_KEY_TTL: Duration = Duration::from_secs(10);
/// Most entries a statement page holds.
pub const STATEMENT_MAX_LIMIT: usize = 1000;

/// What the gateway received from a rig for one request, once its answer ended whole.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The rig's HTTP status.
    pub status: u16,
    /// Length and SHA-256 of the body's bytes as they came from the rig.
    pub bytes: u64,
    pub sha256: [u8; 32],
    /// The `garage-receipt` trailer, if the rig sent one.
    pub receipt: Option<String>,
}

/// A request a rig served, as it was billed.
#[derive(Debug, Clone)]
pub struct Served {
    pub node: String,
    pub request_id: String,
    pub model: String,
    pub finished_at_ms: u64,
    pub billed: Usage,
    /// The usage the answer reported.
    pub reported: Option<Usage>,
    /// `None`: the answer did not end whole here (the client went away, the stream broke off).
    pub answer: Option<Answer>,
    /// Whether the rig signs such answers: every tunnel answer; a batch line only when the
    /// rig's heartbeat says it signs batch lines (an older node-runner does not, and its
    /// unsigned lines are not failed checks).
    pub receipt_expected: bool,
}

/// The receipts' state on this replica: the rigs' keys it knows, and which statement days it
/// has written.
pub(super) struct ReceiptState {
    /// A rig's key, or when it was last seen to have none.
    keys: Mutex<HashMap<String, Result<PublicKey, Instant>>>,
    /// `(node, day)` pairs already in the rig's day index.
    days: Mutex<HashSet<(String, String)>>,
    /// Receipts, by what the check found.
    outcomes: prometheus::IntCounterVec,
}

impl ReceiptState {
    pub(super) fn new() -> Self {
        ReceiptState {
            keys: Mutex::new(HashMap::new()),
            days: Mutex::new(HashSet::new()),
            outcomes: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "garage_receipts_total",
                    "Answers of rigs by what their receipt showed (docs/trust.md): verified, \
                     refused, missing, no_key (a rig without a key), unchecked (the answer did \
                     not end whole)",
                ),
                &["outcome"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
        }
    }

    pub(super) fn collector(&self) -> Box<dyn prometheus::core::Collector> {
        Box::new(self.outcomes.clone())
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, Result<PublicKey, Instant>>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn days(&self) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
        self.days.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn check_name(check: ReceiptCheck) -> &'static str {
    match check {
        ReceiptCheck::Verified => "verified",
        ReceiptCheck::Refused => "refused",
        ReceiptCheck::Missing => "missing",
        ReceiptCheck::NoKey => "no_key",
        ReceiptCheck::Unchecked => "unchecked",
    }
}

/// The UTC day of a request id (a UUIDv7 carries its time), `None` for another kind of id.
fn day_of_request(id: &str) -> Option<String> {
    let uuid = uuid::Uuid::parse_str(id).ok()?;
    if uuid.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = uuid.get_timestamp()?.to_unix();
    Some(crate::ledger::day_of(
        secs * 1000 + u64::from(nanos / 1_000_000),
    ))
}

impl Nodes {
    /// A request a rig served: its receipt is checked and its statement entry written, off the
    /// request's path.
    pub fn note_served(self: &Arc<Self>, served: Served) {
        let nodes = Arc::clone(self);
        tokio::spawn(async move {
            let (check, detail) = nodes.check_receipt(&served).await;
            nodes
                .receipts
                .outcomes
                .with_label_values(&[check_name(check)])
                .inc();
            if let Some(why) = detail.as_deref()
                && matches!(check, ReceiptCheck::Refused | ReceiptCheck::Missing)
            {
                tracing::warn!(node = %served.node, request_id = %served.request_id, receipt = check_name(check), why, "rig's receipt refused");
                if let Err(err) = nodes
                    .record_check(&served.node, CheckKind::Receipt, Some(why))
                    .await
                {
                    tracing::warn!(node = %served.node, error = %err, "cannot record a failed receipt check");
                }
            }
            let entry = StatementEntry {
                request_id: served.request_id,
                model: served.model,
                finished_at_ms: served.finished_at_ms,
                prompt_tokens: served.billed.prompt_tokens,
                completion_tokens: served.billed.completion_tokens,
                reported_prompt_tokens: served.reported.map(|u| u.prompt_tokens),
                reported_completion_tokens: served.reported.map(|u| u.completion_tokens),
                points: None,
                receipt: served.answer.and_then(|answer| answer.receipt),
                receipt_check: check,
                detail,
            };
            if let Err(err) = nodes.keep_statement_entry(&served.node, &entry).await {
                tracing::warn!(node = %served.node, request_id = %entry.request_id, error = %err, "cannot keep a statement entry");
            }
        });
    }

    /// What the receipt of `served` shows, and why when it is not verified.
    async fn check_receipt(&self, served: &Served) -> (ReceiptCheck, Option<String>) {
        let Some(answer) = &served.answer else {
            return (ReceiptCheck::Unchecked, None);
        };
        let key = match self
            .receipt_key(&served.node, answer.receipt.is_some())
            .await
        {
            Ok(key) => key,
            Err(err) => {
                tracing::warn!(node = %served.node, error = %err, "cannot read the rig's receipt key");
                return (
                    ReceiptCheck::Unchecked,
                    Some(format!("the rig's key could not be read: {err}")),
                );
            }
        };
        let Some(key) = key else {
            return (ReceiptCheck::NoKey, None);
        };
        let Some(value) = &answer.receipt else {
            if !served.receipt_expected {
                return (
                    ReceiptCheck::Unchecked,
                    Some("this rig's node-runner does not sign batch lines yet".into()),
                );
            }
            return (
                ReceiptCheck::Missing,
                Some("the answer came without a receipt".into()),
            );
        };
        match verify(&key, value, served, answer) {
            Ok(()) => (ReceiptCheck::Verified, None),
            Err(why) => (ReceiptCheck::Refused, Some(why)),
        }
    }

    /// A rig's registered key. `fresh`: do not believe a cached "no key" (a rig that sends a
    /// receipt has probably just registered one).
    async fn receipt_key(&self, node: &str, fresh: bool) -> Result<Option<PublicKey>, StoreError> {
        match self.receipts.keys().get(node) {
            Some(Ok(key)) => return Ok(Some(*key)),
            Some(Err(at)) if !fresh && at.elapsed() < NO_KEY_TTL => return Ok(None),
            _ => {}
        }
        let record: Option<NodeRecord> = self.get(NODE_KIND, node).await?;
        let key = record
            .and_then(|record| record.receipt_key)
            .and_then(|key| PublicKey::parse(&key).ok());
        self.receipts
            .keys()
            .insert(node.to_owned(), key.ok_or_else(Instant::now));
        Ok(key)
    }

    /// Registers the receipt key of a rig that has none (it enrolled before receipts): a rig's
    /// first key only, so that whoever holds its credential cannot swap the key its receipts
    /// are checked with. The same key again is accepted.
    pub async fn register_receipt_key(
        &self,
        record: &NodeRecord,
        public_key: &str,
    ) -> Result<(), ApiError> {
        let key = PublicKey::parse(public_key).map_err(|err| {
            ApiError::bad_request(format!("public_key: {err}"), Some("public_key"))
        })?;
        let mut record = record.clone();
        match record.receipt_key.as_deref().map(PublicKey::parse) {
            Some(Ok(registered)) if registered == key => return Ok(()),
            Some(_) => {
                return Err(ApiError::Conflict(
                    "This rig registered another receipt key; a key cannot be replaced.".into(),
                ));
            }
            None => {}
        }
        record.receipt_key = Some(key.to_base64());
        self.put(NODE_KIND, &record.id, &record).await?;
        self.receipts.keys().insert(record.id.clone(), Ok(key));
        tracing::info!(node = %record.id, "rig registered its receipt key");
        Ok(())
    }

    /// Writes a statement entry, in the rig's day (and the day in its index, once per process).
    async fn keep_statement_entry(
        &self,
        node: &str,
        entry: &StatementEntry,
    ) -> Result<(), StoreError> {
        let day = day_of_request(&entry.request_id)
            .unwrap_or_else(|| crate::ledger::day_of(entry.finished_at_ms));
        let kind = node_statement(node, &day);
        let new_day = self.receipts.days().insert((node.to_owned(), day.clone()));
        if new_day {
            self.store.bound_records(&kind, EMBEDDED_ENTRIES_PER_DAY);
            self.put(&node_statement_days(node), &day, &day).await?;
            self.prune_statement(node, &day).await?;
        }
        self.put(&kind, &entry.request_id, entry).await
    }

    /// Drops the days of a rig's statement older than [`STATEMENT_DAYS`] before `today`.
    async fn prune_statement(&self, node: &str, today: &str) -> Result<(), StoreError> {
        let Some(today_ms) = day_start_ms(today) else {
            return Ok(());
        };
        let oldest = crate::ledger::day_of(today_ms.saturating_sub(STATEMENT_DAYS * 86_400_000));
        for day in self.statement_days(node).await? {
            if day < oldest {
                self.store
                    .record_delete_kind(&node_statement(node, &day))
                    .await?;
                self.store
                    .record_delete(&node_statement_days(node), &day)
                    .await?;
                self.receipts.days().remove(&(node.to_owned(), day));
            }
        }
        Ok(())
    }

    /// The days a rig's statement has entries for, oldest first.
    async fn statement_days(&self, node: &str) -> Result<Vec<String>, StoreError> {
        let mut days: Vec<String> = self
            .store
            .record_list(&node_statement_days(node))
            .await?
            .iter()
            .filter_map(|bytes| serde_json::from_slice(bytes).ok())
            .collect();
        days.sort();
        Ok(days)
    }

    /// A page of a rig's statement: its requests after the request id `after` (from the first
    /// when `None`), oldest first, with the points its operator was awarded for each.
    pub async fn statement(
        &self,
        node: &str,
        operator: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Statement, ApiError> {
        let days = self.statement_days(node).await?;
        let from_day = match after {
            Some(after) => {
                let day = self.day_of_entry(node, &days, after).await?;
                Some(day.ok_or_else(|| {
                    ApiError::bad_request(
                        "after must be a request id from this statement",
                        Some("after"),
                    )
                })?)
            }
            None => None,
        };
        let limit = limit.clamp(1, STATEMENT_MAX_LIMIT);
        let mut page: Vec<StatementEntry> = Vec::new();
        for day in days {
            if from_day.as_ref().is_some_and(|from| day < *from) {
                continue;
            }
            // Within `after`'s day, the entries after it; every entry of a later day (a batch
            // line's id, `{batch_id}:{line}`, does not sort by time).
            let after_in_day = after.filter(|_| from_day.as_ref() == Some(&day));
            let mut entries: Vec<StatementEntry> = self
                .store
                .record_list(&node_statement(node, &day))
                .await?
                .iter()
                .filter_map(|bytes| serde_json::from_slice(bytes).ok())
                .filter(|entry: &StatementEntry| {
                    after_in_day.is_none_or(|after| *entry.request_id > *after)
                })
                .collect();
            entries.sort_by(|a, b| a.request_id.cmp(&b.request_id));
            page.extend(entries.into_iter().take(limit + 1 - page.len()));
            if page.len() > limit {
                break;
            }
        }
        let has_more = page.len() > limit;
        page.truncate(limit);
        self.add_points(&mut page, operator).await;
        Ok(Statement {
            object: "list".into(),
            node_id: node.to_owned(),
            next_after: page.last().map(|entry| entry.request_id.clone()),
            has_more,
            data: page,
        })
    }

    /// The statement entry of `request_id` in `node`'s statement (the request ended at
    /// `finished_at_ms`), with its receipt and what the gateway made of it; `None` when the
    /// statement does not hold it (days older than [`STATEMENT_DAYS`] are dropped).
    pub async fn statement_entry(
        &self,
        node: &str,
        request_id: &str,
        finished_at_ms: u64,
    ) -> Result<Option<StatementEntry>, StoreError> {
        let day =
            day_of_request(request_id).unwrap_or_else(|| crate::ledger::day_of(finished_at_ms));
        let bytes = self
            .store
            .record_get(&node_statement(node, &day), request_id)
            .await?;
        Ok(bytes.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    /// The statement day of the entry `request_id`: a UUIDv7's own day; for another id (a batch
    /// line's), the day among `days` that holds it. `None`: not an entry of this statement.
    async fn day_of_entry(
        &self,
        node: &str,
        days: &[String],
        request_id: &str,
    ) -> Result<Option<String>, StoreError> {
        if let Some(day) = day_of_request(request_id) {
            return Ok(Some(day));
        }
        // Newest first: a page is most often asked for soon after the one before it.
        for day in days.iter().rev() {
            let kind = node_statement(node, day);
            if self.store.record_get(&kind, request_id).await?.is_some() {
                return Ok(Some(day.clone()));
            }
        }
        Ok(None)
    }

    /// The points the ledger awarded `operator` for each entry, where it has processed it.
    async fn add_points(&self, page: &mut [StatementEntry], operator: &str) {
        let reads = page.iter().map(|entry| {
            self.store
                .record_get(crate::ledger::LEDGER, &entry.request_id)
        });
        let ledger = futures::future::join_all(reads).await;
        for (entry, found) in page.iter_mut().zip(ledger) {
            let Ok(Some(bytes)) = found else { continue };
            let Ok(ledger_entry) = crate::ledger::LedgerEntry::decode(&bytes) else {
                continue;
            };
            entry.points = Some(ledger_entry.points_for(operator));
        }
    }
}

/// Unix milliseconds at the start of a `YYYY-MM-DD` day.
fn day_start_ms(day: &str) -> Option<u64> {
    let mut parts = day.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (parts.next()??, parts.next()??, parts.next()??);
    // Days from civil (proleptic Gregorian), the inverse of `ledger::day_of`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days).ok().map(|days| days * 86_400_000)
}

/// Checks a receipt against what the gateway sent and received; why it does not hold.
fn verify(key: &PublicKey, value: &str, served: &Served, answer: &Answer) -> Result<(), String> {
    let signed = Receipt::parse(value).map_err(|err| format!("unreadable receipt: {err}"))?;
    signed
        .verify(key)
        .map_err(|_| "the receipt's signature is not the rig's registered key".to_owned())?;
    let receipt = &signed.receipt;
    if receipt.node_id != served.node {
        return Err(format!("the receipt names rig {}", receipt.node_id));
    }
    if receipt.request_id != served.request_id {
        return Err(format!(
            "the receipt is for request {}, not {}",
            receipt.request_id, served.request_id
        ));
    }
    if receipt.model != served.model {
        return Err(format!(
            "the receipt is for model {}, not {}",
            receipt.model, served.model
        ));
    }
    if receipt.status != answer.status {
        return Err(format!(
            "the receipt is for status {}, the answer's was {}",
            receipt.status, answer.status
        ));
    }
    if receipt.answer_bytes != answer.bytes || receipt.answer_sha256 != answer.sha256 {
        return Err(format!(
            "the receipt's hash is of other bytes ({} signed, {} received)",
            receipt.answer_bytes, answer.bytes
        ));
    }
    if let (Some(signed), Some(reported)) = (receipt.usage, served.reported)
        && (signed.prompt_tokens != reported.prompt_tokens
            || signed.completion_tokens != reported.completion_tokens)
    {
        return Err(format!(
            "the receipt says {} prompt and {} completion tokens; the answer reported {} and {}",
            signed.prompt_tokens,
            signed.completion_tokens,
            reported.prompt_tokens,
            reported.completion_tokens
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_read_from_request_ids_and_back() {
        let id = crate::request_id::mint();
        let id = id.to_str().unwrap();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert_eq!(day_of_request(id), Some(crate::ledger::day_of(now_ms)));
        assert_eq!(day_of_request("not-a-uuid"), None);
        assert_eq!(day_of_request(&uuid::Uuid::new_v4().to_string()), None);
        for ms in [0, 951_782_400_000, now_ms, 4_102_444_800_000] {
            let day = crate::ledger::day_of(ms);
            assert_eq!(day_start_ms(&day), Some(ms - ms % 86_400_000), "{day}");
        }
        assert_eq!(day_start_ms("nonsense"), None);
    }

    fn served(receipt: Option<String>) -> (Served, Answer) {
        let answer = Answer {
            status: 200,
            bytes: 3,
            sha256: [1; 32],
            receipt,
        };
        let served = Served {
            node: "node_1".into(),
            request_id: "r".into(),
            model: "m".into(),
            finished_at_ms: 0,
            billed: Usage::default(),
            reported: Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
            }),
            answer: Some(answer.clone()),
            receipt_expected: true,
        };
        (served, answer)
    }

    #[test]
    fn receipts_that_do_not_hold_are_refused_with_why() {
        use garage_node_protocol::receipt::{SigningKey, TokenCounts};
        let (key, _) = SigningKey::generate().unwrap();
        let (served, answer) = served(None);
        let honest = Receipt {
            node_id: "node_1".into(),
            request_id: "r".into(),
            model: "m".into(),
            status: 200,
            usage: Some(TokenCounts {
                prompt_tokens: 1,
                completion_tokens: 2,
            }),
            answer_bytes: 3,
            answer_sha256: [1; 32],
        };
        let check = |receipt: &Receipt, signer: &SigningKey| {
            verify(
                &key.public_key(),
                &receipt.sign(signer).unwrap(),
                &served,
                &answer,
            )
        };
        assert_eq!(check(&honest, &key), Ok(()));
        let (other, _) = SigningKey::generate().unwrap();
        let cases = [
            (check(&honest, &other), "signature"),
            (
                check(
                    &Receipt {
                        request_id: "q".into(),
                        ..honest.clone()
                    },
                    &key,
                ),
                "request q",
            ),
            (
                check(
                    &Receipt {
                        model: "big".into(),
                        ..honest.clone()
                    },
                    &key,
                ),
                "model big",
            ),
            (
                check(
                    &Receipt {
                        answer_sha256: [2; 32],
                        ..honest.clone()
                    },
                    &key,
                ),
                "hash",
            ),
            (
                check(
                    &Receipt {
                        usage: Some(TokenCounts {
                            prompt_tokens: 1,
                            completion_tokens: 20,
                        }),
                        ..honest.clone()
                    },
                    &key,
                ),
                "20 completion",
            ),
        ];
        for (result, why) in cases {
            let err = result.unwrap_err();
            assert!(err.contains(why), "{err} should say {why}");
        }
        assert!(
            verify(&key.public_key(), "garbage", &served, &answer)
                .unwrap_err()
                .contains("unreadable")
        );
    }
}
