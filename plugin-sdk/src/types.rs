//! Plain Rust mirrors of the records in `wit/policy.wit` (`interface types`).
//!
//! Field for field the same as the WIT records (kebab-case names become snake_case), so the
//! WIT documentation applies unchanged. They are ordinary structs: build them with struct
//! literals and `..Default::default()` in tests, no WebAssembly involved.

/// A request about to be routed (WIT `route-request`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteRequest {
    /// Model name as the client asked for it.
    pub model: String,
    /// Id of the API key making the request.
    pub key_id: String,
    /// Hash of the first part of the prompt (system prompt and first messages): equal prefixes
    /// hash equally, so a router can send them where the KV cache holds them.
    pub prefix_hash: u64,
    /// Estimated prompt tokens (about 4 characters per token).
    pub prompt_tokens: u32,
    /// `max_tokens` of the request, or 0 when the client set none.
    pub max_tokens: u32,
    /// The client asked for a streamed answer.
    pub stream: bool,
}

/// One backend that can serve the request, with its live stats (WIT `candidate`).
///
/// Numbers only: who the backend is (id, rig, operator, labels) is one call away,
/// [`Host::candidate`](crate::Host::candidate), for the routers that need it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Candidate {
    /// Stable 64-bit key of the backend, [`candidate_key`] of its id: the same in every call
    /// and on every gateway replica, so it can drive consistent hashing.
    pub key: u64,
    /// Requests this gateway has in flight on this backend.
    pub in_flight: u32,
    /// Requests running in the engine (vLLM `num_requests_running`), 0 when unknown.
    pub engine_running: u32,
    /// Requests queued in the engine (vLLM `num_requests_waiting`), 0 when unknown.
    pub engine_waiting: u32,
    /// KV-cache use of the engine, 0.0 to 1.0; 0.0 when unknown.
    pub kv_cache_usage: f32,
    /// Measured decode speed of this backend, tokens per second; 0.0 when not measured yet.
    pub tokens_per_second: f32,
    /// Smoothed (EWMA) time to first token of this backend, milliseconds; 0.0 when unknown.
    pub latency_ms: f32,
    /// Mean GPU utilisation of the rig, 0.0 to 1.0; 0.0 when unknown.
    pub gpu_utilization: f32,
    /// Free GPU memory of the rig, bytes; 0 when unknown.
    pub gpu_memory_free_bytes: u64,
    /// What the gateway's checks found about the backend.
    pub trust: Trust,
}

/// The candidates of one `route` call (WIT `candidate-columns`, new in 0.6.0): a column per
/// [`Candidate`] field, which the gateway copies into the component as one block each, where a
/// list of records costs a copy per field per candidate.
///
/// Read a candidate whole with [`get`](Self::get) or [`iter`](Self::iter) (a [`Candidate`] is
/// a few numbers, built on the spot from the columns), or a column at once for a tight loop
/// ([`in_flight`](Self::in_flight), [`tokens_per_second`](Self::tokens_per_second), ...).
/// Build them in tests from candidates:
///
/// ```
/// use garage_plugin_sdk::{Candidate, Candidates, Trust};
///
/// let candidates = Candidates::from([
///     Candidate { in_flight: 2, ..Candidate::new("a") },
///     Candidate { trust: Trust::Verified, ..Candidate::new("b") },
/// ]);
/// assert_eq!(candidates.len(), 2);
/// assert_eq!(candidates.in_flight(), &[2, 0]);
/// assert_eq!(candidates.get(1).map(|c| c.trust), Some(Trust::Verified));
/// assert_eq!(candidates.iter().map(|c| c.load()).sum::<u64>(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Candidates {
    key: Vec<u64>,
    in_flight: Vec<u32>,
    engine_running: Vec<u32>,
    engine_waiting: Vec<u32>,
    kv_cache_usage: Vec<f32>,
    tokens_per_second: Vec<f32>,
    latency_ms: Vec<f32>,
    gpu_utilization: Vec<f32>,
    gpu_memory_free_bytes: Vec<u64>,
    trust: Vec<u8>,
}

impl Candidates {
    /// How many candidates there are.
    pub fn len(&self) -> usize {
        self.key.len()
    }

    /// Whether there are none (the gateway never calls a router without candidates).
    pub fn is_empty(&self) -> bool {
        self.key.is_empty()
    }

    /// Candidate `index`, or `None` past the end.
    pub fn get(&self, index: usize) -> Option<Candidate> {
        (index < self.len()).then(|| Candidate {
            key: self.key[index],
            in_flight: self.in_flight[index],
            engine_running: self.engine_running[index],
            engine_waiting: self.engine_waiting[index],
            kv_cache_usage: self.kv_cache_usage[index],
            tokens_per_second: self.tokens_per_second[index],
            latency_ms: self.latency_ms[index],
            gpu_utilization: self.gpu_utilization[index],
            gpu_memory_free_bytes: self.gpu_memory_free_bytes[index],
            trust: Trust::from_code(self.trust[index]),
        })
    }

    /// Every candidate in order (index 0 first).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Candidate> + '_ {
        (0..self.len()).map(|index| self.get(index).unwrap_or_default())
    }

    /// Adds a candidate at the end.
    pub fn push(&mut self, c: Candidate) {
        self.key.push(c.key);
        self.in_flight.push(c.in_flight);
        self.engine_running.push(c.engine_running);
        self.engine_waiting.push(c.engine_waiting);
        self.kv_cache_usage.push(c.kv_cache_usage);
        self.tokens_per_second.push(c.tokens_per_second);
        self.latency_ms.push(c.latency_ms);
        self.gpu_utilization.push(c.gpu_utilization);
        self.gpu_memory_free_bytes.push(c.gpu_memory_free_bytes);
        self.trust.push(c.trust.code());
    }

    /// Every candidate's [`Candidate::key`].
    pub fn keys(&self) -> &[u64] {
        &self.key
    }

    /// Every candidate's [`Candidate::in_flight`].
    pub fn in_flight(&self) -> &[u32] {
        &self.in_flight
    }

    /// Every candidate's [`Candidate::engine_running`].
    pub fn engine_running(&self) -> &[u32] {
        &self.engine_running
    }

    /// Every candidate's [`Candidate::engine_waiting`].
    pub fn engine_waiting(&self) -> &[u32] {
        &self.engine_waiting
    }

    /// Every candidate's [`Candidate::kv_cache_usage`].
    pub fn kv_cache_usage(&self) -> &[f32] {
        &self.kv_cache_usage
    }

    /// Every candidate's [`Candidate::tokens_per_second`].
    pub fn tokens_per_second(&self) -> &[f32] {
        &self.tokens_per_second
    }

    /// Every candidate's [`Candidate::latency_ms`].
    pub fn latency_ms(&self) -> &[f32] {
        &self.latency_ms
    }

    /// Every candidate's [`Candidate::gpu_utilization`].
    pub fn gpu_utilization(&self) -> &[f32] {
        &self.gpu_utilization
    }

    /// Every candidate's [`Candidate::gpu_memory_free_bytes`].
    pub fn gpu_memory_free_bytes(&self) -> &[u64] {
        &self.gpu_memory_free_bytes
    }

    /// Candidate `index`'s [`Candidate::trust`] (`Unverified` past the end).
    pub fn trust(&self, index: usize) -> Trust {
        self.trust
            .get(index)
            .map_or(Trust::Unverified, |&code| Trust::from_code(code))
    }

    /// Candidate `index`'s [`Candidate::load`] (0 past the end).
    pub fn load(&self, index: usize) -> u64 {
        if index >= self.len() {
            return 0;
        }
        u64::from(self.in_flight[index])
            + u64::from(self.engine_running[index])
            + u64::from(self.engine_waiting[index])
    }

    /// The columns as the WIT record carries them, checked to be of one length.
    #[expect(clippy::too_many_arguments, reason = "one argument per WIT column")]
    #[cfg_attr(
        not(target_arch = "wasm32"),
        allow(dead_code, reason = "the component's glue calls it")
    )]
    pub(crate) fn from_columns(
        key: Vec<u64>,
        in_flight: Vec<u32>,
        engine_running: Vec<u32>,
        engine_waiting: Vec<u32>,
        kv_cache_usage: Vec<f32>,
        tokens_per_second: Vec<f32>,
        latency_ms: Vec<f32>,
        gpu_utilization: Vec<f32>,
        gpu_memory_free_bytes: Vec<u64>,
        trust: Vec<u8>,
    ) -> Result<Candidates, String> {
        let n = key.len();
        let lengths = [
            in_flight.len(),
            engine_running.len(),
            engine_waiting.len(),
            kv_cache_usage.len(),
            tokens_per_second.len(),
            latency_ms.len(),
            gpu_utilization.len(),
            gpu_memory_free_bytes.len(),
            trust.len(),
        ];
        if lengths.iter().any(|&len| len != n) {
            return Err(format!(
                "candidate columns of different lengths: {n} keys, others {lengths:?}"
            ));
        }
        Ok(Candidates {
            key,
            in_flight,
            engine_running,
            engine_waiting,
            kv_cache_usage,
            tokens_per_second,
            latency_ms,
            gpu_utilization,
            gpu_memory_free_bytes,
            trust,
        })
    }
}

impl FromIterator<Candidate> for Candidates {
    fn from_iter<I: IntoIterator<Item = Candidate>>(iter: I) -> Self {
        let mut candidates = Candidates::default();
        for c in iter {
            candidates.push(c);
        }
        candidates
    }
}

impl From<&[Candidate]> for Candidates {
    fn from(rows: &[Candidate]) -> Self {
        rows.iter().copied().collect()
    }
}

impl<const N: usize> From<[Candidate; N]> for Candidates {
    fn from(rows: [Candidate; N]) -> Self {
        rows.into_iter().collect()
    }
}

impl From<Vec<Candidate>> for Candidates {
    fn from(rows: Vec<Candidate>) -> Self {
        rows.into_iter().collect()
    }
}

/// How far the gateway trusts a backend, from its checks (WIT `trust`, new in 0.4.0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Trust {
    /// A static upstream from the operator's own configuration: not a stranger's rig, so never
    /// checked.
    Configured,
    /// A rig that has not passed enough spot checks yet (every rig starts here).
    #[default]
    Unverified,
    /// A rig that passed its spot checks.
    Verified,
    /// A rig that failed a check.
    Suspect,
    /// A rig taken out of routing for failed checks.
    Quarantined,
}

impl Trust {
    /// Whether work on this backend can be believed: a verified rig, or the operator's own
    /// upstream.
    ///
    /// ```
    /// use garage_plugin_sdk::Trust;
    ///
    /// assert!(Trust::Verified.is_trusted());
    /// assert!(Trust::Configured.is_trusted());
    /// assert!(!Trust::Unverified.is_trusted());
    /// ```
    pub fn is_trusted(self) -> bool {
        matches!(self, Trust::Verified | Trust::Configured)
    }

    /// The number `candidate-columns.trust` carries for this trust (0.6.0): its position in
    /// the WIT enum.
    pub fn code(self) -> u8 {
        match self {
            Trust::Configured => 0,
            Trust::Unverified => 1,
            Trust::Verified => 2,
            Trust::Suspect => 3,
            Trust::Quarantined => 4,
        }
    }

    /// The trust a `candidate-columns.trust` number stands for; a number this SDK does not
    /// know (from a later contract) reads as `Unverified`, as the WIT says.
    ///
    /// ```
    /// use garage_plugin_sdk::Trust;
    ///
    /// assert_eq!(Trust::from_code(Trust::Suspect.code()), Trust::Suspect);
    /// assert_eq!(Trust::from_code(200), Trust::Unverified);
    /// ```
    pub fn from_code(code: u8) -> Trust {
        match code {
            0 => Trust::Configured,
            2 => Trust::Verified,
            3 => Trust::Suspect,
            4 => Trust::Quarantined,
            _ => Trust::Unverified,
        }
    }
}

/// Who counted a usage event's tokens (WIT `counted-by`, new in 0.4.0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CountedBy {
    /// The gateway, with the model's tokenizer, from the request and the answer it forwarded.
    Gateway,
    /// The backend's own report, within bounds the gateway checks, when no tokenizer is
    /// configured for the model (or the gateway's estimate of a stream cut short).
    #[default]
    Backend,
}

impl Candidate {
    /// A candidate for the backend with this id, every stat unknown (zero), for tests and
    /// examples.
    ///
    /// ```
    /// use garage_plugin_sdk::{Candidate, candidate_key};
    ///
    /// let rig = Candidate { in_flight: 3, ..Candidate::new("rig-a") };
    /// assert_eq!(rig.key, candidate_key("rig-a"));
    /// assert_eq!(rig.load(), 3);
    /// ```
    pub fn new(id: &str) -> Self {
        Self {
            key: candidate_key(id),
            ..Self::default()
        }
    }

    /// Requests on this backend as far as anyone knows: this gateway's in-flight requests plus
    /// the engine's running and waiting ones.
    ///
    /// The engine's counts include this gateway's own requests once the engine has seen them,
    /// so the sum leans high for a busy backend; it is a ranking signal, not an exact count.
    pub fn load(&self) -> u64 {
        u64::from(self.in_flight) + u64::from(self.engine_running) + u64::from(self.engine_waiting)
    }
}

/// The key of the backend with id `id`, as the gateway gives it in [`Candidate::key`]:
/// FNV-1a (64-bit) of the id's UTF-8 bytes.
///
/// ```
/// use garage_plugin_sdk::candidate_key;
///
/// assert_eq!(candidate_key(""), 0xcbf2_9ce4_8422_2325);
/// assert_ne!(candidate_key("rig-a"), candidate_key("rig-b"));
/// ```
pub fn candidate_key(id: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    id.bytes().fold(FNV_OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// Who a candidate is (WIT `candidate-info`), from [`Host::candidate`](crate::Host::candidate).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CandidateInfo {
    /// Backend id: the node id of a rig, or the name of a static upstream.
    pub id: String,
    /// Node id of the rig; empty for static upstreams.
    pub rig: String,
    /// Operator the rig belongs to; empty for static upstreams.
    pub operator: String,
    /// Free-form labels (region, GPU class...), as `key=value` pairs.
    pub labels: Vec<(String, String)>,
}

impl CandidateInfo {
    /// A description with this id and nothing else, for tests and examples.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            ..Self::default()
        }
    }

    /// The value of label `key`, if the backend has it.
    ///
    /// ```
    /// use garage_plugin_sdk::CandidateInfo;
    ///
    /// let rig = CandidateInfo {
    ///     labels: vec![("region".into(), "eu".into())],
    ///     ..CandidateInfo::new("rig-a")
    /// };
    /// assert_eq!(rig.label("region"), Some("eu"));
    /// assert_eq!(rig.label("gpu"), None);
    /// ```
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A request at admission, before it is dispatched (WIT `admission`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// Request id (unique per request, also the `x-request-id`).
    pub request_id: String,
    /// Id of the API key making the request.
    pub key_id: String,
    /// Model name as the client asked for it.
    pub model: String,
    /// Estimated prompt tokens plus the completion tokens it may produce (`max-tokens`, or a
    /// default when the client set none): what a token limit must reserve.
    pub reserved_tokens: u32,
    /// The key's metadata as a JSON object (limits and budgets are read from here).
    pub key_metadata: String,
}

/// Values for OpenAI's `x-ratelimit-*` headers (WIT `rate-limit-headers`). Every field is
/// optional: a limiter that does not limit tokens leaves the token fields empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// `x-ratelimit-limit-requests`.
    pub limit_requests: Option<u64>,
    /// `x-ratelimit-remaining-requests`.
    pub remaining_requests: Option<u64>,
    /// Milliseconds until the request limit is fully replenished.
    pub reset_requests_ms: Option<u64>,
    /// `x-ratelimit-limit-tokens`.
    pub limit_tokens: Option<u64>,
    /// `x-ratelimit-remaining-tokens`.
    pub remaining_tokens: Option<u64>,
    /// Milliseconds until the token limit is fully replenished.
    pub reset_tokens_ms: Option<u64>,
}

/// The rate limiter's answer (WIT `decision`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// The request may go ahead.
    pub allow: bool,
    /// When denied: milliseconds after which a retry may succeed (`retry-after`).
    pub retry_after_ms: u64,
    /// Shown to the client when denied.
    pub reason: String,
    /// Values for the `x-ratelimit-*` headers, sent whether allowed or not.
    pub headers: RateLimitHeaders,
    /// Whether the gateway must call `settle` once the allowed request is done: true by
    /// default; [`without_settle`](Self::without_settle) for a request the limiter reserved
    /// nothing for that it would adjust (saves the gateway a call per request).
    pub settle: bool,
    /// A promise that no limit of this limiter applies to this key's requests for this model,
    /// whatever they reserve: for this many milliseconds the gateway may allow them without
    /// calling `admit` (0, the default: ask every time). Honoured only with an allow that needs
    /// no settle and reports no headers, for at most a minute, and forgotten when the plugin
    /// or its configuration changes; requests admitted on it are not counted by the limiter.
    /// See [`unlimited_for`](Self::unlimited_for).
    pub unlimited_ms: u32,
}

impl Decision {
    /// Let the request through.
    ///
    /// ```
    /// use garage_plugin_sdk::{Decision, RateLimitHeaders};
    ///
    /// assert!(Decision::allow(RateLimitHeaders::default()).allow);
    /// ```
    pub fn allow(headers: RateLimitHeaders) -> Self {
        Self {
            allow: true,
            retry_after_ms: 0,
            reason: String::new(),
            headers,
            settle: true,
            unlimited_ms: 0,
        }
    }

    /// The same decision, without a `settle` for it: the limiter reserved nothing it would
    /// adjust once the request is done.
    ///
    /// ```
    /// use garage_plugin_sdk::{Decision, RateLimitHeaders};
    ///
    /// assert!(!Decision::allow(RateLimitHeaders::default()).without_settle().settle);
    /// ```
    pub fn without_settle(self) -> Self {
        Self {
            settle: false,
            ..self
        }
    }

    /// An allow that promises the key's requests for this model need not ask for `ms`
    /// milliseconds: for a key this limiter does not limit at all, whatever its requests
    /// reserve. Implies [`without_settle`](Self::without_settle); the gateway keeps the promise
    /// at most a minute, and not at all for a denial or an allow with headers.
    ///
    /// ```
    /// use garage_plugin_sdk::{Decision, RateLimitHeaders};
    ///
    /// let free = Decision::allow(RateLimitHeaders::default()).unlimited_for(60_000);
    /// assert_eq!((free.settle, free.unlimited_ms), (false, 60_000));
    /// ```
    pub fn unlimited_for(self, ms: u32) -> Self {
        Self {
            unlimited_ms: ms,
            ..self.without_settle()
        }
    }

    /// Turn the request away; the client may retry after `retry_after_ms`.
    ///
    /// ```
    /// use garage_plugin_sdk::{Decision, RateLimitHeaders};
    ///
    /// let no = Decision::deny(1_500, "too many requests", RateLimitHeaders::default());
    /// assert!(!no.allow);
    /// assert_eq!(no.retry_after_ms, 1_500);
    /// ```
    pub fn deny(retry_after_ms: u64, reason: impl Into<String>, headers: RateLimitHeaders) -> Self {
        Self {
            allow: false,
            retry_after_ms,
            reason: reason.into(),
            headers,
            settle: false,
            unlimited_ms: 0,
        }
    }
}

/// What a request really used, once it is done or failed (WIT `settlement`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Request id, as at admission.
    pub request_id: String,
    /// Id of the API key that made the request.
    pub key_id: String,
    /// Model name as the client asked for it.
    pub model: String,
    /// What `admit` reserved.
    pub reserved_tokens: u32,
    /// Prompt plus completion tokens actually used; 0 when the request failed.
    pub used_tokens: u32,
}

/// A price in credits per thousand tokens (WIT `price`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Price {
    /// Credits per 1,000 prompt tokens.
    pub prompt_per_thousand: f64,
    /// Credits per 1,000 completion tokens.
    pub completion_per_thousand: f64,
}

impl Price {
    /// The credits `prompt` and `completion` tokens cost at this price.
    ///
    /// ```
    /// use garage_plugin_sdk::Price;
    ///
    /// let price = Price { prompt_per_thousand: 0.5, completion_per_thousand: 2.0 };
    /// assert_eq!(price.cost(2_000, 500), 2.0);
    /// ```
    pub fn cost(&self, prompt: u64, completion: u64) -> f64 {
        (prompt as f64 * self.prompt_per_thousand
            + completion as f64 * self.completion_per_thousand)
            / 1_000.0
    }
}

/// What a meter is asked to price (WIT `quote-request`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuoteRequest {
    /// Model name as clients ask for it.
    pub model: String,
    /// For a line of the Batch API (which may have its own discount).
    pub batch: bool,
}

/// Supply and demand for one model, as the gateway sees it now (WIT `market`): what a meter
/// that follows the market prices by. See [`Host::market`](crate::Host::market).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Market {
    /// The model.
    pub model: String,
    /// Healthy backends serving the model.
    pub rigs: u32,
    /// Their measured decode speed summed, tokens per second (0.0 before any is measured).
    pub capacity_tokens_per_second: f64,
    /// How busy they are, 0.0 to 1.0: per backend the larger of its KV-cache use and GPU
    /// utilisation, averaged.
    pub utilization: f64,
    /// Requests queued in the engines, summed.
    pub queue_depth: u32,
    /// Requests the gateway has in flight on those backends.
    pub in_flight: u32,
    /// Requests for the model admitted per minute, recently.
    pub demand_requests_per_minute: f64,
}

/// Which budget a [`BudgetUse`] is about (WIT `budget-period`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum BudgetPeriod {
    /// For the life of the key.
    #[default]
    Lifetime,
    /// A calendar day.
    Day,
    /// A calendar week, from Monday.
    Week,
    /// A calendar month.
    Month,
}

/// How much of one budget of a key is used, after a charge (WIT `budget-use`): the gateway
/// alerts when it crosses a threshold the operator set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BudgetUse {
    /// Which budget.
    pub period: BudgetPeriod,
    /// Credits spent in the period (or ever).
    pub spent: f64,
    /// The budget.
    pub limit: f64,
    /// When the period began, milliseconds since the Unix epoch; `None` for a lifetime budget.
    pub starts_at_ms: Option<u64>,
    /// When the period ends, milliseconds since the Unix epoch; `None` for a lifetime budget.
    pub resets_at_ms: Option<u64>,
}

/// A completed request, for metering and rewards (WIT `usage-event`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageEvent {
    /// Unique per request: metering and rewards are idempotent on it.
    pub request_id: String,
    /// Id of the API key that made the request.
    pub key_id: String,
    /// Model name as the client asked for it.
    pub model: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt tokens served from a prefix cache, when the engine reports them.
    pub cached_tokens: u64,
    /// Whole request, milliseconds.
    pub latency_ms: u64,
    /// Time to first token, milliseconds (equal to latency for non-streamed requests).
    pub ttft_ms: u64,
    /// Backend id that served it.
    pub backend: String,
    /// Node id of the rig that served it; empty for static upstreams.
    pub rig: String,
    /// Operator of that rig; empty for static upstreams.
    pub operator: String,
    /// When the request started, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// When the request finished, milliseconds since the Unix epoch.
    pub finished_at_ms: u64,
    /// The request came from the Batch API (a reward plugin may pay it differently).
    pub batch: bool,
    /// Who counted `prompt_tokens` and `completion_tokens`.
    pub counted_by: CountedBy,
    /// With [`CountedBy::Gateway`]: the prompt tokens the backend reported (none when it
    /// reported nothing, as a stream cut short does).
    pub reported_prompt_tokens: Option<u64>,
    /// With [`CountedBy::Gateway`]: the completion tokens the backend reported.
    pub reported_completion_tokens: Option<u64>,
    /// The backend's trust when it served the request.
    pub trust: Trust,
    /// The price the meter quoted at admission ([`Meter::quote`](crate::Meter::quote)): what
    /// the request is charged. `None` when the meter quoted nothing.
    pub price: Option<Price>,
}

impl UsageEvent {
    /// Whether the event is work a reward can believe: tokens the gateway counted itself, on a
    /// verified rig.
    ///
    /// ```
    /// use garage_plugin_sdk::{CountedBy, Trust, UsageEvent};
    ///
    /// let served = UsageEvent {
    ///     counted_by: CountedBy::Gateway,
    ///     trust: Trust::Verified,
    ///     ..UsageEvent::default()
    /// };
    /// assert!(served.is_verified_work());
    /// assert!(!UsageEvent { trust: Trust::Unverified, ..served.clone() }.is_verified_work());
    /// assert!(!UsageEvent { counted_by: CountedBy::Backend, ..served }.is_verified_work());
    /// ```
    pub fn is_verified_work(&self) -> bool {
        self.counted_by == CountedBy::Gateway && self.trust == Trust::Verified
    }
}

/// The meter's answer for one usage event (WIT `charge`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Charge {
    /// Credits charged to the key.
    pub credits: f64,
    /// The key's budget is spent: further requests get 429 `insufficient_quota`.
    pub budget_exhausted: bool,
    /// With `budget_exhausted`: when the budget resets, milliseconds since the Unix epoch (a
    /// period budget's next period); `None` for a budget that never resets.
    pub exhausted_until_ms: Option<u64>,
    /// The key's budgets and how much of each is used after this charge (empty when it has
    /// none).
    pub budgets: Vec<BudgetUse>,
}

/// Periodic report of a rig, for uptime rewards (WIT `rig-report`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RigReport {
    /// Node id of the rig.
    pub rig: String,
    /// Operator the rig belongs to.
    pub operator: String,
    /// Length of the period, milliseconds.
    pub period_ms: u64,
    /// Milliseconds of the period the rig was connected and routable.
    pub uptime_ms: u64,
    /// GPU-seconds the rig offered in the period (GPUs × seconds available).
    pub gpu_seconds: f64,
    /// End of the period, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// Points for an operator (WIT `award`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Award {
    /// Operator who earns the points.
    pub operator: String,
    /// Points earned.
    pub points: f64,
    /// Why, for the ledger (`tokens`, `uptime`...).
    pub reason: String,
}

impl Award {
    /// `points` for `operator`, for `reason`.
    ///
    /// ```
    /// use garage_plugin_sdk::Award;
    ///
    /// let award = Award::new("alice", 2.5, "uptime");
    /// assert_eq!(award.points, 2.5);
    /// ```
    pub fn new(operator: impl Into<String>, points: f64, reason: impl Into<String>) -> Self {
        Self {
            operator: operator.into(),
            points,
            reason: reason.into(),
        }
    }
}

/// Severity of a log line (WIT `log.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Detail for whoever debugs the plugin.
    Debug,
    /// Normal operation worth recording.
    Info,
    /// Something looks wrong, but the plugin carried on (a bad config value ignored...).
    Warn,
    /// The plugin could not do its job.
    Error,
}
