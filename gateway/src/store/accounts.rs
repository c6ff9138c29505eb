//! Accounts' money as the store keeps it (owner: `accounts`): each account's balance, what is
//! held for its requests in flight, what it spent, the spend of its budget periods, the
//! settlements it took (so that a retried settlement debits once) and its credit ledger. All
//! amounts are integer micro-credits.
//!
//! Every change is one atomic step in the store, whichever replica makes it: the embedded
//! store applies a [`Book`] under its lock; the Redis store runs the same steps as Lua scripts
//! over one account's keys, which share a hash tag (`store/redis/accounts.rs`). The
//! `accounts` part of the store suite (`tests/all/accounts.rs`) runs both.
//!
//! Time is the caller's (`now_ms`): holds expire and settlements are forgotten by the clock
//! the gateway passes, so that tests move it instead of sleeping.

use std::collections::{BTreeSet, HashMap};

/// A hold to place for a request at its admission.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldRequest<'a> {
    pub account: &'a str,
    pub request_id: &'a str,
    /// Micro-credits to hold, at least 0. 0 holds nothing and only checks that the available
    /// balance is positive and no period is spent (a request without a price).
    pub amount: i64,
    pub now_ms: u64,
    /// When the hold runs out by itself (a replica that died mid-request).
    pub expires_at_ms: u64,
    /// The account's budget periods now: the counter's name and its cap. A period's spend,
    /// plus every hold in flight, plus this one, must stay within its cap.
    pub caps: &'a [(String, i64)],
}

/// What became of a [`HoldRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Held (or held already, for the same request id): the available balance after it.
    Held { available: i64 },
    /// The available balance (balance minus holds in flight) does not cover it.
    Insufficient { available: i64 },
    /// The period `caps[index]` would pass its cap: its spend so far and the holds in flight.
    OverCap {
        index: usize,
        spent: i64,
        reserved: i64,
    },
}

/// A request's settlement: its charge debited, its hold released.
#[derive(Debug, Clone, PartialEq)]
pub struct SettleRequest<'a> {
    pub account: &'a str,
    pub request_id: &'a str,
    /// Micro-credits, at least 0.
    pub charge: i64,
    pub now_ms: u64,
    /// The period counters the charge counts towards, and when each may be forgotten.
    pub periods: &'a [(String, u64)],
    /// Until when the settlement is remembered, so that a retry of it debits nothing.
    pub remember_until_ms: u64,
}

/// What became of a [`SettleRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    /// Debited: the balance after it, and each period's spend after it (in order).
    Settled { balance: i64, periods: Vec<i64> },
    /// This request was settled already: nothing changed.
    AlreadySettled,
}

/// What a credit (a top-up or an adjustment) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditOutcome {
    /// Credited and written to the credit ledger: the balance after it.
    Credited { balance: i64 },
    /// Refused (it would take the balance past the bounds given): the balance as it is.
    Refused { balance: i64 },
}

/// An account's money now (expired holds released first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Money {
    /// Credits in minus debits, micro-credits.
    pub balance: i64,
    /// Held for requests in flight.
    pub reserved: i64,
    /// Debited, in all.
    pub spent: i64,
    /// Holds in flight.
    pub holds: u64,
    /// The spend of each period asked for, in order.
    pub periods: Vec<i64>,
}

/// One entry of an account's credit ledger: the balance after it, and the entry as the caller
/// wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditRecord {
    pub balance_after: i64,
    pub entry: Vec<u8>,
}

/// One account's money in the embedded store, changed only through these methods (each under
/// the store's lock). The Redis scripts do the very same steps.
#[derive(Default)]
pub(super) struct Book {
    balance: i64,
    reserved: i64,
    spent: i64,
    /// Holds by request id: amount and expiry (Unix ms).
    holds: HashMap<String, (i64, u64)>,
    /// Settled request ids and until when each is remembered.
    settled: HashMap<String, u64>,
    /// The same, soonest forgotten first; an id forgotten early leaves nothing behind.
    settled_order: BTreeSet<(u64, String)>,
    /// Period counters: spend and when the counter may be forgotten.
    periods: HashMap<String, (i64, u64)>,
    credits: Vec<CreditRecord>,
}

impl Book {
    /// Releases the holds that ran out.
    fn expire_holds(&mut self, now_ms: u64) {
        let reserved = &mut self.reserved;
        self.holds.retain(|_, (amount, expires)| {
            let live = *expires > now_ms;
            if !live {
                *reserved -= *amount;
            }
            live
        });
    }

    fn period(&self, name: &str, now_ms: u64) -> i64 {
        match self.periods.get(name) {
            Some((spent, until)) if *until > now_ms => *spent,
            _ => 0,
        }
    }

    pub(super) fn hold(&mut self, hold: &HoldRequest<'_>) -> HoldOutcome {
        self.expire_holds(hold.now_ms);
        let available = self.balance.saturating_sub(self.reserved);
        if self.holds.contains_key(hold.request_id) {
            return HoldOutcome::Held { available };
        }
        let amount = hold.amount.max(0);
        let covered = if amount > 0 {
            amount <= available
        } else {
            available > 0
        };
        if !covered {
            return HoldOutcome::Insufficient { available };
        }
        for (index, (name, cap)) in hold.caps.iter().enumerate() {
            let spent = self.period(name, hold.now_ms);
            let committed = spent.saturating_add(self.reserved);
            let within = if amount > 0 {
                committed.saturating_add(amount) <= *cap
            } else {
                committed < *cap
            };
            if !within {
                return HoldOutcome::OverCap {
                    index,
                    spent,
                    reserved: self.reserved,
                };
            }
        }
        if amount > 0 {
            self.holds
                .insert(hold.request_id.to_owned(), (amount, hold.expires_at_ms));
            self.reserved += amount;
        }
        HoldOutcome::Held {
            available: available - amount,
        }
    }

    /// Settles a request once (see [`SettleRequest`]). The settlements whose time ran out are
    /// forgotten first, their ids added to `forgotten`.
    pub(super) fn settle(
        &mut self,
        settle: &SettleRequest<'_>,
        forgotten: &mut Vec<String>,
    ) -> SettleOutcome {
        while let Some((until, _)) = self.settled_order.first() {
            if *until > settle.now_ms {
                break;
            }
            if let Some((_, id)) = self.settled_order.pop_first() {
                self.settled.remove(&id);
                forgotten.push(id);
            }
        }
        if self.settled.contains_key(settle.request_id) {
            return SettleOutcome::AlreadySettled;
        }
        if let Some((amount, _)) = self.holds.remove(settle.request_id) {
            self.reserved -= amount;
        }
        let charge = settle.charge.max(0);
        self.balance = self.balance.saturating_sub(charge);
        self.spent = self.spent.saturating_add(charge);
        let periods = settle
            .periods
            .iter()
            .map(|(name, until)| {
                let counter = self.periods.entry(name.clone()).or_insert((0, *until));
                // A counter past its time starts again, as an expired Redis key would.
                if counter.1 <= settle.now_ms {
                    *counter = (0, *until);
                }
                counter.0 = counter.0.saturating_add(charge);
                counter.0
            })
            .collect();
        self.periods.retain(|_, (_, until)| *until > settle.now_ms);
        self.settled
            .insert(settle.request_id.to_owned(), settle.remember_until_ms);
        self.settled_order
            .insert((settle.remember_until_ms, settle.request_id.to_owned()));
        SettleOutcome::Settled {
            balance: self.balance,
            periods,
        }
    }

    /// Forgets that `request_id` was settled (its ledger entry is written: see
    /// [`Store::account_forget_settled`](super::Store::account_forget_settled)).
    pub(super) fn forget_settled(&mut self, request_id: &str) {
        if let Some(until) = self.settled.remove(request_id) {
            self.settled_order.remove(&(until, request_id.to_owned()));
        }
    }

    /// Settlements remembered (what [`forget_settled`](Self::forget_settled) frees).
    #[cfg(test)]
    pub(super) fn settled_len(&self) -> (usize, usize) {
        (self.settled.len(), self.settled_order.len())
    }

    pub(super) fn release(&mut self, request_id: &str) -> bool {
        match self.holds.remove(request_id) {
            Some((amount, _)) => {
                self.reserved -= amount;
                true
            }
            None => false,
        }
    }

    pub(super) fn credit(
        &mut self,
        delta: i64,
        min_balance: i64,
        max_balance: i64,
        entry: &[u8],
    ) -> CreditOutcome {
        let after = self.balance.saturating_add(delta);
        if after > max_balance || (delta < 0 && after < min_balance) {
            return CreditOutcome::Refused {
                balance: self.balance,
            };
        }
        self.balance = after;
        self.credits.push(CreditRecord {
            balance_after: after,
            entry: entry.to_vec(),
        });
        CreditOutcome::Credited { balance: after }
    }

    pub(super) fn credits(&self) -> Vec<CreditRecord> {
        self.credits.clone()
    }

    pub(super) fn money(&mut self, now_ms: u64, periods: &[String]) -> Money {
        self.expire_holds(now_ms);
        Money {
            balance: self.balance,
            reserved: self.reserved,
            spent: self.spent,
            holds: self.holds.len() as u64,
            periods: periods.iter().map(|p| self.period(p, now_ms)).collect(),
        }
    }
}
