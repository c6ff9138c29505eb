//! Budget alerts of keys: a charge whose key's spend passes a share of one of its budgets
//! (`usage.budget_alert_thresholds`, 50, 80 and 100 percent by default) becomes a
//! `budget.threshold` event for the webhooks that take it.
//!
//! The meter reports each budget and its spend after the charge (`garage:policy@0.5.0`'s
//! `budget-use`); the spend before it is that less the charge. An event delivered again is
//! charged nothing more but reports the same crossing, which makes the same event (its id is
//! the key, the period's start and the threshold), and the webhooks send each id once.

use crate::plugins::{BudgetPeriod, BudgetUse};
use crate::webhooks::BudgetThreshold;

/// The thresholds `budgets` crossed with a charge of `credits` to `key_id`, in percent of each
/// budget, lowest first.
pub fn crossings(
    key_id: &str,
    credits: f64,
    budgets: &[BudgetUse],
    thresholds: &[u32],
) -> Vec<BudgetThreshold> {
    let mut crossed = Vec::new();
    for budget in budgets {
        if !(budget.limit > 0.0 && budget.spent.is_finite() && credits.is_finite()) {
            continue;
        }
        let before = (budget.spent - credits).max(0.0);
        for &percent in thresholds {
            let mark = budget.limit * f64::from(percent) / 100.0;
            if before < mark && budget.spent >= mark {
                crossed.push(BudgetThreshold {
                    scope: "key".into(),
                    scope_id: key_id.to_owned(),
                    period: period_name(budget.period).into(),
                    period_start_ms: budget.starts_at_ms.unwrap_or(0),
                    resets_at_ms: budget.resets_at_ms,
                    threshold_percent: percent,
                    spent: budget.spent,
                    budget: budget.limit,
                });
            }
        }
    }
    crossed
}

fn period_name(period: BudgetPeriod) -> &'static str {
    match period {
        BudgetPeriod::Lifetime => "lifetime",
        BudgetPeriod::Day => "day",
        BudgetPeriod::Week => "week",
        BudgetPeriod::Month => "month",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(spent: f64, limit: f64) -> BudgetUse {
        BudgetUse {
            period: BudgetPeriod::Day,
            spent,
            limit,
            starts_at_ms: Some(1_000),
            resets_at_ms: Some(2_000),
        }
    }

    #[test]
    fn a_charge_that_passes_thresholds_crosses_each_once() {
        let thresholds = [50, 80, 100];
        // 4 → 9 of 10: past 50 and 80 in one charge.
        let crossed = crossings("k", 5.0, &[day(9.0, 10.0)], &thresholds);
        let percents: Vec<u32> = crossed.iter().map(|c| c.threshold_percent).collect();
        assert_eq!(percents, [50, 80]);
        assert_eq!(crossed[0].event_id(), "budget:key:k:day:1000:50");
        assert_eq!((crossed[1].spent, crossed[1].budget), (9.0, 10.0));
        // Exactly at a mark counts; the next charge under the next mark crosses nothing.
        assert_eq!(
            crossings("k", 1.0, &[day(10.0, 10.0)], &thresholds).len(),
            1
        );
        assert!(crossings("k", 0.5, &[day(9.5, 10.0)], &thresholds).is_empty());
        // A lifetime budget has no period start.
        let lifetime = BudgetUse {
            period: BudgetPeriod::Lifetime,
            starts_at_ms: None,
            resets_at_ms: None,
            ..day(6.0, 10.0)
        };
        let crossed = crossings("k", 2.0, &[lifetime], &thresholds);
        assert_eq!(crossed[0].event_id(), "budget:key:k:lifetime:0:50");
    }

    #[test]
    fn nonsense_budgets_cross_nothing() {
        for budget in [day(5.0, 0.0), day(f64::NAN, 10.0), day(f64::INFINITY, 10.0)] {
            assert!(
                crossings("k", 5.0, &[budget], &[50]).is_empty(),
                "{budget:?}"
            );
        }
        assert!(crossings("k", f64::NAN, &[day(9.0, 10.0)], &[50]).is_empty());
    }
}
