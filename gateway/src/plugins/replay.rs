//! Replay and shadow: what a candidate policy would have decided, before it counts.
//!
//! Each slot keeps a bounded ring of its recent calls ([`Recorder`]): the WIT input records of
//! the call and the decision the gateway acted on. `POST /admin/plugins/{slot}/replay` runs a
//! candidate and the active version over that window, each from an empty scratch key-value
//! store with the clock set to each call's recorded time, and a [`DiffTally`] compares them.
//! A shadow runs a candidate beside the active version on live calls, off the request path,
//! and tallies its decisions against the live ones the same way.
//!
//! What a record keeps is what the contract's records carry, and no prompt text: the router's
//! request facts (model, key id, a hash of the prompt prefix, token counts, whether streamed)
//! and its candidates (numbers, ids, rigs, operators, labels); the limiter's admission (request
//! and key ids, model, reserved tokens, the key's metadata as the admin set it) and settlement;
//! the meter's and reward's usage events (ids, token counts, times). The ring lives in this
//! replica's memory only.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Slot;
use super::bindings::RouteInput;
use super::types::{Admission, Settlement, UsageEvent};

/// Most calls a replay may take from the ring (and most a ring may keep).
pub const MAX_RECORDED: usize = 10_000;
/// Calls a replay takes when it is not told how many.
pub const DEFAULT_REPLAY_LIMIT: usize = 1000;
/// Moves and examples a router diff lists; the counts cover every call.
const MAX_LISTED: usize = 20;

/// The input of one recorded call.
#[derive(Debug, Clone)]
pub(crate) enum Input {
    /// The call's own input, shared with it.
    Route(Arc<RouteInput>),
    Admit(Admission),
    Settle(Settlement),
    /// A usage event, for a meter's `charge` or a reward's `on-usage`.
    Usage(UsageEvent),
}

/// What a version decided for one call; `None` inside: it faulted (the slot's fallback
/// decided).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// The first choice's index among the candidates.
    Route(Option<u32>),
    /// Whether the request may go.
    Admit(Option<bool>),
    Settled,
    /// Credits charged.
    Charge(Option<f64>),
    /// Points per operator.
    Awards(Option<Vec<(String, f64)>>),
}

impl Outcome {
    pub fn faulted(&self) -> bool {
        matches!(
            self,
            Outcome::Route(None)
                | Outcome::Admit(None)
                | Outcome::Charge(None)
                | Outcome::Awards(None)
        )
    }
}

/// One recorded call.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    /// Unix milliseconds when it was made: the clock a replay gives both versions.
    pub at_ms: u64,
    pub input: Arc<Input>,
    /// The decision the gateway acted on.
    pub live: Outcome,
}

/// A slot's recent calls: a bounded ring behind a short lock, written on the request path.
/// A call that finds the lock taken (another call is recording) is not recorded: under load
/// the ring samples itself instead of making requests wait on one another.
pub(crate) struct Recorder {
    ring: Mutex<VecDeque<Recorded>>,
    capacity: usize,
    every: u64,
    seen: AtomicU64,
    /// Calls not recorded because the ring was busy.
    busy: AtomicU64,
}

impl Recorder {
    pub fn new(capacity: usize, every: u32) -> Self {
        Recorder {
            ring: Mutex::new(VecDeque::new()),
            capacity: capacity.min(MAX_RECORDED),
            every: u64::from(every.max(1)),
            seen: AtomicU64::new(0),
            busy: AtomicU64::new(0),
        }
    }

    /// Whether this call is one to record (one in `every`).
    pub fn wants(&self) -> bool {
        self.capacity > 0
            && self
                .seen
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(self.every)
    }

    pub fn push(&self, recorded: Recorded) {
        let mut ring = match self.ring.try_lock() {
            Ok(ring) => ring,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.busy.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(recorded);
    }

    /// The `limit` most recent calls, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<Recorded> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let skip = ring.len().saturating_sub(limit);
        ring.iter().skip(skip).cloned().collect()
    }
}

/// A replay's or a shadow's answer: what the candidate would have changed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReplayReport {
    pub slot: Slot,
    /// Calls both versions were given (a limiter's settlements included).
    pub replayed: u64,
    /// When the first and last of those calls were made (Unix ms; 0 when none).
    pub window: Window,
    /// The active version compared with: its sha256 (replay), or `live` (shadow: the decisions
    /// the gateway acted on).
    pub active: String,
    /// The candidate's sha256.
    pub candidate: String,
    pub diff: Diff,
    /// The diff in sentences, for a person.
    pub summary: Vec<String>,
    /// Only for a shadow: how it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowState>,
}

/// The span of recorded time a report covers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct Window {
    pub from_ms: u64,
    pub to_ms: u64,
}

/// A shadow's bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ShadowState {
    /// Unix ms when the shadow started.
    pub started_at_ms: u64,
    /// Percent of live calls given to the shadow (`?share=`, 100 by default).
    pub share: u8,
    /// Live calls not given to the shadow because its queue was full.
    pub dropped: u64,
    /// Why the shadow stopped taking calls (it faulted too often), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// The candidate's configuration.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
}

/// The differences, by slot: one of `router`, `rate_limiter`, `meter`, `reward` is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Diff {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterDiff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<LimiterDiff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<AmountDiff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<AmountDiff>,
    /// Calls on which each version faulted (its fallback decided).
    pub faults: Faults,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct Faults {
    pub active: u64,
    pub candidate: u64,
}

/// How the router's first choices would change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RouterDiff {
    /// Routing decisions compared.
    pub decisions: u64,
    /// Of them, those whose first choice differs.
    pub changed: u64,
    /// First choices that would move, by backend (`(fallback)`: a faulted call), most first.
    pub moves: Vec<RouteMove>,
    /// A few of the changed decisions.
    pub examples: Vec<RouteExample>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RouteMove {
    /// Backend id the active version picked first.
    pub from: String,
    /// Backend id the candidate picks first.
    pub to: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RouteExample {
    pub at_ms: u64,
    pub model: String,
    pub key_id: String,
    pub from: String,
    pub to: String,
}

/// How admissions would change, in all and per key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct LimiterDiff {
    pub admissions: u64,
    /// Requests the active version allows and the candidate refuses.
    pub newly_refused: u64,
    /// Requests the active version refuses and the candidate allows.
    pub newly_allowed: u64,
    /// Keys with a difference, most changed first.
    pub keys: Vec<KeyAdmissions>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct KeyAdmissions {
    pub key_id: String,
    pub admissions: u64,
    pub active_refused: u64,
    pub candidate_refused: u64,
    pub newly_refused: u64,
    pub newly_allowed: u64,
}

/// Credits charged per key (meter) or points awarded per operator (reward).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct AmountDiff {
    /// Usage events compared.
    pub events: u64,
    pub active_total: f64,
    pub candidate_total: f64,
    /// `candidate_total - active_total`.
    pub delta: f64,
    /// Per key (meter) or operator (reward) whose amount differs, largest change first.
    pub by: Vec<AmountBy>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct AmountBy {
    /// The key id (meter) or operator (reward).
    pub id: String,
    pub active: f64,
    pub candidate: f64,
    pub delta: f64,
}

/// Compares the decisions of two versions call by call, and sums what differs.
#[derive(Debug, Default)]
pub(crate) struct DiffTally {
    /// Unix ms of the first and last call tallied.
    window: Option<(u64, u64)>,
    replayed: u64,
    faults: Faults,
    /// Whether a faulting limiter lets the request through (the gateway's fallback).
    fail_open: bool,
    routes: u64,
    changed_routes: u64,
    moves: BTreeMap<(String, String), u64>,
    examples: Vec<RouteExample>,
    admissions: u64,
    keys: BTreeMap<String, KeyAdmissions>,
    events: u64,
    amounts: BTreeMap<String, (f64, f64)>,
}

/// What a faulted route's first choice is called in a diff.
const FALLBACK: &str = "(fallback)";

impl DiffTally {
    pub fn new(fail_open: bool) -> Self {
        DiffTally {
            fail_open,
            ..DiffTally::default()
        }
    }

    /// Adds one call: what the active version decided and what the candidate decides.
    pub fn add(&mut self, at_ms: u64, input: &Input, active: &Outcome, candidate: &Outcome) {
        self.replayed += 1;
        self.window = Some(match self.window {
            None => (at_ms, at_ms),
            Some((from, to)) => (from.min(at_ms), to.max(at_ms)),
        });
        self.faults.active += u64::from(active.faulted());
        self.faults.candidate += u64::from(candidate.faulted());
        match (input, active, candidate) {
            (Input::Route(input), Outcome::Route(a), Outcome::Route(c)) => {
                let (request, infos) = (&input.request, &input.infos);
                self.routes += 1;
                if a == c {
                    return;
                }
                self.changed_routes += 1;
                let name = |index: &Option<u32>| {
                    index
                        .and_then(|i| infos.get(i as usize))
                        .map_or_else(|| FALLBACK.to_owned(), |info| info.id.clone())
                };
                let (from, to) = (name(a), name(c));
                if self.examples.len() < MAX_LISTED {
                    self.examples.push(RouteExample {
                        at_ms,
                        model: request.model.clone(),
                        key_id: request.key_id.clone(),
                        from: from.clone(),
                        to: to.clone(),
                    });
                }
                *self.moves.entry((from, to)).or_default() += 1;
            }
            (Input::Admit(admission), Outcome::Admit(a), Outcome::Admit(c)) => {
                self.admissions += 1;
                let allows = |decision: &Option<bool>| decision.unwrap_or(self.fail_open);
                let (a, c) = (allows(a), allows(c));
                let key = self
                    .keys
                    .entry(admission.key_id.clone())
                    .or_insert_with(|| KeyAdmissions {
                        key_id: admission.key_id.clone(),
                        ..KeyAdmissions::default()
                    });
                key.admissions += 1;
                key.active_refused += u64::from(!a);
                key.candidate_refused += u64::from(!c);
                key.newly_refused += u64::from(a && !c);
                key.newly_allowed += u64::from(!a && c);
            }
            (Input::Usage(event), Outcome::Charge(a), Outcome::Charge(c)) => {
                self.events += 1;
                let amount = self.amounts.entry(event.key_id.clone()).or_default();
                amount.0 += a.unwrap_or(0.0);
                amount.1 += c.unwrap_or(0.0);
            }
            (Input::Usage(_), Outcome::Awards(a), Outcome::Awards(c)) => {
                self.events += 1;
                for (awards, candidate) in [(a, false), (c, true)] {
                    for (operator, points) in awards.iter().flatten() {
                        let amount = self.amounts.entry(operator.clone()).or_default();
                        if candidate {
                            amount.1 += points;
                        } else {
                            amount.0 += points;
                        }
                    }
                }
            }
            // Settlements change the limiter's state, not a decision.
            _ => {}
        }
    }

    /// The report of what was tallied for `slot`.
    pub fn report(
        &self,
        slot: Slot,
        active: String,
        candidate: String,
        shadow: Option<ShadowState>,
    ) -> ReplayReport {
        let (from_ms, to_ms) = self.window.unwrap_or((0, 0));
        let mut diff = Diff {
            faults: self.faults,
            ..Diff::default()
        };
        let mut summary = Vec::new();
        if self.replayed == 0 {
            summary.push(match &shadow {
                Some(_) => format!("the shadow has seen no {slot} calls yet"),
                None => format!(
                    "nothing recorded for the {slot} slot on this replica yet: nothing to replay"
                ),
            });
        }
        match slot {
            Slot::Router => {
                let mut moves: Vec<RouteMove> = self
                    .moves
                    .iter()
                    .map(|((from, to), count)| RouteMove {
                        from: from.clone(),
                        to: to.clone(),
                        count: *count,
                    })
                    .collect();
                moves.sort_by_key(|m| std::cmp::Reverse(m.count));
                if self.routes > 0 {
                    summary.push(format!(
                        "{} of {} routing decisions would change their first choice ({:.1}%)",
                        self.changed_routes,
                        self.routes,
                        percent(self.changed_routes, self.routes)
                    ));
                }
                for m in moves.iter().take(MAX_LISTED) {
                    summary.push(format!("  {} → {}: {}", m.from, m.to, m.count));
                }
                moves.truncate(MAX_LISTED);
                diff.router = Some(RouterDiff {
                    decisions: self.routes,
                    changed: self.changed_routes,
                    moves,
                    examples: self.examples.clone(),
                });
            }
            Slot::RateLimiter => {
                let mut keys: Vec<KeyAdmissions> = self
                    .keys
                    .values()
                    .filter(|k| k.newly_refused + k.newly_allowed > 0)
                    .cloned()
                    .collect();
                keys.sort_by(|a, b| {
                    (b.newly_refused + b.newly_allowed).cmp(&(a.newly_refused + a.newly_allowed))
                });
                let newly_refused = self.keys.values().map(|k| k.newly_refused).sum();
                let newly_allowed = self.keys.values().map(|k| k.newly_allowed).sum();
                if self.admissions > 0 {
                    summary.push(format!(
                        "of {} admissions, {newly_refused} would be refused that were allowed, \
                         and {newly_allowed} allowed that were refused",
                        self.admissions
                    ));
                }
                for k in keys.iter().take(MAX_LISTED) {
                    summary.push(format!(
                        "  key {}: {} newly refused, {} newly allowed (of {})",
                        k.key_id, k.newly_refused, k.newly_allowed, k.admissions
                    ));
                }
                diff.rate_limiter = Some(LimiterDiff {
                    admissions: self.admissions,
                    newly_refused,
                    newly_allowed,
                    keys,
                });
            }
            Slot::Meter | Slot::Reward => {
                let amounts = self.amounts(slot, &mut summary);
                if slot == Slot::Meter {
                    diff.meter = Some(amounts);
                } else {
                    diff.reward = Some(amounts);
                }
            }
        }
        if self.faults.candidate > 0 || self.faults.active > 0 {
            summary.push(format!(
                "faults: the candidate on {} calls, the active version on {} (their fallback \
                 decided)",
                self.faults.candidate, self.faults.active
            ));
        }
        ReplayReport {
            slot,
            replayed: self.replayed,
            window: Window { from_ms, to_ms },
            active,
            candidate,
            diff,
            summary,
            shadow,
        }
    }

    fn amounts(&self, slot: Slot, summary: &mut Vec<String>) -> AmountDiff {
        let (what, per) = match slot {
            Slot::Meter => ("credits charged", "key"),
            _ => ("points awarded", "operator"),
        };
        let active_total: f64 = self.amounts.values().map(|a| a.0).sum();
        let candidate_total: f64 = self.amounts.values().map(|a| a.1).sum();
        let mut by: Vec<AmountBy> = self
            .amounts
            .iter()
            .filter(|(_, (a, c))| (a - c).abs() > 1e-9)
            .map(|(id, (a, c))| AmountBy {
                id: id.clone(),
                active: *a,
                candidate: *c,
                delta: c - a,
            })
            .collect();
        by.sort_by(|a, b| b.delta.abs().total_cmp(&a.delta.abs()));
        if self.events > 0 {
            summary.push(format!(
                "{what} over {} usage events: {active_total:.6} now, {candidate_total:.6} with \
                 the candidate ({:+.6})",
                self.events,
                candidate_total - active_total
            ));
        }
        for b in by.iter().take(MAX_LISTED) {
            summary.push(format!(
                "  {per} {}: {:.6} → {:.6} ({:+.6})",
                b.id, b.active, b.candidate, b.delta
            ));
        }
        AmountDiff {
            events: self.events,
            active_total,
            candidate_total,
            delta: candidate_total - active_total,
            by,
        }
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}
