//! What the host checks of a plugin's answers before the gateway uses them.

use super::*;

pub(super) fn check_route(
    order: Vec<u32>,
    candidates: usize,
) -> Result<Vec<u32>, (FaultKind, String)> {
    if order.is_empty() {
        return Err((FaultKind::BadOutput, "router returned an empty list".into()));
    }
    if order.len() > candidates {
        return Err((
            FaultKind::BadOutput,
            format!(
                "router returned {} indices for {candidates} candidates",
                order.len()
            ),
        ));
    }
    let mut seen = vec![false; candidates];
    for &index in &order {
        match seen.get_mut(index as usize) {
            None => {
                return Err((
                    FaultKind::BadOutput,
                    format!("router returned index {index} for {candidates} candidates"),
                ));
            }
            Some(true) => {
                return Err((
                    FaultKind::BadOutput,
                    format!("router returned index {index} twice"),
                ));
            }
            Some(flag) => *flag = true,
        }
    }
    Ok(order)
}

/// `x-ratelimit-*` values of an answer that reports none (the gateway's own allow or refusal).
pub(super) fn no_headers() -> RateLimitHeaders {
    RateLimitHeaders {
        limit_requests: None,
        remaining_requests: None,
        reset_requests_ms: None,
        limit_tokens: None,
        remaining_tokens: None,
        reset_tokens_ms: None,
    }
}

pub(super) fn check_decision(mut decision: Decision) -> Decision {
    if decision.reason.chars().count() > MAX_REASON_CHARS {
        decision.reason = cut(&decision.reason, MAX_REASON_CHARS);
    }
    decision
}

/// The model, key, request and backend a configuration check names: no real one.
pub(super) const CONFIG_CHECK: &str = "garage-config-check";
/// The least time a configuration check gets (see [`PluginHost::check_config`]).
pub(super) const CONFIG_CHECK_DEADLINE: Duration = Duration::from_secs(1);

/// Largest amount (credits of one charge, points of one award) the gateway records: ledgers sum
/// amounts as integer millionths in 64-bit counters, which this keeps far from overflowing
/// (9.2e12 in all). A plugin that answers more is faulty, not rich.
pub(super) const MAX_AMOUNT: f64 = 1e9;

pub(super) fn check_charge(charge: Charge) -> Result<Charge, (FaultKind, String)> {
    if !charge.credits.is_finite() || !(0.0..=MAX_AMOUNT).contains(&charge.credits) {
        return Err((
            FaultKind::BadOutput,
            format!("meter charged {} credits", charge.credits),
        ));
    }
    if charge.budgets.len() > MAX_BUDGETS {
        return Err((
            FaultKind::BadOutput,
            format!(
                "meter reported {} budgets (at most {MAX_BUDGETS})",
                charge.budgets.len()
            ),
        ));
    }
    if let Some(bad) = charge
        .budgets
        .iter()
        .find(|b| !(b.spent.is_finite() && b.limit.is_finite() && b.spent >= 0.0 && b.limit >= 0.0))
    {
        return Err((
            FaultKind::BadOutput,
            format!(
                "meter reported a budget of {} with {} spent",
                bad.limit, bad.spent
            ),
        ));
    }
    Ok(charge)
}

/// A meter's quote: finite, non-negative prices no larger than any amount the host accepts.
pub(super) fn check_price(price: QuotedPrice) -> Result<Price, (FaultKind, String)> {
    let fine = |v: f64| v.is_finite() && (0.0..=MAX_AMOUNT).contains(&v);
    if !fine(price.prompt_per_thousand) || !fine(price.completion_per_thousand) {
        return Err((
            FaultKind::BadOutput,
            format!(
                "meter quoted {} per 1,000 prompt and {} per 1,000 completion tokens",
                price.prompt_per_thousand, price.completion_per_thousand
            ),
        ));
    }
    Ok(Price {
        prompt_per_1k: price.prompt_per_thousand,
        completion_per_1k: price.completion_per_thousand,
    })
}

pub(super) fn check_awards(awards: Vec<Award>) -> Result<Vec<Award>, (FaultKind, String)> {
    if awards.len() > MAX_AWARDS {
        return Err((
            FaultKind::BadOutput,
            format!(
                "reward plugin granted {} awards (at most {MAX_AWARDS})",
                awards.len()
            ),
        ));
    }
    for award in &awards {
        if !award.points.is_finite() || award.points.abs() > MAX_AMOUNT {
            return Err((
                FaultKind::BadOutput,
                format!("reward plugin granted {} points", award.points),
            ));
        }
        if award.operator.is_empty() || award.operator.chars().count() > MAX_OPERATOR_CHARS {
            return Err((
                FaultKind::BadOutput,
                "reward plugin named an empty or overlong operator".into(),
            ));
        }
    }
    Ok(awards
        .into_iter()
        .map(|mut award| {
            award.reason = cut(&award.reason, MAX_REASON_CHARS);
            award
        })
        .collect())
}

pub(super) fn unexpected(answer: &Answer) -> (FaultKind, String) {
    (
        FaultKind::Host,
        format!("internal: unexpected answer {answer:?}"),
    )
}

pub(super) fn version_id(slot: Slot, sha256: &str) -> String {
    format!("{slot}:{sha256}")
}

pub(super) fn short(sha256: &str) -> &str {
    &sha256[..sha256.len().min(12)]
}

pub(super) fn cut(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

pub(super) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn store_json(err: serde_json::Error) -> PluginError {
    PluginError::Store(crate::store::StoreError::Corrupt(err.to_string()))
}
