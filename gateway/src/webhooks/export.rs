//! The usage export: one row per request the ledger charged in a time window, as CSV or as
//! CloudEvents JSON lines (the `usage.recorded` events a webhook gets), streamed an hour at a
//! time so that a month never sits in memory.

use std::sync::Arc;

use bytes::Bytes;

use super::Webhooks;
use super::event::{Event, UsageRecorded, rfc3339};
use crate::ledger::LedgerEntry;
use crate::ledger::payouts::csv_field;

const MS_PER_HOUR: u64 = 3_600_000;
/// The longest window one export covers: a month, with a day to spare for time zones.
pub const MAX_WINDOW_SECS: u64 = 32 * 86_400;

/// How the rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    /// CloudEvents in structured mode, one per line.
    JsonLines,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::JsonLines => "application/x-ndjson",
        }
    }
}

/// The CSV's header line.
pub const CSV_HEADER: &str = "request_id,key_id,model,batch,prompt_tokens,completion_tokens,\
                              cached_tokens,counted_by,credits,rig,operator,started_at,finished_at\n";

/// One request as a CSV line (every text field through [`csv_field`]: quoted when needed, and
/// defused when a spreadsheet would read it as a formula).
pub fn csv_row(entry: &LedgerEntry) -> String {
    let data = UsageRecorded::of(entry);
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
        csv_field(&data.request_id),
        csv_field(&data.key_id),
        csv_field(&data.model),
        data.batch,
        data.prompt_tokens,
        data.completion_tokens,
        data.cached_tokens,
        data.counted_by,
        data.credits,
        csv_field(&data.rig),
        csv_field(&data.operator),
        rfc3339(data.started_at_ms),
        rfc3339(data.finished_at_ms),
    )
}

/// One request as a CloudEvent line: what its `usage.recorded` webhook carries.
pub fn json_line(entry: &LedgerEntry) -> String {
    let mut line =
        serde_json::to_string(&Event::usage_recorded(entry).to_cloudevent()).unwrap_or_default();
    line.push('\n');
    line
}

/// The export of `[from_ms, to_ms)`, by the requests' ends, in order: chunks of a streamed
/// body, one per hour that has requests (a store error ends the stream with it).
pub fn stream(
    webhooks: Arc<Webhooks>,
    from_ms: u64,
    to_ms: u64,
    format: Format,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    struct State {
        webhooks: Arc<Webhooks>,
        /// The hours left to read, newest last; `None` until listed.
        hours: Option<std::vec::IntoIter<u64>>,
        header: bool,
    }
    let first = from_ms / MS_PER_HOUR;
    let last = to_ms.saturating_sub(1) / MS_PER_HOUR;
    let state = State {
        webhooks,
        hours: None,
        header: format == Format::Csv,
    };
    futures::stream::unfold(state, move |mut state| async move {
        if state.header {
            state.header = false;
            return Some((Ok(Bytes::from_static(CSV_HEADER.as_bytes())), state));
        }
        if state.hours.is_none() {
            match state.webhooks.export_hours().await {
                Ok(hours) => {
                    let hours: Vec<u64> = hours
                        .into_iter()
                        .filter(|h| (first..=last).contains(h))
                        .collect();
                    state.hours = Some(hours.into_iter());
                }
                Err(err) => {
                    state.hours = Some(Vec::new().into_iter());
                    return Some((Err(std::io::Error::other(err.to_string())), state));
                }
            }
        }
        loop {
            let hour = state.hours.as_mut()?.next()?;
            let mut entries = match state.webhooks.export_hour(hour).await {
                Ok(entries) => entries,
                Err(err) => {
                    state.hours = Some(Vec::new().into_iter());
                    return Some((Err(std::io::Error::other(err.to_string())), state));
                }
            };
            entries.retain(|e| (from_ms..to_ms).contains(&e.event.finished_at_ms));
            if entries.is_empty() {
                continue;
            }
            entries.sort_by(|a, b| {
                (a.event.finished_at_ms, &a.event.request_id)
                    .cmp(&(b.event.finished_at_ms, &b.event.request_id))
            });
            let mut chunk = String::new();
            for entry in &entries {
                chunk.push_str(&match format {
                    Format::Csv => csv_row(entry),
                    Format::JsonLines => json_line(entry),
                });
            }
            return Some((Ok(Bytes::from(chunk)), state));
        }
    })
}
