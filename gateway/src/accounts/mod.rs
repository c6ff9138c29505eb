//! Accounts and prepaid credits: an account (a customer) owns API keys, and a key's spend is
//! its account's.
//!
//! - [`account`]: the account record (name, budgets per period, alert thresholds, closed or
//!   not) and which keys it owns;
//! - [`credits`]: top-ups and adjustments, each an entry of the account's append-only credit
//!   ledger (who, when, why, the balance after);
//! - [`holds`]: admission. A request of a key with an account is admitted only when the
//!   account's available balance (its balance minus what requests in flight hold) covers a
//!   hold at the price the meter quotes for the most the request can be billed, and no period
//!   budget would pass its cap; the hold is released when the request ends without usage;
//! - [`settle`]: the real cost, when the meter has charged the request's usage: debited once
//!   per request id, its hold released, its period spend counted;
//! - [`alerts`]: thresholds of period budgets and of the balance, crossed once per period;
//! - [`periods`]: calendar days, weeks and months in the operator's zone, and the clock;
//! - [`money`]: credits as integer micro-credits, shown as decimals;
//! - [`config`]: `[accounts]`, the zone of the periods and how long a hold lasts;
//! - [`api`] serves `/admin/accounts`.
//!
//! The money itself is the store's (`Store::account_*`): each step is atomic there, so
//! replicas sharing a Redis agree to the micro-credit. docs/money.md explains the model.

pub mod account;
pub mod alerts;
pub mod api;
pub mod config;
pub mod credits;
pub mod holds;
pub mod money;
pub mod periods;
pub mod settle;

use std::sync::Arc;

pub use account::Account;
pub use config::AccountsConfig;
pub use holds::{Hold, HoldFor};
pub use money::{Credits, MAX_MONEY, MICRO};
pub use periods::{Clock, ManualClock, Period, SystemClock, Window};

use crate::store::Store;
use crate::webhooks::Webhooks;

/// Accounts as the gateway's parts use them: the store, the settings, the clock, and where
/// alerts go.
pub struct Accounts {
    store: Arc<dyn Store>,
    config: AccountsConfig,
    clock: Arc<dyn Clock>,
    webhooks: Option<Arc<Webhooks>>,
}

impl Accounts {
    pub fn new(store: Arc<dyn Store>, config: AccountsConfig, clock: Arc<dyn Clock>) -> Self {
        Accounts {
            store,
            config,
            clock,
            webhooks: None,
        }
    }

    /// Alerts are emitted as webhook events too (`budget.threshold`, `balance.low`).
    pub fn emitting_to(mut self, webhooks: Arc<Webhooks>) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub fn config(&self) -> &AccountsConfig {
        &self.config
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The window of each period at `now_ms`, in the configured zone.
    pub fn window(&self, period: Period, now_ms: u64) -> Window {
        period.window(now_ms, self.config.utc_offset_minutes)
    }
}
