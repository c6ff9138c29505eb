//! `[accounts]` in the config.

use serde::{Deserialize, Serialize};

/// `[accounts]` in the config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsConfig {
    /// The zone accounts' budget periods are counted in, in minutes east of UTC (UTC+2 is 120,
    /// UTC-5 is -300): a day ends at local midnight, a week on Monday, a month on the 1st.
    pub utc_offset_minutes: i32,
    /// Completion tokens held for a request that sets no `max_tokens`. Such a request can cost
    /// more than its hold; with `max_tokens` it cannot (see docs/money.md).
    pub default_completion_tokens: u32,
    /// How long a hold lasts when its request never ends (a replica died mid-request): then
    /// its money is available again. Longer than the longest stream plus the usage ledger's
    /// delay, or a long request's hold runs out before it is charged.
    pub hold_secs: u64,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        AccountsConfig {
            utc_offset_minutes: 0,
            default_completion_tokens: 1024,
            hold_secs: 3600,
        }
    }
}

/// The widest offsets of real zones: UTC-12 to UTC+14.
const UTC_OFFSETS: std::ops::RangeInclusive<i32> = -720..=840;

impl AccountsConfig {
    /// What is wrong with the section, if anything (the config's validation says it).
    pub fn problem(&self) -> Option<String> {
        if !UTC_OFFSETS.contains(&self.utc_offset_minutes) {
            return Some(format!(
                "accounts.utc_offset_minutes = {}: expected minutes east of UTC, from -720 \
                 (UTC-12) to 840 (UTC+14)",
                self.utc_offset_minutes
            ));
        }
        if self.hold_secs == 0 {
            return Some(
                "accounts.hold_secs = 0: a hold must last at least as long as its request".into(),
            );
        }
        None
    }
}
