//! Settlement: once the meter has priced a request's usage, its account is debited the charge
//! and the request's hold released, in one step, once per request id (the usage ledger may
//! hand an event over again after a crash; the store remembers the settlement for
//! [`SETTLED_KEPT`] and a second one changes nothing). The charge counts towards the
//! account's day, week and month of the request's end.

use std::collections::HashMap;
use std::time::Duration;

use crate::ledger::{Outcome, UsageEvent};
use crate::store::{SettleOutcome, SettleRequest};

use super::Accounts;
use super::account::Account;
use super::money::Credits;
use super::periods::Period;

/// How long a settlement is remembered. The usage ledger hands an event over again only when
/// a worker died between metering it and writing its entry (its lease runs out in seconds) or
/// the store was down meanwhile: a day covers both, as idempotency keys are kept a day. Costs
/// about a hundred bytes per request of an account, for a day.
pub const SETTLED_KEPT: Duration = Duration::from_secs(24 * 3600);
/// How long a period's spend is kept after the period ends (to be shown, and for a late
/// event of that period).
const PERIOD_KEPT_AFTER: u64 = 24 * 3600 * 1000;

impl Accounts {
    /// Settles the events whose outcome is priced (`Ok`) and whose key has an account. A
    /// settlement the store could not make turns the event's outcome into an error: the ledger
    /// retries the event, and the settlement then happens once.
    pub async fn settle_events(
        &self,
        events: &[&UsageEvent],
        outcomes: &mut [Result<Outcome, String>],
    ) {
        // Each key's account, and each account, looked up once per batch of events.
        let mut account_of_key: HashMap<&str, Option<String>> = HashMap::new();
        let mut accounts: HashMap<String, Option<Account>> = HashMap::new();
        for (event, outcome) in events.iter().zip(outcomes.iter_mut()) {
            let Ok(priced) = outcome else {
                continue;
            };
            let account_id = match account_of_key.get(event.key_id.as_str()) {
                Some(account) => account.clone(),
                None => match self.store().key_by_id(&event.key_id).await {
                    Ok(key) => {
                        let account = key.and_then(|key| key.account);
                        account_of_key.insert(&event.key_id, account.clone());
                        account
                    }
                    Err(err) => {
                        *outcome = Err(format!("account settlement: {err}"));
                        continue;
                    }
                },
            };
            let Some(account_id) = account_id else {
                continue;
            };
            if !accounts.contains_key(&account_id) {
                match self.get(&account_id).await {
                    Ok(account) => {
                        accounts.insert(account_id.clone(), account);
                    }
                    Err(err) => {
                        *outcome = Err(format!("account settlement: {err}"));
                        continue;
                    }
                }
            }
            let charge = Credits::from_charge(priced.credits).micro();
            match self.settle(&account_id, event, charge).await {
                Ok(Some((balance, spends))) => {
                    if let Some(Some(account)) = accounts.get(&account_id) {
                        self.settled(account, event, charge, balance, &spends).await;
                    }
                }
                Ok(None) => {
                    tracing::debug!(request_id = %event.request_id, account = %account_id, "settled before; not debited again");
                }
                Err(err) => *outcome = Err(format!("account settlement: {err}")),
            }
        }
    }

    /// Debits one request's charge (micro-credits) and releases its hold: the balance and each
    /// period's spend after it, or `None` when it was settled before.
    pub async fn settle(
        &self,
        account_id: &str,
        event: &UsageEvent,
        charge: i64,
    ) -> Result<Option<(i64, Vec<i64>)>, crate::store::StoreError> {
        let now_ms = self.now_ms();
        let periods: Vec<(String, u64)> = Period::ALL
            .into_iter()
            .map(|period| {
                let window = self.window(period, event.finished_at_ms);
                (window.name, window.end_ms.saturating_add(PERIOD_KEPT_AFTER))
            })
            .collect();
        let request = SettleRequest {
            account: account_id,
            request_id: &event.request_id,
            charge,
            now_ms,
            periods: &periods,
            remember_until_ms: now_ms.saturating_add(SETTLED_KEPT.as_millis() as u64),
        };
        Ok(match self.store().account_settle(&request).await? {
            SettleOutcome::Settled { balance, periods } => Some((balance, periods)),
            SettleOutcome::AlreadySettled => None,
        })
    }

    /// After a debit: the alerts it crossed.
    async fn settled(
        &self,
        account: &Account,
        event: &UsageEvent,
        charge: i64,
        balance: i64,
        spends: &[i64],
    ) {
        if charge == 0 {
            return;
        }
        self.balance_moved(account, balance.saturating_add(charge), balance)
            .await;
        for (period, spent) in Period::ALL.into_iter().zip(spends) {
            let window = self.window(period, event.finished_at_ms);
            self.period_spend_moved(account, &window, spent.saturating_sub(charge), *spent)
                .await;
        }
    }
}
