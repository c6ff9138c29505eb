//! What the usage ledger's entries become here: a `usage.recorded` event for each request it
//! charges, and a copy kept per hour for the usage export.
//!
//! The ledger keeps each request's entry by request id only: on Redis for good, on the
//! embedded store the newest `usage.ledger_max_entries`. Nothing finds a month's requests in
//! it without reading all of them, so the export keeps its own copy, one record kind per UTC
//! hour of the requests' ends: a window is read an hour at a time, and an hour past
//! `webhooks.export_retention_days` goes as a whole. On the embedded store an hour's records
//! are not copies but references to the ledger's entries (the request id): the ledger is in
//! the same memory, and a copy of each entry doubled what every request served held there
//! (about 150 bytes encoded, 330 with the store's own). A reference whose entry the ledger has
//! dropped is skipped: the export, like the ledger, keeps no more than about
//! `usage.ledger_max_entries` requests (by whole hours, each hour bounded to it).

use async_trait::async_trait;

use super::Webhooks;
use super::event::{Event, EventKind};
use crate::ledger::{LEDGER, LedgerEntry, LedgerObserver};
use crate::store::StoreError;
use crate::store::keyspace::{USAGE_EXPORT_HOURS, usage_export_hour};

const MS_PER_HOUR: u64 = 3_600_000;

/// First byte of an hour's record that refers to the ledger's entry instead of copying it; the
/// request id follows. No encoding of [`LedgerEntry`] starts with it.
const LEDGER_REFERENCE: u8 = 0;

#[async_trait]
impl LedgerObserver for Webhooks {
    async fn recorded(
        &self,
        entries: &[&LedgerEntry],
        replayed: &[&str],
    ) -> Result<(), StoreError> {
        // An entry written before its event came again: read back, to be told of whole (a
        // worker that stopped between the ledger and here).
        let mut read_back = Vec::new();
        for id in replayed {
            if let Some(bytes) = self.store.record_get(LEDGER, id).await? {
                read_back.push(LedgerEntry::decode(&bytes)?);
            }
        }
        let all: Vec<&LedgerEntry> = entries.iter().copied().chain(&read_back).collect();
        self.keep_for_export(&all).await?;
        if self.wants(EventKind::UsageRecorded) {
            let events: Vec<Event> = all.iter().map(|e| Event::usage_recorded(e)).collect();
            self.emit_now(&events).await?;
        }
        Ok(())
    }
}

impl Webhooks {
    /// Copies entries into their hours' records (the first copy of a request id stays).
    async fn keep_for_export(&self, entries: &[&LedgerEntry]) -> Result<(), StoreError> {
        let mut by_hour: std::collections::BTreeMap<u64, Vec<(&str, Vec<u8>)>> = Default::default();
        for entry in entries {
            let id = &entry.event.request_id;
            let record = if self.export_cap.is_some() {
                let mut reference = Vec::with_capacity(1 + id.len());
                reference.push(LEDGER_REFERENCE);
                reference.extend_from_slice(id.as_bytes());
                reference
            } else {
                entry.encode()?
            };
            by_hour
                .entry(entry.event.finished_at_ms / MS_PER_HOUR)
                .or_default()
                .push((id, record));
        }
        for (hour, records) in by_hour {
            let kind = usage_export_hour(hour);
            if let Some(cap) = self.export_cap {
                self.store.bound_records(&kind, cap);
            }
            let newest = self
                .newest_export_hour
                .load(std::sync::atomic::Ordering::Relaxed);
            if hour > newest {
                // A new hour (or the first this replica sees): indexed, and the old ones swept.
                self.store
                    .record_put(
                        USAGE_EXPORT_HOURS,
                        &hour.to_string(),
                        hour.to_string().as_bytes(),
                    )
                    .await?;
                self.newest_export_hour
                    .fetch_max(hour, std::sync::atomic::Ordering::Relaxed);
                self.sweep_export(hour).await?;
            } else if hour < newest {
                // A late request of an earlier hour: indexed (it may be its hour's first).
                self.store
                    .record_put(
                        USAGE_EXPORT_HOURS,
                        &hour.to_string(),
                        hour.to_string().as_bytes(),
                    )
                    .await?;
            }
            let pairs: Vec<(&str, &[u8])> = records
                .iter()
                .map(|(id, bytes)| (*id, bytes.as_slice()))
                .collect();
            self.store.record_put_new_many(&kind, &pairs).await?;
        }
        Ok(())
    }

    /// The hours the export has, oldest first.
    pub(crate) async fn export_hours(&self) -> Result<Vec<u64>, StoreError> {
        let mut hours: Vec<u64> = self
            .store
            .record_list(USAGE_EXPORT_HOURS)
            .await?
            .iter()
            .filter_map(|bytes| std::str::from_utf8(bytes).ok()?.parse().ok())
            .collect();
        hours.sort_unstable();
        Ok(hours)
    }

    /// Drops the hours past the retention, and on the embedded store the oldest hours past its
    /// cap.
    async fn sweep_export(&self, newest: u64) -> Result<(), StoreError> {
        let retention_hours = self.config.export_retention_days.saturating_mul(24);
        let oldest_kept = newest.saturating_sub(retention_hours);
        let hours = self.export_hours().await?;
        let mut kept = 0usize;
        for hour in hours.into_iter().rev() {
            let kind = usage_export_hour(hour);
            let over_cap = match self.export_cap {
                Some(cap) => kept >= cap,
                None => false,
            };
            if hour < oldest_kept || over_cap {
                self.store.record_delete_kind(&kind).await?;
                self.store
                    .record_delete(USAGE_EXPORT_HOURS, &hour.to_string())
                    .await?;
            } else if self.export_cap.is_some() {
                kept += self.store.record_count(&kind).await? as usize;
            }
        }
        Ok(())
    }

    /// The entries of one hour (unordered): copies, or read from the ledger through their
    /// references (those the ledger no longer has are left out).
    pub(crate) async fn export_hour(&self, hour: u64) -> Result<Vec<LedgerEntry>, StoreError> {
        let records = self.store.record_list(&usage_export_hour(hour)).await?;
        let mut entries = Vec::with_capacity(records.len());
        for bytes in records {
            match bytes.split_first() {
                Some((&LEDGER_REFERENCE, id)) => {
                    let id = std::str::from_utf8(id).map_err(|_| {
                        StoreError::Corrupt("usage export reference is not UTF-8".to_owned())
                    })?;
                    if let Some(bytes) = self.store.record_get(LEDGER, id).await? {
                        entries.push(LedgerEntry::decode(&bytes)?);
                    }
                }
                _ => entries.push(LedgerEntry::decode(&bytes)?),
            }
        }
        Ok(entries)
    }
}
