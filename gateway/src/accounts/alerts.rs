//! Alerts: an account's period budget passing a share the operator set (`alert_thresholds`,
//! say 50, 80 and 100 percent), once per period and threshold, and its balance falling below
//! an amount (`low_balance_alert`), once each time it falls through it. Each is recorded with
//! the account (`GET /admin/accounts/{id}` shows the newest) and emitted to webhooks: a
//! `budget.threshold` event (its id names the account, the period's start and the threshold,
//! so a receiver gets it once) or a `balance.low` one.
//!
//! The debit that crosses a threshold is the one step of the store that took the spend or the
//! balance from one side of it to the other, so one replica alone sees each crossing; a
//! counter in the store (`account_alert_crossed`) keeps a period's threshold to one alert even
//! if the budget is changed mid-period.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Accounts;
use super::account::Account;
use super::money::Credits;
use super::periods::{Period, Window};
use crate::store::StoreError;
use crate::store::keyspace::{account_alert_crossed, account_alerts};
use crate::webhooks::{BalanceLow, BudgetThreshold, Event};

/// Alerts kept per account, newest first; older ones are dropped as new ones come.
const ALERTS_KEPT: usize = 200;
/// The event type an alert is, for webhooks.
pub const EVENT_TYPE: &str = "budget.threshold";

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A period budget's share was spent.
    PeriodBudget,
    /// The balance fell below `low_balance_alert`.
    LowBalance,
}

/// A threshold an account crossed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Alert {
    pub id: String,
    /// Always `budget.threshold`.
    #[serde(rename = "type")]
    pub kind_of_event: String,
    pub account: String,
    pub kind: AlertKind,
    /// With `period_budget`: the period, its name (`day:2026-12-07`...), the threshold and the
    /// budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Credits>,
    /// With `period_budget`: the period's spend when it crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent: Option<Credits>,
    /// With `low_balance`: the amount it fell below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_balance_alert: Option<Credits>,
    /// The balance right after the step that crossed it (with `period_budget`: when known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Credits>,
    /// Unix milliseconds.
    pub at_ms: u64,
}

/// Whether `threshold` percent of `cap` lies in `(before, after]`.
fn crossed(before: i64, after: i64, cap: i64, threshold: u32) -> bool {
    let line = i128::from(cap) * i128::from(threshold);
    i128::from(before) * 100 < line && line <= i128::from(after) * 100
}

impl Accounts {
    /// A period's spend went from `before` to `after`: the thresholds that lie in between.
    pub(super) async fn period_spend_moved(
        &self,
        account: &Account,
        window: &Window,
        before: i64,
        after: i64,
    ) {
        let Some(cap) = account.budgets.get(window.period) else {
            return;
        };
        for &threshold in &account.alert_thresholds {
            if !crossed(before, after, cap.micro(), threshold) {
                continue;
            }
            let marker = account_alert_crossed(&account.id, &window.name, threshold);
            let kept = std::time::Duration::from_millis(
                window.end_ms.saturating_sub(self.now_ms()) + 24 * 3600 * 1000,
            );
            match self.store().kv_incr(&marker, 1, Some(kept)).await {
                Ok(1) => {}
                Ok(_) => continue,
                Err(err) => {
                    tracing::warn!(account = %account.id, error = %err, "cannot mark a budget alert; raising it anyway");
                }
            }
            let now_ms = self.now_ms();
            if let Some(webhooks) = &self.webhooks {
                let data = BudgetThreshold {
                    scope: "account".into(),
                    scope_id: account.id.clone(),
                    period: window.period.as_str().into(),
                    period_start_ms: window.start_ms,
                    resets_at_ms: Some(window.end_ms),
                    threshold_percent: threshold,
                    spent: Credits(after).as_f64(),
                    budget: cap.as_f64(),
                };
                webhooks.emit(Event::budget_threshold(&data, now_ms));
            }
            let alert = Alert {
                id: String::new(),
                kind_of_event: EVENT_TYPE.to_owned(),
                account: account.id.clone(),
                kind: AlertKind::PeriodBudget,
                period: Some(window.period),
                period_name: Some(window.name.clone()),
                threshold_percent: Some(threshold),
                budget: Some(cap),
                spent: Some(Credits(after)),
                low_balance_alert: None,
                balance: None,
                at_ms: now_ms,
            };
            self.raise(alert).await;
        }
    }

    /// The balance went from `before` to `after`: an alert if it fell through the account's
    /// `low_balance_alert`.
    pub(super) async fn balance_moved(&self, account: &Account, before: i64, after: i64) {
        let Some(low) = account.low_balance_alert else {
            return;
        };
        if !(before >= low.micro() && after < low.micro()) {
            return;
        }
        let alert = Alert {
            id: String::new(),
            kind_of_event: EVENT_TYPE.to_owned(),
            account: account.id.clone(),
            kind: AlertKind::LowBalance,
            period: None,
            period_name: None,
            threshold_percent: None,
            budget: None,
            spent: None,
            low_balance_alert: Some(low),
            balance: Some(Credits(after)),
            at_ms: self.now_ms(),
        };
        let alert = self.raise(alert).await;
        if let Some(webhooks) = &self.webhooks {
            let data = BalanceLow {
                account_id: account.id.clone(),
                balance: Credits(after).as_f64(),
                threshold: low.as_f64(),
            };
            // One fall through the threshold is one step of the store: one alert, one event.
            let id = format!("balance:{}:{}", account.id, alert.id);
            webhooks.emit(Event::balance_low(id, &data, alert.at_ms));
        }
    }

    /// Records an alert with its account; the alert with its id.
    async fn raise(&self, mut alert: Alert) -> Alert {
        // Ids sort by time: the newest are the last.
        alert.id = format!("alert_{:013}_{}", alert.at_ms, crate::keys::random_token(8));
        tracing::info!(account = %alert.account, kind = ?alert.kind, threshold = ?alert.threshold_percent, period = ?alert.period_name, "account alert");
        if let Err(err) = self.keep(&alert).await {
            tracing::warn!(account = %alert.account, error = %err, "cannot record an account alert");
        }
        alert
    }

    async fn keep(&self, alert: &Alert) -> Result<(), StoreError> {
        let kind = account_alerts(&alert.account);
        let json = serde_json::to_vec(alert)?;
        self.store().record_put(&kind, &alert.id, &json).await?;
        if self.store().record_count(&kind).await? as usize > ALERTS_KEPT {
            let mut all = self.alerts(&alert.account).await?;
            all.sort_by(|a, b| b.id.cmp(&a.id));
            for old in all.iter().skip(ALERTS_KEPT) {
                self.store().record_delete(&kind, &old.id).await?;
            }
        }
        Ok(())
    }

    /// An account's alerts, newest first.
    pub async fn alerts(&self, account_id: &str) -> Result<Vec<Alert>, StoreError> {
        let mut alerts: Vec<Alert> = self
            .store()
            .record_list(&account_alerts(account_id))
            .await?
            .iter()
            .filter_map(|bytes| serde_json::from_slice(bytes).ok())
            .collect();
        alerts.sort_by(|a, b| b.id.cmp(&a.id));
        Ok(alerts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_is_crossed_by_the_step_that_passes_it() {
        // 50 % of 10 credits is 5.
        let cap = 10_000_000;
        assert!(crossed(4_999_999, 5_000_000, cap, 50));
        assert!(crossed(0, 10_000_000, cap, 50));
        assert!(!crossed(5_000_000, 6_000_000, cap, 50), "passed before");
        assert!(!crossed(1, 4_999_999, cap, 50));
        assert!(crossed(9_000_000, 12_000_000, cap, 100));
        // No overflow at the extremes.
        assert!(crossed(i64::MAX - 1, i64::MAX, i64::MAX, 100));
        assert!(!crossed(i64::MIN, i64::MIN, i64::MAX, 100));
    }
}
