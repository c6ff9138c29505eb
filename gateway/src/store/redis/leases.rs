//! Local quota leases for windowed counters, so that a busy rate limit does not cost a Redis
//! round trip per request (the way Envoy's and Doorman's global limiters hand out quota).
//!
//! `kv_reserve` on a counter with a TTL (a rate limit's window) may take a *slice* from Redis:
//! one script adds what the call needs plus a little more to the counter, atomically and only
//! within the limit, and the replica spends the rest locally, call by call, without asking
//! Redis again. The counter in Redis therefore counts every unit handed out plus the unspent
//! slices replicas hold, so **the units reserved across replicas never pass the limit**. What
//! a replica does not spend goes back to the counter once it stops asking ([`LEASE_IDLE`]), or
//! expires with the window.
//!
//! The price of that exactness: a replica may be refused while another still holds unspent
//! units, at most what that other replica takes in [`SLICE_TARGET`] at its recent rate, and
//! never more than [`SLICE_SHARE`] of what was left of the limit when it took the slice (so
//! the last units of a limit are taken one at a time); those units come back within
//! [`LEASE_IDLE`] plus [`SWEEP_EVERY`] of the holder going quiet.
//!
//! A slice is only taken where it cannot change an answer that matters: the counter has a TTL
//! (a window, which nothing resets but time), the amount is positive, and the limit is at least
//! [`MIN_LIMIT_PER_AMOUNT`] amounts (a flag reserved once, such as the meter's "charged" marker
//! with a limit of 1, or a limit of a few requests, stays exact per call). A key first seen, or
//! asked rarely, takes no more than it needs.
//!
//! Failures: a slice already taken is spent even while Redis is unreachable (its units were
//! counted before); past it the store's error reaches the plugin, and the limiter's fail-open or
//! fail-closed choice applies. An error drops every slice this replica holds (their units are
//! not returned: the window gives them back), so nothing taken before an outage is spent after
//! a server that came back may have lost its counters. A counter that another replica deletes
//! or sets (plugins' kv) is not seen here until the slice is spent or returned: only windowed
//! counters, which plugins do not reset, are leased.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a slice should last at the rate a key was recently reserved from: a key at 5,000
/// requests a second costs about 20 Redis round trips a second per replica, not 5,000, and the
/// units another replica may hold unspent stay small (50 ms of its traffic).
pub(super) const SLICE_TARGET: Duration = Duration::from_millis(50);
/// A slice is at most this share (1/N) of what is left of the limit after the call, so replicas
/// that take slices near the limit leave most of it to the others, and the last N units go
/// one at a time, exactly.
pub(super) const SLICE_SHARE: i64 = 16;
/// Leases only for limits of at least this many amounts. A smaller limit (60 requests a
/// minute, a one-off marker) is reserved exactly, per call: a burst that exhausts it within a
/// window gets exactly the limit, not a few units less while another replica holds a slice;
/// such a limit is reached within a second at the rates where a round trip per request costs.
pub(super) const MIN_LIMIT_PER_AMOUNT: i64 = 1024;
/// A slice not drawn from for this long goes back to the counter, so that another replica can
/// have it.
pub(super) const LEASE_IDLE: Duration = Duration::from_millis(200);
/// How often idle slices are looked for.
pub(super) const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// A slice whose counter expires sooner than this is not returned but left to expire with its
/// window: a return that reached Redis after the expiry would subtract from a new counter.
const RETURN_MARGIN: Duration = Duration::from_millis(500);
/// The rate is measured over at least this long, so that two calls a few microseconds apart do
/// not look like millions a second.
const MIN_RATE_SPAN: Duration = Duration::from_millis(1);
/// Lua's numbers are doubles: limits above this are reserved exactly, per call.
const MAX_LEASED_LIMIT: i64 = 1 << 52;

/// The slices this replica holds, by counter (its full Redis key name).
#[derive(Default)]
pub(super) struct Leases {
    slices: Mutex<HashMap<String, Slice>>,
}

/// A replica's slice of one counter.
struct Slice {
    /// The limit it was taken under; a call with another limit returns it first.
    limit: i64,
    /// Units taken from the counter and not yet handed out.
    unspent: i64,
    /// The counter's value in Redis after the latest grant, this slice included.
    counted: i64,
    /// The counter's expiry in Redis, at the earliest (measured from before the grant was
    /// asked for): past it the slice is void.
    expires: Instant,
    last_take: Instant,
    /// Units handed out since `rate_since`, for the next slice's size.
    taken: i64,
    rate_since: Instant,
    /// The largest slice Redis granted it: units given back (`kv_incr` below zero) join the
    /// slice only up to this, the rest go to the counter for every replica.
    largest: i64,
}

/// What a reservation does, after looking at the local slice.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Local {
    /// Served from the slice: the counter's value as this replica sees it.
    Taken(i64),
    /// Ask Redis: for `need` units (the amount less what the slice still had, now taken out of
    /// it), plus up to `extra` for the slice; `give_back` units of a slice taken under another
    /// limit go back first.
    Ask {
        need: i64,
        extra: i64,
        give_back: i64,
        /// What was taken out of the slice towards this call (put back if Redis refuses).
        from_slice: i64,
    },
}

/// Redis's answer to a slice request.
#[derive(Debug)]
pub(super) struct Grant {
    /// The counter after the grant (or, refused, as it is).
    pub value: i64,
    /// Units granted beyond the need (the new slice).
    pub extra: i64,
    /// The counter's TTL in milliseconds (negative: none).
    pub pttl_ms: i64,
}

impl Leases {
    /// Whether a reservation may be served from slices at all.
    pub(super) fn eligible(amount: i64, limit: i64, ttl: Option<Duration>) -> bool {
        ttl.is_some()
            && amount > 0
            && limit <= MAX_LEASED_LIMIT
            && limit / MIN_LIMIT_PER_AMOUNT >= amount
    }

    /// Serves `amount` from the slice of `key` if it holds enough, else says what to ask Redis.
    pub(super) fn take(&self, key: &str, amount: i64, limit: i64, now: Instant) -> Local {
        let mut slices = self.lock();
        let Some(slice) = slices.get_mut(key) else {
            return Local::Ask {
                need: amount,
                extra: 0,
                give_back: 0,
                from_slice: 0,
            };
        };
        if now >= slice.expires {
            // The window is over: its counter is gone, and so is the slice.
            slices.remove(key);
            return Local::Ask {
                need: amount,
                extra: 0,
                give_back: 0,
                from_slice: 0,
            };
        }
        if slice.limit != limit {
            // The limit changed (the key's metadata, say): the slice goes back, the call is
            // reserved afresh under the new limit.
            let give_back = std::mem::take(&mut slice.unspent);
            slice.limit = limit;
            return Local::Ask {
                need: amount,
                extra: 0,
                give_back,
                from_slice: 0,
            };
        }
        slice.last_take = now;
        if slice.unspent >= amount {
            slice.unspent -= amount;
            slice.taken += amount;
            return Local::Taken(slice.counted - slice.unspent);
        }
        // Not enough left: what is left goes towards this call, Redis gives the rest and a new
        // slice sized by the rate since the last one.
        let span = now.duration_since(slice.rate_since).max(MIN_RATE_SPAN);
        let per_target =
            (slice.taken + amount) as f64 * SLICE_TARGET.as_secs_f64() / span.as_secs_f64();
        slice.taken = 0;
        slice.rate_since = now;
        let from_slice = std::mem::take(&mut slice.unspent);
        Local::Ask {
            need: amount - from_slice,
            extra: per_target.min(limit as f64) as i64,
            give_back: 0,
            from_slice,
        }
    }

    /// Records Redis's grant for a call that asked at `asked_at` under `limit`; returns the
    /// counter's value as the call should see it.
    pub(super) fn granted(
        &self,
        key: &str,
        limit: i64,
        amount: i64,
        grant: &Grant,
        asked_at: Instant,
    ) -> i64 {
        let now = Instant::now();
        let mut slices = self.lock();
        // No TTL came back (the key lost it): nothing bounds a slice's life, so keep none.
        let Some(expires) = u64::try_from(grant.pttl_ms)
            .ok()
            .map(|ms| asked_at + Duration::from_millis(ms))
        else {
            slices.remove(key);
            return grant.value - grant.extra;
        };
        let slice = slices.entry(key.to_owned()).or_insert_with(|| Slice {
            limit,
            unspent: 0,
            counted: grant.value,
            expires,
            last_take: now,
            taken: 0,
            rate_since: asked_at,
            largest: 0,
        });
        if now >= slice.expires {
            // What the slice held belonged to a counter that has expired since.
            slice.unspent = 0;
            slice.counted = grant.value;
            slice.expires = expires;
        }
        // Grants of one counter name the same expiry, measured from slightly different
        // moments: the earliest is the safe one.
        slice.expires = slice.expires.min(expires);
        slice.limit = limit;
        slice.unspent += grant.extra;
        slice.largest = slice.largest.max(grant.extra);
        slice.counted = slice.counted.max(grant.value);
        slice.taken += amount;
        slice.last_take = now;
        grant.value - grant.extra
    }

    /// `kv_incr` of a counter this replica holds a live slice of: units given back (a settled
    /// request used fewer tokens than it reserved, a refused request's other counters) join
    /// the slice, up to the largest slice Redis granted it; units taken (it used more) come
    /// out of the slice if it holds them. Either way the counter in Redis already counts them,
    /// so no round trip is needed; `None` when Redis must be asked (no slice, or not enough in
    /// it, or a read: a delta of 0 answers what Redis holds).
    pub(super) fn adjust(&self, key: &str, delta: i64, now: Instant) -> Option<i64> {
        let mut slices = self.lock();
        let slice = slices.get_mut(key)?;
        if now >= slice.expires || delta == 0 {
            return None;
        }
        let unspent = slice.unspent.checked_sub(delta)?;
        if unspent < 0 || unspent > slice.largest {
            return None;
        }
        slice.unspent = unspent;
        slice.last_take = now;
        Some(slice.counted - slice.unspent)
    }

    /// Redis refused a call that had taken `from_slice` units out of the slice: they go back.
    pub(super) fn refused(&self, key: &str, from_slice: i64) {
        if from_slice == 0 {
            return;
        }
        if let Some(slice) = self.lock().get_mut(key) {
            slice.unspent += from_slice;
        }
    }

    /// Forgets the slice of a counter this replica set or deleted (its units are not returned:
    /// the counter they were taken from is gone).
    pub(super) fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Forgets every slice (after a store error).
    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    /// Removes the slices idle for [`LEASE_IDLE`] or past their window; returns those to give
    /// back to their counters (key, units).
    pub(super) fn sweep(&self, now: Instant) -> Vec<(String, i64)> {
        let mut returns = Vec::new();
        self.lock().retain(|key, slice| {
            if now >= slice.expires {
                return false;
            }
            if now.duration_since(slice.last_take) < LEASE_IDLE {
                return true;
            }
            if slice.unspent > 0 && slice.expires.duration_since(now) > RETURN_MARGIN {
                returns.push((key.clone(), slice.unspent));
            }
            false
        });
        returns
    }

    /// Units held unspent, all counters together.
    #[cfg(test)]
    pub(super) fn unspent(&self) -> i64 {
        self.lock().values().map(|slice| slice.unspent).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slice>> {
        // A panic while holding the lock leaves plain numbers behind, still consistent enough
        // to keep serving: every unit they count was granted by Redis.
        self.slices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(value: i64, extra: i64) -> Grant {
        Grant {
            value,
            extra,
            pttl_ms: 60_000,
        }
    }

    #[test]
    fn small_limits_flags_and_untimed_counters_are_not_leased() {
        let ttl = Some(Duration::from_secs(60));
        assert!(Leases::eligible(1, 1_024, ttl));
        assert!(Leases::eligible(500, 1_000_000, ttl));
        assert!(!Leases::eligible(1, 1, ttl), "a one-off marker");
        assert!(!Leases::eligible(1, 60, ttl), "60 requests a minute");
        assert!(!Leases::eligible(100, 3_000, ttl));
        assert!(!Leases::eligible(1, 1_000_000, None), "no window");
        assert!(!Leases::eligible(0, 1_000_000, ttl));
        assert!(!Leases::eligible(-1, 1_000_000, ttl));
        assert!(!Leases::eligible(1, i64::MAX, ttl));
    }

    #[test]
    fn a_first_call_takes_exactly_what_it_needs_then_slices_follow_the_rate() {
        let leases = Leases::default();
        let t0 = Instant::now();
        let first = leases.take("k", 1, 1_000_000, t0);
        assert_eq!(
            first,
            Local::Ask {
                need: 1,
                extra: 0,
                give_back: 0,
                from_slice: 0
            }
        );
        assert_eq!(leases.granted("k", 1_000_000, 1, &grant(1, 0), t0), 1);
        // A second unit 1 ms later: 2 units a millisecond, 100 per 50 ms.
        let Local::Ask { need, extra, .. } =
            leases.take("k", 1, 1_000_000, t0 + Duration::from_millis(1))
        else {
            panic!("the slice was empty");
        };
        assert_eq!((need, extra), (1, 100));
        assert_eq!(leases.granted("k", 1_000_000, 1, &grant(102, 100), t0), 2);
        for n in 0..100 {
            assert_eq!(
                leases.take("k", 1, 1_000_000, t0 + Duration::from_millis(2)),
                Local::Taken(3 + n)
            );
        }
        assert_eq!(leases.unspent(), 0);
        assert!(matches!(
            leases.take("k", 1, 1_000_000, t0 + Duration::from_millis(2)),
            Local::Ask { need: 1, .. }
        ));
    }

    #[test]
    fn a_slice_too_small_for_a_call_goes_towards_it_and_back_if_refused() {
        let leases = Leases::default();
        let t0 = Instant::now();
        leases.granted("k", 10_000, 10, &grant(110, 100), t0);
        assert_eq!(leases.take("k", 60, 10_000, t0), Local::Taken(70));
        let ask = leases.take("k", 60, 10_000, t0);
        let Local::Ask {
            need, from_slice, ..
        } = ask
        else {
            panic!("40 units cannot serve 60");
        };
        assert_eq!((need, from_slice), (20, 40));
        leases.refused("k", from_slice);
        assert_eq!(leases.unspent(), 40);
    }

    #[test]
    fn units_given_back_join_the_slice_up_to_its_size_and_units_taken_come_out_of_it() {
        let leases = Leases::default();
        let t0 = Instant::now();
        assert_eq!(leases.adjust("k", -5, t0), None, "no slice: Redis");
        leases.granted("k", 100_000, 10, &grant(110, 100), t0);
        assert_eq!(leases.take("k", 60, 100_000, t0), Local::Taken(70));
        // 40 unspent; 50 of the 60 were not used.
        assert_eq!(leases.adjust("k", -50, t0), Some(20));
        assert_eq!(leases.unspent(), 90);
        assert_eq!(leases.adjust("k", -11, t0), None, "past the largest slice");
        assert_eq!(leases.adjust("k", 0, t0), None, "a read asks Redis");
        assert_eq!(leases.adjust("k", 30, t0), Some(50));
        assert_eq!(
            leases.adjust("k", 61, t0),
            None,
            "more than the slice holds"
        );
        let after_window = t0 + Duration::from_secs(61);
        assert_eq!(leases.adjust("k", -1, after_window), None);
    }

    #[test]
    fn another_limit_gives_the_slice_back_first() {
        let leases = Leases::default();
        let t0 = Instant::now();
        leases.granted("k", 10_000, 1, &grant(101, 100), t0);
        assert_eq!(
            leases.take("k", 1, 5_000, t0),
            Local::Ask {
                need: 1,
                extra: 0,
                give_back: 100,
                from_slice: 0
            }
        );
    }

    #[test]
    fn idle_slices_are_returned_and_expired_ones_dropped() {
        let leases = Leases::default();
        let t0 = Instant::now();
        leases.granted("busy", 10_000, 1, &grant(11, 10), t0);
        leases.granted("idle", 10_000, 1, &grant(11, 10), t0);
        let short = Grant {
            value: 11,
            extra: 10,
            pttl_ms: 100,
        };
        leases.granted("ending", 10_000, 1, &short, t0);
        let later = t0 + LEASE_IDLE + Duration::from_millis(1);
        assert!(matches!(
            leases.take("busy", 1, 10_000, later),
            Local::Taken(_)
        ));
        let returns = leases.sweep(later);
        assert_eq!(returns, vec![("idle".to_owned(), 10)]);
        assert_eq!(leases.unspent(), 9);
        // Past its window a slice is void, and a call asks Redis afresh.
        let after_window = t0 + Duration::from_secs(61);
        assert!(matches!(
            leases.take("busy", 1, 10_000, after_window),
            Local::Ask {
                give_back: 0,
                from_slice: 0,
                ..
            }
        ));
        assert_eq!(leases.unspent(), 0);
    }
}
