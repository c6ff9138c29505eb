//! Admission: a request of a key with an account holds, at the price the meter quoted, the
//! most it can be billed; it is refused (429 `insufficient_quota`, as OpenAI answers a spent
//! balance) when the account's available balance does not cover that, or when a period budget
//! would pass its cap. The hold is atomic in the store, so concurrent requests on several
//! replicas cannot hold more than the account has.
//!
//! Without a quote (no meter, or one older than `garage:policy@0.5.0`) nothing is held, and the
//! request is admitted while the available balance is positive: the weaker guarantee, under
//! which requests admitted together can overdraw the account by at most their own costs.

use std::sync::Arc;

use crate::error::ApiError;
use crate::ledger::billing::{RequestBounds, TextKind, media_parts, most_prompt_tokens};
use crate::plugins::Price;
use crate::store::{ApiKeyRecord, HoldOutcome, HoldRequest};

use super::Accounts;
use super::money::{Credits, MAX_MONEY, MICRO};

/// OpenAI's message for a spent balance, word for word: clients and people recognise it.
pub const INSUFFICIENT_QUOTA: &str =
    "You exceeded your current quota, please check your plan and billing details.";

/// What admission held for a request: settled with its charge once the meter priced its
/// usage, or released if it ended without usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub account: String,
    /// Micro-credits held (0: nothing, the request had no price).
    pub amount: i64,
}

/// What a request may be billed at most, as admission knows it, and the price it was quoted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HoldFor {
    /// The meter's quote for the model; `None` when it quotes nothing.
    pub price: Option<Price>,
    /// The most prompt tokens the request can be billed (the bill's bound from its bytes).
    pub prompt_tokens: u64,
    /// `max_tokens` (or its other names), if the request set it.
    pub max_tokens: Option<u32>,
    /// Outputs asked for: `n`, times the prompts of a completions request.
    pub choices: u32,
    /// Whether the endpoint generates text at all (embeddings, rerank and score do not).
    pub generates: bool,
}

impl HoldFor {
    /// What a request of `key` may be billed at most, from its bounds and body (the price is
    /// the quote's, set at admission). Nothing to work out for a key without an account.
    pub fn of(key: &ApiKeyRecord, bounds: &RequestBounds, body: &[u8]) -> HoldFor {
        if key.account.is_none() {
            return HoldFor::default();
        }
        HoldFor {
            price: None,
            prompt_tokens: most_prompt_tokens(bounds.request_bytes, media_parts(body)),
            max_tokens: bounds.max_tokens,
            choices: bounds.choices,
            generates: bounds.text != TextKind::None,
        }
    }
}

/// Releases a request's hold off the request's path (it ended without usage).
pub fn release_later(accounts: &Arc<Accounts>, hold: &Hold, request_id: &str) {
    if hold.amount == 0 {
        return;
    }
    let (accounts, hold, request_id) = (Arc::clone(accounts), hold.clone(), request_id.to_owned());
    tokio::spawn(async move { accounts.release(&hold, &request_id).await });
}

impl Accounts {
    /// Completion tokens held for a request: `max_tokens` for every choice, or the configured
    /// default when it sets none; none for an endpoint that generates nothing.
    pub fn completion_tokens(&self, hold: &HoldFor) -> u64 {
        if !hold.generates {
            return 0;
        }
        let per_choice = match hold.max_tokens {
            Some(max) if max > 0 => max,
            _ => self.config().default_completion_tokens,
        };
        u64::from(per_choice).saturating_mul(u64::from(hold.choices.max(1)))
    }

    /// Micro-credits to hold: the quote for the most the request can be billed, rounded up
    /// (what is held is never less than what can be charged). A price that makes no sense is
    /// as if there were none.
    pub fn hold_amount(&self, hold: &HoldFor) -> i64 {
        let Some(price) = hold.price else {
            return 0;
        };
        let cost = price.cost(hold.prompt_tokens, self.completion_tokens(hold));
        if !cost.is_finite() || cost <= 0.0 {
            return 0;
        }
        // More than any balance can cover, without overflowing the store's arithmetic.
        let ceiling = 2 * MAX_MONEY;
        let micro = (cost * MICRO as f64).ceil();
        if micro >= ceiling as f64 {
            ceiling
        } else {
            micro as i64
        }
    }

    /// Admits a request of `key` against its account: `None` for a key without one (nothing
    /// to do); else the hold placed (the caller settles or releases it), or 429
    /// `insufficient_quota` (with `retry-after` to the period's end when a period budget is
    /// spent), or 403 for an account that is closed or missing.
    pub async fn admit(
        &self,
        key: &ApiKeyRecord,
        request_id: &str,
        hold: &HoldFor,
    ) -> Result<Option<Hold>, ApiError> {
        let Some(account_id) = key.account.as_deref() else {
            return Ok(None);
        };
        let account = self.get(account_id).await?.ok_or_else(|| {
            // The key names an account that is not there: refused, never served for free.
            tracing::error!(key_id = %key.id, account = %account_id, "a key's account is missing");
            ApiError::Forbidden {
                message: "This API key's account does not exist; ask your gateway operator.".into(),
                code: "account_not_found",
            }
        })?;
        if account.closed_at.is_some() {
            return Err(ApiError::Forbidden {
                message: "This API key's account is closed.".into(),
                code: "account_closed",
            });
        }
        let amount = self.hold_amount(hold);
        let now_ms = self.now_ms();
        let windows: Vec<_> = account
            .budgets
            .caps()
            .map(|(period, cap)| (self.window(period, now_ms), cap))
            .collect();
        let caps: Vec<(String, i64)> = windows
            .iter()
            .map(|(window, cap)| (window.name.clone(), cap.micro()))
            .collect();
        let hold_secs = self.config().hold_secs;
        let request = HoldRequest {
            account: account_id,
            request_id,
            amount,
            now_ms,
            expires_at_ms: now_ms.saturating_add(hold_secs.saturating_mul(1000)),
            caps: &caps,
        };
        let refused = |message: String, retry_after_secs: Option<u64>| ApiError::TooManyRequests {
            message,
            code: "insufficient_quota",
            retry_after_secs,
            headers: Vec::new(),
        };
        match self.store().account_hold(&request).await? {
            HoldOutcome::Held { .. } => Ok(Some(Hold {
                account: account_id.to_owned(),
                amount,
            })),
            HoldOutcome::Insufficient { available } if amount > 0 && available > 0 => {
                // The balance is not spent, this request asks for more than is left: its
                // max_tokens (or the default) at the quoted price. Refused, not capped: a
                // smaller hold could be overdrawn by the answer.
                Err(refused(
                    format!(
                        "{INSUFFICIENT_QUOTA} This request could cost up to {} credits \
                         (its prompt and max_tokens at the quoted price) and the account has {} \
                         available; lower max_tokens or top up.",
                        Credits(amount),
                        Credits(available)
                    ),
                    None,
                ))
            }
            HoldOutcome::Insufficient { .. } => Err(refused(INSUFFICIENT_QUOTA.to_owned(), None)),
            HoldOutcome::OverCap {
                index,
                spent,
                reserved,
            } => {
                let Some((window, cap)) = windows.get(index) else {
                    return Err(ApiError::Internal("a period out of range".into()));
                };
                let period = window.period.as_str();
                // Spent by settled requests alone: until the period ends. Else requests in
                // flight hold the rest, and may leave some once they settle.
                let spent_alone = if amount > 0 {
                    spent.saturating_add(amount) > cap.micro()
                } else {
                    spent >= cap.micro()
                };
                if spent_alone {
                    let secs = window.secs_left(now_ms);
                    Err(refused(
                        format!(
                            "{INSUFFICIENT_QUOTA} The account's {period} budget of {cap} credits \
                             is spent ({} credits); it resets in {secs} s.",
                            Credits(spent)
                        ),
                        Some(secs),
                    ))
                } else {
                    Err(refused(
                        format!(
                            "{INSUFFICIENT_QUOTA} Requests in flight hold the rest of the \
                             account's {period} budget of {cap} credits ({} spent, {} held); \
                             retry when they end.",
                            Credits(spent),
                            Credits(reserved)
                        ),
                        Some(1),
                    ))
                }
            }
        }
    }

    /// Whether `key` may start spending now (a batch being made): its account, if it has one,
    /// is open, has credits available and no spent period budget. The same refusals as
    /// [`admit`](Self::admit); nothing is held.
    pub async fn may_spend(&self, key: &ApiKeyRecord) -> Result<(), ApiError> {
        self.admit(key, "", &HoldFor::default()).await.map(drop)
    }

    /// Whether lines of a batch owned by the key `owner` may be leased to rigs now: they are
    /// charged as they complete, so only while its account may spend (see docs/money.md).
    pub async fn batch_may_run(&self, owner: &str) -> Result<bool, ApiError> {
        let Some(key) = self.store().key_by_id(owner).await? else {
            return Ok(true);
        };
        match self.may_spend(&key).await {
            Ok(()) => Ok(true),
            Err(ApiError::TooManyRequests { .. } | ApiError::Forbidden { .. }) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Releases a request's hold: it ended before producing usage (refused by every backend,
    /// or failed). Nothing to do for a hold of nothing.
    pub async fn release(&self, hold: &Hold, request_id: &str) {
        if hold.amount == 0 {
            return;
        }
        if let Err(err) = self
            .store()
            .account_release(&hold.account, request_id)
            .await
        {
            // Not lost: the hold runs out by itself (`accounts.hold_secs`).
            tracing::warn!(account = %hold.account, request_id, error = %err, "cannot release a hold; it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::{AccountsConfig, ManualClock};
    use crate::store::MemoryStore;

    fn accounts() -> Accounts {
        Accounts::new(
            Arc::new(MemoryStore::new()),
            AccountsConfig::default(),
            Arc::new(ManualClock::at(0)),
        )
    }

    fn price(prompt: f64, completion: f64) -> Option<Price> {
        Some(Price {
            prompt_per_1k: prompt,
            completion_per_1k: completion,
        })
    }

    #[test]
    fn the_hold_is_the_quote_for_the_most_the_request_can_be_billed() {
        let accounts = accounts();
        let chat = HoldFor {
            price: price(1.0, 2.0),
            prompt_tokens: 500,
            max_tokens: Some(100),
            choices: 2,
            generates: true,
        };
        // 500 prompt tokens at 1/1k, 2 x 100 completion tokens at 2/1k.
        assert_eq!(accounts.hold_amount(&chat), 900_000);
        let no_max = HoldFor {
            max_tokens: None,
            choices: 1,
            ..chat
        };
        assert_eq!(accounts.completion_tokens(&no_max), 1024);
        let embeddings = HoldFor {
            generates: false,
            ..chat
        };
        assert_eq!(accounts.hold_amount(&embeddings), 500_000);
        assert_eq!(
            accounts.hold_amount(&HoldFor {
                price: None,
                ..chat
            }),
            0
        );
        // Rounded up: a third of a micro-credit holds a whole one.
        let tiny = HoldFor {
            price: price(0.001, 0.0),
            prompt_tokens: 1,
            max_tokens: Some(1),
            choices: 1,
            generates: false,
        };
        assert_eq!(accounts.hold_amount(&tiny), 1);
    }

    #[test]
    fn absurd_prices_and_sizes_hold_sanely() {
        let accounts = accounts();
        let huge = HoldFor {
            price: price(1.0, 1.0),
            prompt_tokens: u64::MAX,
            max_tokens: Some(u32::MAX),
            choices: u32::MAX,
            generates: true,
        };
        assert_eq!(accounts.hold_amount(&huge), 2 * MAX_MONEY);
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let hold = HoldFor {
                price: price(bad, bad),
                prompt_tokens: 10,
                max_tokens: Some(10),
                choices: 1,
                generates: true,
            };
            assert_eq!(accounts.hold_amount(&hold), 0, "{bad}");
        }
    }
}
