//! Market prices: a multiplier on the table's price that follows how busy a model's rigs are,
//! damped so that prices do not flap (see the crate docs).

use garage_plugin_sdk::{Host, Market};
use serde::Deserialize;

/// The `market` section of the meter's configuration.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MarketConfig {
    /// The multiplier at load 0.
    min_multiplier: f64,
    /// The multiplier at load 1.
    max_multiplier: f64,
    /// The load at which the multiplier is 1.
    target_utilization: f64,
    /// Request slots a rig is taken to have, to turn requests in flight into a load.
    slots_per_rig: u32,
    /// How often the multiplier may move, milliseconds.
    interval_ms: u64,
    /// How much of the way to its target the multiplier moves each time, 0 to 1.
    smoothing: f64,
}

impl Default for MarketConfig {
    fn default() -> Self {
        MarketConfig {
            min_multiplier: 0.5,
            max_multiplier: 3.0,
            target_utilization: 0.6,
            slots_per_rig: 8,
            interval_ms: 10_000,
            smoothing: 0.3,
        }
    }
}

/// The multiplier a model's price had when it last moved, and when (the plugin's state).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Kept {
    multiplier: f64,
    at_ms: u64,
}

impl Kept {
    fn encode(self) -> Vec<u8> {
        format!("{}:{}", self.multiplier, self.at_ms).into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Kept> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (multiplier, at_ms) = text.split_once(':')?;
        let kept = Kept {
            multiplier: multiplier.parse().ok()?,
            at_ms: at_ms.parse().ok()?,
        };
        kept.multiplier.is_finite().then_some(kept)
    }
}

impl MarketConfig {
    pub fn validate(&self) -> Result<(), String> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.min_multiplier)
            || !positive(self.max_multiplier)
            || self.min_multiplier > 1.0
            || self.max_multiplier < 1.0
        {
            return Err(
                "market: min_multiplier must be within 0 and 1, max_multiplier at least 1".into(),
            );
        }
        if !(self.target_utilization > 0.0 && self.target_utilization < 1.0) {
            return Err("market: target_utilization must be between 0 and 1".into());
        }
        if !(0.0..=1.0).contains(&self.smoothing) || self.slots_per_rig == 0 {
            return Err(
                "market: smoothing must be within 0 and 1, slots_per_rig at least 1".into(),
            );
        }
        Ok(())
    }

    /// How busy the model's rigs are, 0 to 1: 1 when none serves it.
    fn load(&self, market: &Market) -> f64 {
        if market.rigs == 0 {
            return 1.0;
        }
        let slots = f64::from(market.rigs) * f64::from(self.slots_per_rig);
        let in_flight = f64::from(market.in_flight) / slots;
        market.utilization.max(in_flight).clamp(0.0, 1.0)
    }

    /// The multiplier the load calls for: `min` at 0, 1 at the target, `max` at 1.
    fn target(&self, load: f64) -> f64 {
        let t = self.target_utilization;
        if load <= t {
            self.min_multiplier + (1.0 - self.min_multiplier) * load / t
        } else {
            1.0 + (self.max_multiplier - 1.0) * (load - t) / (1.0 - t)
        }
    }

    /// The multiplier of `model`'s price now: the kept one while its interval runs, else moved
    /// towards the market's target (and kept). Without a market (outside a quote) the kept one,
    /// or 1.
    pub fn multiplier(&self, host: &dyn Host, model: &str) -> f64 {
        let key = format!("market:{model}");
        let kept = host.kv_get(&key).and_then(|bytes| Kept::decode(&bytes));
        let now = host.now_ms();
        if let Some(kept) = kept
            && now.saturating_sub(kept.at_ms) < self.interval_ms
        {
            return kept.multiplier;
        }
        let Some(market) = host.market(model) else {
            return kept.map_or(1.0, |k| k.multiplier);
        };
        let target = self.target(self.load(&market));
        let from = kept.map_or(1.0, |k| k.multiplier);
        let moved = (from + self.smoothing * (target - from))
            .clamp(self.min_multiplier, self.max_multiplier);
        host.kv_set(
            &key,
            &Kept {
                multiplier: moved,
                at_ms: now,
            }
            .encode(),
            None,
        );
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use garage_plugin_sdk::testing::MemoryHost;

    fn market(rigs: u32, utilization: f64, in_flight: u32) -> Market {
        Market {
            model: "m".into(),
            rigs,
            utilization,
            in_flight,
            ..Market::default()
        }
    }

    fn undamped() -> MarketConfig {
        MarketConfig {
            interval_ms: 0,
            smoothing: 1.0,
            ..MarketConfig::default()
        }
    }

    #[test]
    fn the_target_runs_from_min_through_one_at_the_target_load_to_max() {
        let c = MarketConfig::default();
        assert_eq!(c.target(0.0), 0.5);
        assert_eq!(c.target(0.6), 1.0);
        assert_eq!(c.target(1.0), 3.0);
        assert!((c.target(0.8) - 2.0).abs() < 1e-9);
        // No rig: as busy as can be; requests in flight count against the slots.
        assert_eq!(c.load(&market(0, 0.0, 0)), 1.0);
        assert_eq!(c.load(&market(2, 0.1, 8)), 0.5);
        assert_eq!(c.load(&market(1, 0.9, 0)), 0.9);
    }

    #[test]
    fn undamped_the_multiplier_follows_the_market() {
        let host = MemoryHost::new();
        let c = undamped();
        host.set_market(market(1, 0.0, 0));
        assert_eq!(c.multiplier(&host, "m"), 0.5);
        host.set_market(market(1, 1.0, 0));
        host.set_now_ms(host.now_ms() + 1);
        assert_eq!(c.multiplier(&host, "m"), 3.0);
    }

    #[test]
    fn damped_the_multiplier_moves_once_per_interval_and_part_of_the_way() {
        let host = MemoryHost::new();
        let c = MarketConfig::default();
        host.set_market(market(1, 1.0, 0));
        // From 1 towards 3 by 0.3 of the way.
        let first = c.multiplier(&host, "m");
        assert!((first - 1.6).abs() < 1e-9, "{first}");
        // Within the interval: unchanged, however the market swings.
        host.set_market(market(1, 0.0, 0));
        host.set_now_ms(host.now_ms() + 9_999);
        assert_eq!(c.multiplier(&host, "m"), first);
        // The next interval: 0.3 of the way from 1.6 towards 0.5.
        host.set_now_ms(host.now_ms() + 1);
        let second = c.multiplier(&host, "m");
        assert!((second - (1.6 - 0.3 * 1.1)).abs() < 1e-9, "{second}");
        // A steady market converges and stays within the bounds.
        for _ in 0..100 {
            host.set_now_ms(host.now_ms() + 10_000);
            c.multiplier(&host, "m");
        }
        assert!((c.multiplier(&host, "m") - 0.5).abs() < 1e-6);
    }

    #[test]
    fn bad_market_config_is_refused() {
        for bad in [
            MarketConfig {
                min_multiplier: 1.5,
                ..MarketConfig::default()
            },
            MarketConfig {
                max_multiplier: f64::NAN,
                ..MarketConfig::default()
            },
            MarketConfig {
                target_utilization: 1.0,
                ..MarketConfig::default()
            },
            MarketConfig {
                smoothing: 2.0,
                ..MarketConfig::default()
            },
            MarketConfig {
                slots_per_rig: 0,
                ..MarketConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        // Garbage in the state reads as no state.
        assert_eq!(Kept::decode(b"NaN:5"), None);
        assert_eq!(Kept::decode(b"oops"), None);
    }
}
