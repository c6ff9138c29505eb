//! What the gateway's checks found about a rig, and what follows from it.
//!
//! Two kinds of check: a **spot check** (a challenge request compared with other rigs' answers
//! by log-probabilities, see [`super::challenge`]) passes or fails; a **usage check** (a
//! request's reported tokens against the gateway's own count, see
//! [`crate::ledger::tokens`]) can only fail: a rig earns trust by serving the model it claims,
//! not by counting honestly now and then.
//!
//! States: `unverified` (new, or reinstated) → `verified` after [`VERIFY_AFTER`] spot checks
//! passed in a row → `suspect` on any failure → `quarantined` after [`QUARANTINE_AFTER`]
//! failures in a row. A passed spot check clears a suspect. A quarantined rig leaves routing on
//! every replica (it is not told: it would only learn to cheat better) until an admin reinstates
//! it. The record lives in the store, shared by every replica.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::*;
use crate::store::keyspace::NODE_TRUST;

/// Spot checks passed in a row that make a rig `verified`.
pub const VERIFY_AFTER: u32 = 3;
/// Failed checks in a row that quarantine a rig.
pub const QUARANTINE_AFTER: u32 = 3;

pub use crate::backends::TrustStatus;

/// Which check a rig passed or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// A challenge request compared with other rigs' answers.
    SpotCheck,
    /// A request's reported usage against the gateway's count.
    Usage,
    /// An answer's signed receipt (see [`super::receipts`]); like a usage check, it can only
    /// fail.
    Receipt,
}

/// A rig's trust, as the admin API shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Trust {
    /// The rig's node id.
    #[serde(default)]
    pub node: String,
    pub status: TrustStatus,
    pub checks_passed: u64,
    pub checks_failed: u64,
    /// Spot checks passed since the last failure.
    pub passed_in_a_row: u32,
    /// Checks failed since the last spot check passed.
    pub failed_in_a_row: u32,
    /// Unix seconds of the last check.
    pub last_check_at: Option<u64>,
    pub last_check: Option<CheckKind>,
    /// What the last failed check found.
    pub last_discrepancy: Option<String>,
    /// Unix seconds it was quarantined.
    pub quarantined_at: Option<u64>,
    /// Points its operator was awarded for its requests since its last passed spot check,
    /// withheld when it was quarantined (`GET /admin/rewards/leaderboard` shows them apart).
    #[serde(default)]
    pub withheld_points: f64,
}

impl Trust {
    /// Folds a check's outcome in; true when it quarantined the rig.
    fn apply(&mut self, kind: CheckKind, failure: Option<&str>, now: u64) -> bool {
        self.last_check_at = Some(now);
        self.last_check = Some(kind);
        match failure {
            None => {
                self.checks_passed += 1;
                if kind == CheckKind::SpotCheck {
                    self.passed_in_a_row = self.passed_in_a_row.saturating_add(1);
                    self.failed_in_a_row = 0;
                }
            }
            Some(discrepancy) => {
                self.checks_failed += 1;
                self.passed_in_a_row = 0;
                self.failed_in_a_row = self.failed_in_a_row.saturating_add(1);
                self.last_discrepancy = Some(discrepancy.to_owned());
            }
        }
        let before = self.status;
        self.status = match self.status {
            TrustStatus::Quarantined => TrustStatus::Quarantined,
            _ if self.failed_in_a_row >= QUARANTINE_AFTER => TrustStatus::Quarantined,
            _ if self.failed_in_a_row > 0 => TrustStatus::Suspect,
            _ if self.passed_in_a_row >= VERIFY_AFTER => TrustStatus::Verified,
            TrustStatus::Verified => TrustStatus::Verified,
            // A suspect that passed again, not yet enough times.
            _ => TrustStatus::Unverified,
        };
        if self.status == TrustStatus::Quarantined && before != TrustStatus::Quarantined {
            self.quarantined_at = Some(now);
            return true;
        }
        false
    }
}

impl Nodes {
    /// The metrics this registers.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(self.checks.clone()), self.receipts.collector()]
    }

    /// Counts a check (an inconclusive spot check too).
    pub(super) fn count_check(&self, kind: CheckKind, outcome: &str) {
        let kind = match kind {
            CheckKind::SpotCheck => "spot_check",
            CheckKind::Usage => "usage",
            CheckKind::Receipt => "receipt",
        };
        self.checks.with_label_values(&[kind, outcome]).inc();
    }

    /// A rig's trust record (a new rig's when it has none).
    pub async fn trust(&self, id: &str) -> Result<Trust, StoreError> {
        Ok(self.get(NODE_TRUST, id).await?.unwrap_or_else(|| Trust {
            node: id.to_owned(),
            ..Trust::default()
        }))
    }

    /// Reads every rig's trust status into memory (at start; events keep it current).
    pub async fn load_trust(&self) -> Result<(), StoreError> {
        let records = self.store.record_list(NODE_TRUST).await?;
        let mut cache = self.trust_cache();
        for bytes in records {
            if let Ok(trust) = serde_json::from_slice::<Trust>(&bytes) {
                cache.insert(trust.node, trust.status);
            }
        }
        Ok(())
    }

    fn trust_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, TrustStatus>> {
        self.trust_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A rig's trust as this replica knows it (unverified for a rig it never heard of).
    pub fn trust_of(&self, id: &str) -> TrustStatus {
        self.trust_cache().get(id).copied().unwrap_or_default()
    }

    /// A rig's trust changed (here or on another replica): its backend's too.
    pub(super) fn note_trust(&self, id: &str, status: TrustStatus) {
        self.trust_cache().insert(id.to_owned(), status);
        if let Some(backend) = self.backends.snapshot().all().iter().find(|b| b.id == id) {
            backend.set_trust(status);
        }
    }

    /// Stores a rig's trust and tells every replica when its status changed.
    async fn save_trust(&self, trust: &Trust, before: TrustStatus) -> Result<(), StoreError> {
        self.put(NODE_TRUST, &trust.node, trust).await?;
        if trust.status != before {
            self.note_trust(&trust.node, trust.status);
            self.store
                .publish(&StoreEvent::TrustChanged {
                    node: trust.node.clone(),
                    status: trust.status.as_str().to_owned(),
                })
                .await?;
        }
        Ok(())
    }

    /// Records a check's outcome (`failure`: what was found; `None`: passed); quarantines the
    /// rig when it is the last straw. One replica records one check at a time; several
    /// replicas may race on one rig: a lost update delays a verdict by a check, never inverts
    /// one.
    pub async fn record_check(
        &self,
        id: &str,
        kind: CheckKind,
        failure: Option<&str>,
    ) -> Result<Trust, StoreError> {
        let _updating = self.trust_update.lock().await;
        let mut trust = self.trust(id).await?;
        let before = trust.status;
        self.count_check(
            kind,
            if failure.is_some() {
                "failed"
            } else {
                "passed"
            },
        );
        let quarantine = trust.apply(kind, failure, unix_now());
        if kind == CheckKind::SpotCheck && failure.is_none() {
            // What it was awarded so far stands.
            crate::ledger::confirm_points(self.store.as_ref(), id).await?;
        }
        if quarantine && let Some(record) = self.get::<NodeRecord>(NODE_KIND, id).await? {
            let reason = trust.last_discrepancy.clone().unwrap_or_default();
            trust.withheld_points += crate::ledger::withhold_points(
                self.store.as_ref(),
                id,
                &record.operator,
                &format!("quarantined: {reason}"),
            )
            .await?;
        }
        self.save_trust(&trust, before).await?;
        if let Some(discrepancy) = failure {
            tracing::warn!(node = %id, check = ?kind, status = ?trust.status, discrepancy, "rig failed a check");
        }
        if quarantine {
            tracing::warn!(node = %id, "rig quarantined: out of routing until an admin reinstates it");
            self.set_quarantined(id, true).await?;
        }
        Ok(trust)
    }

    /// Marks a rig as one the operator vouches for (or not): spot checks of its model compare
    /// with it first, as with a verified rig.
    pub async fn set_reference(&self, id: &str, reference: bool) -> Result<NodeInfo, ApiError> {
        let mut record = self.require(id).await?;
        record.reference = reference;
        self.put(NODE_KIND, id, &record).await?;
        tracing::info!(node = %id, reference, "rig's reference status changed by admin");
        self.get_info(id).await
    }

    /// Brings a quarantined (or any) rig back: `unverified`, in routing with its next
    /// heartbeat, its history kept.
    pub async fn reinstate(&self, id: &str) -> Result<NodeInfo, ApiError> {
        self.require(id).await?;
        let _updating = self.trust_update.lock().await;
        let mut trust = self.trust(id).await?;
        let before = trust.status;
        trust.status = TrustStatus::Unverified;
        trust.failed_in_a_row = 0;
        trust.passed_in_a_row = 0;
        trust.quarantined_at = None;
        self.save_trust(&trust, before).await?;
        self.set_quarantined(id, false).await?;
        tracing::info!(node = %id, "rig reinstated by admin");
        self.get_info(id).await
    }

    async fn set_quarantined(&self, id: &str, quarantined: bool) -> Result<(), StoreError> {
        let Some(mut record) = self.get::<NodeRecord>(NODE_KIND, id).await? else {
            return Ok(());
        };
        record.quarantined = quarantined;
        self.put(NODE_KIND, id, &record).await?;
        self.store
            .publish(&StoreEvent::NodeChanged { id: id.to_owned() })
            .await?;
        if let Some(tunnel) = self.tunnels().get_mut(id) {
            tunnel.record.quarantined = quarantined;
            if quarantined {
                tunnel.draining = true;
                self.route(tunnel, Vec::new());
            } else {
                // Back in routing with its next heartbeat.
                tunnel.draining = tunnel.record.drained;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_verify_failures_quarantine() {
        let mut trust = Trust::default();
        for _ in 0..VERIFY_AFTER - 1 {
            assert!(!trust.apply(CheckKind::SpotCheck, None, 1));
            assert_eq!(trust.status, TrustStatus::Unverified);
        }
        trust.apply(CheckKind::SpotCheck, None, 1);
        assert_eq!(trust.status, TrustStatus::Verified);
        // Usage checks that pass do not count toward trust; one that fails makes a suspect.
        trust.apply(CheckKind::Usage, None, 2);
        assert_eq!(trust.passed_in_a_row, VERIFY_AFTER);
        trust.apply(CheckKind::Usage, Some("3x the tokens"), 2);
        assert_eq!(trust.status, TrustStatus::Suspect);
        // A passed spot check clears it, but trust is earned again from the start.
        trust.apply(CheckKind::SpotCheck, None, 3);
        assert_eq!(trust.status, TrustStatus::Unverified);
        for _ in 0..QUARANTINE_AFTER - 1 {
            assert!(!trust.apply(CheckKind::SpotCheck, Some("another model"), 4));
            assert_eq!(trust.status, TrustStatus::Suspect);
        }
        assert!(trust.apply(CheckKind::SpotCheck, Some("another model"), 5));
        assert_eq!(trust.status, TrustStatus::Quarantined);
        assert_eq!(trust.quarantined_at, Some(5));
        // Only an admin brings it back.
        for _ in 0..10 {
            assert!(!trust.apply(CheckKind::SpotCheck, None, 6));
        }
        assert_eq!(trust.status, TrustStatus::Quarantined);
        assert_eq!(trust.last_discrepancy.as_deref(), Some("another model"));
    }
}
