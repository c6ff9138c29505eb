//! A rate limiter's promises that a key's requests for a model need not ask
//! (`garage:policy@0.7.0`'s `admitted.unlimited-ms`), kept per loaded version: a swap or a new
//! configuration loads a new version, which starts with none.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use foldhash::quality::RandomState;

use crate::plugins::types::{Admission, Decision, RateLimitHeaders};

/// The longest a promise is kept, whatever the limiter said.
pub const MAX_PROMISE: Duration = Duration::from_secs(60);
/// Promises one version keeps at most (key, model and metadata each); past it, expired ones
/// are dropped and, if none was, a new promise is not kept (its key's requests keep asking).
const MAX_PROMISES: usize = 16_384;

/// Who a promise is about: the admission's key and model, and a hash of the key's metadata
/// (which can be large), as the limiter saw them.
struct Promise {
    key_id: String,
    model: String,
    metadata: u64,
    until: Instant,
}

impl Promise {
    fn is_for(&self, admission: &Admission, metadata: u64) -> bool {
        self.key_id == admission.key_id
            && self.model == admission.model
            && self.metadata == metadata
    }
}

/// One version's promises, by a hash of what they are about (the key and model checked in
/// full on a hit, so a collision of that hash only costs a call). The hashes are seeded per
/// version: the model is the client's to name.
#[derive(Default)]
pub(crate) struct Unlimited {
    seed: RandomState,
    promises: Mutex<HashMap<u64, Promise, RandomState>>,
}

impl Unlimited {
    /// Whether a promise covers `admission` at `now`: the gateway may allow it without a call.
    pub fn covers(&self, admission: &Admission, now: Instant) -> bool {
        let (about, metadata) = self.about(admission);
        let promises = self.lock();
        promises
            .get(&about)
            .is_some_and(|promise| promise.until > now && promise.is_for(admission, metadata))
    }

    /// Keeps what the limiter answered `admission`, if it is a promise the gateway honours: an
    /// allow that needs no settle, reports no headers, and promises a time (kept at most
    /// [`MAX_PROMISE`]). Anything else answered for the same admission ends an earlier promise.
    pub fn remember(
        &self,
        admission: &Admission,
        decision: &Decision,
        settle: bool,
        unlimited_ms: u32,
        now: Instant,
    ) {
        let honoured =
            unlimited_ms > 0 && decision.allow && !settle && reports_none(&decision.headers);
        let (about, metadata) = self.about(admission);
        let mut promises = self.lock();
        if !honoured {
            promises.remove(&about);
            return;
        }
        if promises.len() >= MAX_PROMISES && !promises.contains_key(&about) {
            promises.retain(|_, promise| promise.until > now);
            if promises.len() >= MAX_PROMISES {
                return;
            }
        }
        let kept = Duration::from_millis(u64::from(unlimited_ms)).min(MAX_PROMISE);
        promises.insert(
            about,
            Promise {
                key_id: admission.key_id.clone(),
                model: admission.model.clone(),
                metadata,
                until: now + kept,
            },
        );
    }

    /// The hash of what `admission` is about, and the hash of its key's metadata (part of it).
    fn about(&self, admission: &Admission) -> (u64, u64) {
        let metadata = self.seed.hash_one(&admission.key_metadata);
        let about = self
            .seed
            .hash_one((&admission.key_id, &admission.model, metadata));
        (about, metadata)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Promise, RandomState>> {
        self.promises.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

fn reports_none(h: &RateLimitHeaders) -> bool {
    [
        h.limit_requests,
        h.remaining_requests,
        h.reset_requests_ms,
        h.limit_tokens,
        h.remaining_tokens,
        h.reset_tokens_ms,
    ]
    .iter()
    .all(Option::is_none)
}

/// What the gateway answers for an admission a promise covers: an allow with no headers.
pub fn promised_decision() -> Decision {
    Decision {
        allow: true,
        retry_after_ms: 0,
        reason: String::new(),
        headers: super::no_headers(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(key: &str, model: &str, metadata: &str) -> Admission {
        Admission {
            request_id: "req".into(),
            key_id: key.into(),
            model: model.into(),
            reserved_tokens: 100,
            key_metadata: metadata.into(),
        }
    }

    const MS: u32 = 10_000;

    #[test]
    fn a_promise_covers_the_same_key_model_and_metadata_until_it_ends() {
        let kept = Unlimited::default();
        let now = Instant::now();
        let a = admission("k1", "m", "{}");
        kept.remember(&a, &promised_decision(), false, MS, now);
        assert!(kept.covers(&a, now));
        assert!(kept.covers(
            &Admission {
                request_id: "other".into(),
                reserved_tokens: 9_999,
                ..a.clone()
            },
            now
        ));
        assert!(kept.covers(&a, now + Duration::from_millis(u64::from(MS) - 1)));
        assert!(
            !kept.covers(&a, now + Duration::from_millis(u64::from(MS))),
            "ended"
        );
        assert!(
            !kept.covers(&admission("k2", "m", "{}"), now),
            "another key"
        );
        assert!(
            !kept.covers(&admission("k1", "m2", "{}"), now),
            "another model"
        );
        assert!(
            !kept.covers(&admission("k1", "m", r#"{"rpm":1}"#), now),
            "new metadata"
        );
    }

    #[test]
    fn only_an_allow_without_settle_or_headers_is_a_promise() {
        let now = Instant::now();
        let a = admission("k", "m", "{}");
        let deny = Decision {
            allow: false,
            retry_after_ms: 1_000,
            ..promised_decision()
        };
        let with_headers = {
            let mut d = promised_decision();
            d.headers.remaining_requests = Some(5);
            d
        };
        for (decision, settle, ms, what) in [
            (&deny, false, MS, "a denial"),
            (&promised_decision(), true, MS, "an allow to settle"),
            (&with_headers, false, MS, "an allow with headers"),
            (&promised_decision(), false, 0, "no time promised"),
        ] {
            let kept = Unlimited::default();
            kept.remember(&a, decision, settle, ms, now);
            assert!(!kept.covers(&a, now), "{what} was kept as a promise");
        }
    }

    #[test]
    fn a_promise_lasts_at_most_a_minute_and_a_later_answer_ends_it() {
        let kept = Unlimited::default();
        let now = Instant::now();
        let a = admission("k", "m", "{}");
        kept.remember(&a, &promised_decision(), false, u32::MAX, now);
        assert!(kept.covers(&a, now + MAX_PROMISE - Duration::from_millis(1)));
        assert!(!kept.covers(&a, now + MAX_PROMISE));
        // The same admission answered without a promise (a limit was set meanwhile, seen by a
        // call that raced the promise): the promise is gone.
        kept.remember(&a, &promised_decision(), true, 0, now);
        assert!(!kept.covers(&a, now));
    }

    #[test]
    fn promises_are_bounded_expired_ones_make_room() {
        let kept = Unlimited::default();
        let now = Instant::now();
        for i in 0..MAX_PROMISES {
            kept.remember(
                &admission(&format!("k{i}"), "m", "{}"),
                &promised_decision(),
                false,
                1,
                now,
            );
        }
        let late = admission("late", "m", "{}");
        kept.remember(&late, &promised_decision(), false, MS, now);
        assert!(!kept.covers(&late, now), "full of live promises: not kept");
        assert_eq!(kept.len(), MAX_PROMISES);
        let later = now + Duration::from_millis(2);
        kept.remember(&late, &promised_decision(), false, MS, later);
        assert!(kept.covers(&late, later), "the expired ones made room");
        assert_eq!(kept.len(), 1);
    }
}
