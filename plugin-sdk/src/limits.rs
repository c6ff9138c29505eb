//! Rate-limit arithmetic: fixed windows (atomic across replicas with [`Host::kv_reserve`]) and
//! token buckets (smoother, but read-modify-write).
//!
//! [`Host::kv_reserve`]: crate::Host::kv_reserve

/// Fixed windows of `length_ms`, aligned on the epoch: every replica agrees on the current
/// window without talking to the others.
///
/// Paired with [`Host::kv_reserve`](crate::Host::kv_reserve) on a key named after the window,
/// a limit holds exactly across concurrent requests and replicas; the price is that a client
/// can send up to twice the limit around a window boundary.
///
/// ```
/// use garage_plugin_sdk::{Host, limits::FixedWindow, testing::MemoryHost};
///
/// let minute = FixedWindow::new(60_000);
/// let host = MemoryHost::new();
/// let window = minute.at(host.now_ms());
/// let key = window.key("rpm:key-1");
/// // 3 requests per minute: the fourth is refused until the window ends.
/// for _ in 0..3 {
///     assert!(host.kv_reserve(&key, 1, 3, Some(window.reset_ms)).is_some());
/// }
/// assert!(host.kv_reserve(&key, 1, 3, Some(window.reset_ms)).is_none());
///
/// host.advance_ms(window.reset_ms);
/// let next = minute.at(host.now_ms());
/// assert_eq!(next.index, window.index + 1);
/// assert!(host.kv_reserve(&next.key("rpm:key-1"), 1, 3, Some(next.reset_ms)).is_some());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedWindow {
    length_ms: u64,
}

/// The window a moment falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Windows since the epoch.
    pub index: u64,
    /// When the window started, milliseconds since the epoch.
    pub started_at_ms: u64,
    /// Milliseconds from the moment to the end of the window (at least 1): the `reset` of a
    /// limit, the `retry-after` of a refusal, and the TTL of the window's counter.
    pub reset_ms: u64,
}

impl FixedWindow {
    /// Windows of `length_ms` milliseconds (at least 1).
    pub const fn new(length_ms: u64) -> Self {
        Self {
            length_ms: if length_ms == 0 { 1 } else { length_ms },
        }
    }

    /// The window length, milliseconds.
    pub const fn length_ms(&self) -> u64 {
        self.length_ms
    }

    /// The window `now_ms` falls in.
    pub const fn at(&self, now_ms: u64) -> Window {
        let index = now_ms / self.length_ms;
        let started_at_ms = index * self.length_ms;
        Window {
            index,
            started_at_ms,
            reset_ms: started_at_ms + self.length_ms - now_ms,
        }
    }
}

impl Window {
    /// The name of this window's counter: `prefix:index`.
    pub fn key(&self, prefix: &str) -> String {
        format!("{prefix}:{}", self.index)
    }
}

/// A token bucket: up to `capacity` tokens, refilled continuously at `refill_per_ms`.
///
/// The arithmetic is pure; the state lives wherever the plugin keeps it (see
/// [`BucketState::encode`]). Kept in the gateway's key-value store, a get-then-set is not
/// atomic across replicas, so concurrent requests may overdraw a bucket a little; use a
/// [`FixedWindow`] with `kv_reserve` where a limit must hold exactly.
///
/// ```
/// use garage_plugin_sdk::limits::TokenBucket;
///
/// let bucket = TokenBucket::per_minute(60); // 60 tokens, one more every second
/// let state = bucket.full(0);
/// let state = bucket.take(state, 60.0, 0).unwrap();
/// assert_eq!(bucket.take(state, 1.0, 0), Err(1_000), "empty: the next token in 1 s");
/// let state = bucket.take(state, 1.0, 1_000).unwrap();
/// assert_eq!(bucket.ms_until_full(state, 1_000), 60_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    /// Most tokens the bucket holds (the burst).
    pub capacity: f64,
    /// Tokens added per millisecond.
    pub refill_per_ms: f64,
}

/// A bucket's tokens at a moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    /// Tokens in the bucket at `updated_ms`.
    pub tokens: f64,
    /// When `tokens` was computed, milliseconds since the epoch.
    pub updated_ms: u64,
}

impl TokenBucket {
    /// `limit` tokens per minute, with a burst of `limit`.
    pub fn per_minute(limit: u64) -> Self {
        Self {
            capacity: limit as f64,
            refill_per_ms: limit as f64 / 60_000.0,
        }
    }

    /// A full bucket at `now_ms`.
    pub fn full(&self, now_ms: u64) -> BucketState {
        BucketState {
            tokens: self.capacity,
            updated_ms: now_ms,
        }
    }

    /// The state at `now_ms`, with what refilled since `state` (a clock going backwards adds
    /// nothing).
    pub fn refill(&self, state: BucketState, now_ms: u64) -> BucketState {
        let elapsed = now_ms.saturating_sub(state.updated_ms) as f64;
        BucketState {
            tokens: (state.tokens + elapsed * self.refill_per_ms).min(self.capacity),
            updated_ms: now_ms.max(state.updated_ms),
        }
    }

    /// Takes `amount` tokens at `now_ms`, or says how many milliseconds until there are enough
    /// (`u64::MAX` when there never will be: more than the capacity, or no refill).
    pub fn take(&self, state: BucketState, amount: f64, now_ms: u64) -> Result<BucketState, u64> {
        let state = self.refill(state, now_ms);
        if state.tokens >= amount {
            Ok(BucketState {
                tokens: state.tokens - amount,
                ..state
            })
        } else {
            Err(self.ms_until(state.tokens, amount))
        }
    }

    /// Milliseconds until the bucket is full again.
    pub fn ms_until_full(&self, state: BucketState, now_ms: u64) -> u64 {
        let state = self.refill(state, now_ms);
        self.ms_until(state.tokens, self.capacity)
    }

    fn ms_until(&self, tokens: f64, wanted: f64) -> u64 {
        if tokens >= wanted {
            0
        } else if wanted > self.capacity || self.refill_per_ms <= 0.0 {
            u64::MAX
        } else {
            // Rounded up: retrying a millisecond early would be refused again.
            ((wanted - tokens) / self.refill_per_ms).ceil() as u64
        }
    }
}

impl BucketState {
    /// Compact text for the key-value store: `tokens@updated_ms`.
    ///
    /// ```
    /// use garage_plugin_sdk::limits::BucketState;
    ///
    /// let state = BucketState { tokens: 2.5, updated_ms: 1_000 };
    /// assert_eq!(BucketState::decode(&state.encode()), Some(state));
    /// assert_eq!(BucketState::decode(b"garbage"), None);
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        format!("{}@{}", self.tokens, self.updated_ms).into_bytes()
    }

    /// Reads what [`encode`](Self::encode) wrote; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (tokens, updated_ms) = text.split_once('@')?;
        Some(Self {
            tokens: tokens.parse().ok()?,
            updated_ms: updated_ms.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_align_on_the_epoch() {
        let w = FixedWindow::new(60_000).at(125_000);
        assert_eq!(w.index, 2);
        assert_eq!(w.started_at_ms, 120_000);
        assert_eq!(w.reset_ms, 55_000);
        assert_eq!(FixedWindow::new(60_000).at(120_000).reset_ms, 60_000);
        assert_eq!(FixedWindow::new(0).length_ms(), 1);
    }

    #[test]
    fn buckets_refill_up_to_capacity_and_never_backwards() {
        let bucket = TokenBucket::per_minute(600); // 10 per second
        let empty = BucketState {
            tokens: 0.0,
            updated_ms: 10_000,
        };
        assert_eq!(bucket.refill(empty, 10_500).tokens, 5.0);
        assert_eq!(bucket.refill(empty, 1_000_000).tokens, 600.0);
        assert_eq!(bucket.refill(empty, 0), empty);
        assert_eq!(bucket.take(empty, 601.0, 10_000), Err(u64::MAX));
        assert_eq!(bucket.take(empty, 1.5, 10_000), Err(150));
    }
}
