//! The SDK for Garage policy plugins (routing, rate limits, metering, rewards) written in Rust.
//!
//! A policy is a WebAssembly component implementing one world of the `garage:policy` WIT
//! package (`wit/`): `router` (0.6.0, `wit/v0.6`), `rate-limiter` (0.7.0), `meter` or
//! `reward` (0.5.0). With this crate a plugin is plain Rust:
//!
//! 1. implement the slot's trait ([`Router`], [`RateLimiter`], [`Meter`] or [`Reward`]) on a
//!    unit struct, reading and writing state through the [`Host`] it is handed;
//! 2. export it with the slot's macro ([`export_router!`], [`export_rate_limiter!`],
//!    [`export_meter!`], [`export_reward!`]);
//! 3. unit-test it natively against [`testing::MemoryHost`] with `cargo test`;
//! 4. build the component with `cargo build --release --target wasm32-wasip2` from a
//!    `cdylib` crate.
//!
//! The gateway reuses a few instances of a plugin across calls (unless the operator asks for
//! a fresh one per call), so globals may live from one call to the next, but only as a cache:
//! an instance is retired at any time, other replicas run their own, and what must last goes
//! into the host's key-value store.
//!
//! # A complete plugin
//!
//! ```
//! use garage_plugin_sdk::{Candidate, Candidates, Host, RouteRequest, Router};
//!
//! /// Sends every request to the candidate with the fewest requests in flight.
//! pub struct FewestInFlight;
//!
//! impl Router for FewestInFlight {
//!     fn route(
//!         _host: &dyn Host,
//!         _request: &RouteRequest,
//!         candidates: &Candidates,
//!     ) -> Result<Vec<u32>, String> {
//!         let mut order: Vec<u32> = (0..candidates.len() as u32).collect();
//!         order.sort_by_key(|&i| candidates.in_flight()[i as usize]);
//!         Ok(order)
//!     }
//! }
//!
//! garage_plugin_sdk::export_router!(FewestInFlight);
//!
//! // Natively, the same code runs against an in-memory host.
//! use garage_plugin_sdk::testing::MemoryHost;
//!
//! let candidates = Candidates::from([
//!     Candidate { in_flight: 4, ..Candidate::new("busy") },
//!     Candidate { in_flight: 1, ..Candidate::new("idle") },
//! ]);
//! let order = FewestInFlight::route(&MemoryHost::new(), &RouteRequest::default(), &candidates);
//! assert_eq!(order, Ok(vec![1, 0]));
//! ```
//!
//! The crate's `Cargo.toml`:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! garage-plugin-sdk = { path = "../../plugin-sdk" }
//!
//! [profile.release]
//! opt-level = "s"
//! lto = true
//! strip = true
//! panic = "abort"   # a panic becomes a trap, which the gateway counts and survives
//! ```
//!
//! # Paying only verified work
//!
//! A usage event says who counted its tokens and how far the gateway trusted the rig that
//! served it (`docs/trust.md`): a reward scheme that pays only what the gateway verified is a
//! few lines (the guide's example, `docs/plugin-guide.md`).
//!
//! ```
//! use garage_plugin_sdk::{Award, CountedBy, Host, Reward, Trust, UsageEvent};
//!
//! /// A point per thousand tokens, for verified work only.
//! pub struct VerifiedTokens;
//!
//! impl Reward for VerifiedTokens {
//!     fn on_usage(_host: &dyn Host, event: &UsageEvent) -> Result<Vec<Award>, String> {
//!         let verified = event.trust == Trust::Verified && event.counted_by == CountedBy::Gateway;
//!         if !verified || event.operator.is_empty() {
//!             return Ok(Vec::new());
//!         }
//!         let tokens = event.prompt_tokens + event.completion_tokens;
//!         Ok(vec![Award::new(&event.operator, tokens as f64 / 1000.0, "tokens")])
//!     }
//! }
//!
//! garage_plugin_sdk::export_reward!(VerifiedTokens);
//!
//! use garage_plugin_sdk::testing::MemoryHost;
//! let work = UsageEvent {
//!     operator: "alice".into(),
//!     completion_tokens: 2_000,
//!     counted_by: CountedBy::Gateway,
//!     trust: Trust::Verified,
//!     ..UsageEvent::default()
//! };
//! let host = MemoryHost::new();
//! assert_eq!(
//!     VerifiedTokens::on_usage(&host, &work),
//!     Ok(vec![Award::new("alice", 2.0, "tokens")])
//! );
//! let unchecked = UsageEvent { trust: Trust::Unverified, ..work };
//! assert_eq!(VerifiedTokens::on_usage(&host, &unchecked), Ok(vec![]));
//! ```
//!
//! # Helpers
//!
//! - [`config`]: the plugin's JSON configuration and JSON fields (key metadata) into structs.
//! - [`hrw`]: rendezvous hashing, for cache affinity.
//! - [`limits`]: fixed windows and token buckets.
//!
//! # Inside the component
//!
//! The bindings come from `wit_bindgen::generate!` over the repository's `wit/` folders, one
//! module per world, and exist only when compiling for `wasm32`: elsewhere the export macros
//! merely check that the type implements the slot's trait. Converting between the WIT records
//! and this crate's [`types`] happens here, not in plugins. Plain Rust `std` on
//! `wasm32-wasip2` makes the component import a few `wasi:cli` and `wasi:io` interfaces (for
//! panic messages); the gateway grants them nothing but a sink.
#![deny(missing_docs)]

pub mod config;
pub mod hrw;
pub mod limits;
pub mod testing;
pub mod types;

mod host;

#[cfg(target_arch = "wasm32")]
mod guest;

pub use host::Host;
pub use types::{
    Admission, Award, BudgetPeriod, BudgetUse, Candidate, CandidateInfo, Candidates, Charge,
    CountedBy, Decision, LogLevel, Market, Price, QuoteRequest, RateLimitHeaders, RigReport,
    RouteRequest, Settlement, Trust, UsageEvent, candidate_key,
};

/// The `router` world: picks where a request goes.
///
/// ```
/// use garage_plugin_sdk::{Candidate, Candidates, Host, RouteRequest, Router};
/// use garage_plugin_sdk::testing::MemoryHost;
///
/// /// The candidates in the order the gateway gave them.
/// struct AsGiven;
///
/// impl Router for AsGiven {
///     fn route(_: &dyn Host, _: &RouteRequest, candidates: &Candidates) -> Result<Vec<u32>, String> {
///         Ok((0..candidates.len() as u32).collect())
///     }
/// }
///
/// let two = Candidates::from([Candidate::new("a"), Candidate::new("b")]);
/// assert_eq!(AsGiven::route(&MemoryHost::new(), &RouteRequest::default(), &two), Ok(vec![0, 1]));
/// ```
pub trait Router {
    /// The candidates to try, best first: indices into `candidates`. The gateway tries them in
    /// that order and only them, so the best few are enough (the default least-loaded router
    /// answers 3); every index is fine too. An error, an empty list, an index out of range or
    /// one repeated makes the gateway use its built-in round robin for this request and count
    /// a fault.
    fn route(
        host: &dyn Host,
        request: &RouteRequest,
        candidates: &Candidates,
    ) -> Result<Vec<u32>, String>;
}

/// The `rate-limiter` world: decides whether a key may send a request now.
///
/// ```
/// use garage_plugin_sdk::{Admission, Decision, Host, RateLimitHeaders, RateLimiter};
/// use garage_plugin_sdk::testing::MemoryHost;
///
/// /// At most 2 requests in flight per key.
/// struct TwoAtATime;
///
/// impl RateLimiter for TwoAtATime {
///     fn admit(host: &dyn Host, request: &Admission) -> Decision {
///         let key = format!("open:{}", request.key_id);
///         match host.kv_reserve(&key, 1, 2, None) {
///             Some(_) => Decision::allow(RateLimitHeaders::default()),
///             None => Decision::deny(1_000, "two requests at a time", RateLimitHeaders::default()),
///         }
///     }
///
///     fn settle(host: &dyn Host, settlement: &garage_plugin_sdk::Settlement) {
///         host.kv_incr(&format!("open:{}", settlement.key_id), -1, None);
///     }
/// }
///
/// let host = MemoryHost::new();
/// let request = Admission { key_id: "k".into(), ..Admission::default() };
/// assert!(TwoAtATime::admit(&host, &request).allow);
/// assert!(TwoAtATime::admit(&host, &request).allow);
/// assert!(!TwoAtATime::admit(&host, &request).allow);
/// ```
pub trait RateLimiter {
    /// Before dispatch: allow (reserving capacity) or deny with a retry-after.
    fn admit(host: &dyn Host, request: &Admission) -> Decision;

    /// After the response: settle the reservation against what the request really used.
    /// Does nothing unless implemented, for limiters that reserve nothing to give back.
    fn settle(host: &dyn Host, settlement: &Settlement) {
        let _ = (host, settlement);
    }
}

/// The `meter` world: prices requests.
///
/// ```
/// use garage_plugin_sdk::{Charge, Host, Meter, UsageEvent, testing::MemoryHost};
///
/// /// One credit per thousand tokens.
/// struct Flat;
///
/// impl Meter for Flat {
///     fn charge(_: &dyn Host, event: &UsageEvent) -> Result<Charge, String> {
///         let tokens = event.prompt_tokens + event.completion_tokens;
///         Ok(Charge { credits: tokens as f64 / 1_000.0, ..Charge::default() })
///     }
/// }
///
/// let event = UsageEvent { prompt_tokens: 1_500, completion_tokens: 500, ..UsageEvent::default() };
/// assert_eq!(Flat::charge(&MemoryHost::new(), &event).unwrap().credits, 2.0);
/// ```
pub trait Meter {
    /// The charge for one completed request. Called off the hot path, at least once per event
    /// (the gateway deduplicates by request id). A request the meter quoted carries its
    /// [`price`](UsageEvent::price): charge that, whatever the market did since.
    fn charge(host: &dyn Host, event: &UsageEvent) -> Result<Charge, String>;

    /// The charges of a run of events the gateway hands over in one call, in their order: by
    /// default [`charge`](Self::charge) of each. A meter may override it to share its store
    /// operations across the run (the default meter adds to each key's spend once per run,
    /// not once per event: on Redis, a round trip saved per event).
    fn charge_all(host: &dyn Host, events: &[UsageEvent]) -> Vec<Result<Charge, String>> {
        events
            .iter()
            .map(|event| Self::charge(host, event))
            .collect()
    }

    /// The price of a model's tokens now, asked at admission (and for the model list): the
    /// request is charged it and its account holds credits for it. The gateway keeps a quote
    /// for about a second. [`Host::market`] tells the model's supply and demand during the
    /// call. `Ok(None)`, the default, quotes nothing: `charge` prices alone.
    ///
    /// ```
    /// use garage_plugin_sdk::{Host, Market, Meter, Price, QuoteRequest, Charge, UsageEvent};
    /// use garage_plugin_sdk::testing::MemoryHost;
    ///
    /// /// Twice the price when the rigs are busier than 80 %.
    /// struct Surge;
    ///
    /// impl Meter for Surge {
    ///     fn quote(host: &dyn Host, request: &QuoteRequest) -> Result<Option<Price>, String> {
    ///         let busy = host.market(&request.model).is_some_and(|m| m.utilization > 0.8);
    ///         let per_thousand = if busy { 2.0 } else { 1.0 };
    ///         Ok(Some(Price { prompt_per_thousand: per_thousand, completion_per_thousand: per_thousand }))
    ///     }
    ///     fn charge(_: &dyn Host, event: &UsageEvent) -> Result<Charge, String> {
    ///         let price = event.price.unwrap_or(Price { prompt_per_thousand: 1.0, completion_per_thousand: 1.0 });
    ///         Ok(Charge { credits: price.cost(event.prompt_tokens, event.completion_tokens), ..Charge::default() })
    ///     }
    /// }
    ///
    /// let host = MemoryHost::new();
    /// host.set_market(Market { model: "m".into(), utilization: 0.9, ..Market::default() });
    /// let request = QuoteRequest { model: "m".into(), batch: false };
    /// assert_eq!(Surge::quote(&host, &request).unwrap().unwrap().prompt_per_thousand, 2.0);
    /// ```
    fn quote(host: &dyn Host, request: &QuoteRequest) -> Result<Option<Price>, String> {
        let _ = (host, request);
        Ok(None)
    }
}

/// The `reward` world: pays rig operators.
///
/// ```
/// use garage_plugin_sdk::{Award, Host, Reward, UsageEvent, testing::MemoryHost};
///
/// /// A point per request served.
/// struct PerRequest;
///
/// impl Reward for PerRequest {
///     fn on_usage(_: &dyn Host, event: &UsageEvent) -> Result<Vec<Award>, String> {
///         Ok(vec![Award::new(event.operator.clone(), 1.0, "requests")])
///     }
/// }
///
/// let event = UsageEvent { operator: "alice".into(), ..UsageEvent::default() };
/// assert_eq!(PerRequest::on_usage(&MemoryHost::new(), &event).unwrap()[0].points, 1.0);
/// ```
pub trait Reward {
    /// Points for the request a rig served. Off the hot path; deduplicated by request id.
    fn on_usage(host: &dyn Host, event: &UsageEvent) -> Result<Vec<Award>, String>;

    /// Points for a rig's periodic report (uptime, GPU-seconds). Awards nothing unless
    /// implemented.
    fn on_report(host: &dyn Host, report: &RigReport) -> Result<Vec<Award>, String> {
        let _ = (host, report);
        Ok(Vec::new())
    }
}

/// Exports a [`Router`] as the component's `router` world.
///
/// Use it once, in the plugin crate's `lib.rs`. Outside `wasm32` it only checks that the type
/// implements [`Router`], so the crate still builds and tests natively.
///
/// ```
/// # use garage_plugin_sdk::{Candidates, Host, RouteRequest, Router};
/// struct First;
/// impl Router for First {
///     fn route(_: &dyn Host, _: &RouteRequest, _: &Candidates) -> Result<Vec<u32>, String> {
///         Ok(vec![0])
///     }
/// }
/// garage_plugin_sdk::export_router!(First);
/// ```
#[macro_export]
macro_rules! export_router {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code, reason = "wit-bindgen's export glue is unsafe code")]
        const _: () = {
            struct GarageRouterExport;
            impl $crate::__private::router::Guest for GarageRouterExport {
                fn route(
                    request: $crate::__private::wit::RouteRequest,
                    candidates: $crate::__private::wit_v0_6::CandidateColumns,
                ) -> ::std::result::Result<::std::vec::Vec<u32>, ::std::string::String> {
                    $crate::__private::route::<$plugin>(request, candidates)
                }
            }
            $crate::__private::router::export_router_world!(
                GarageRouterExport with_types_in $crate::__private::router
            );
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = $crate::__private::assert_router::<$plugin>();
    };
}

/// Exports a [`RateLimiter`] as the component's `rate-limiter` world.
///
/// ```
/// # use garage_plugin_sdk::{Admission, Decision, Host, RateLimitHeaders, RateLimiter};
/// struct Open;
/// impl RateLimiter for Open {
///     fn admit(_: &dyn Host, _: &Admission) -> Decision {
///         Decision::allow(RateLimitHeaders::default())
///     }
/// }
/// garage_plugin_sdk::export_rate_limiter!(Open);
/// ```
#[macro_export]
macro_rules! export_rate_limiter {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code, reason = "wit-bindgen's export glue is unsafe code")]
        const _: () = {
            struct GarageRateLimiterExport;
            impl $crate::__private::rate_limiter::Guest for GarageRateLimiterExport {
                fn admit(
                    request: $crate::__private::wit::Admission,
                ) -> $crate::__private::wit_v0_7::Admitted {
                    $crate::__private::admit::<$plugin>(request)
                }
                fn settle(settlement: $crate::__private::wit::Settlement) {
                    $crate::__private::settle::<$plugin>(settlement)
                }
            }
            $crate::__private::rate_limiter::export_rate_limiter_world!(
                GarageRateLimiterExport with_types_in $crate::__private::rate_limiter
            );
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = $crate::__private::assert_rate_limiter::<$plugin>();
    };
}

/// Exports a [`Meter`] as the component's `meter` world.
///
/// ```
/// # use garage_plugin_sdk::{Charge, Host, Meter, UsageEvent};
/// struct Free;
/// impl Meter for Free {
///     fn charge(_: &dyn Host, _: &UsageEvent) -> Result<Charge, String> {
///         Ok(Charge::default())
///     }
/// }
/// garage_plugin_sdk::export_meter!(Free);
/// ```
#[macro_export]
macro_rules! export_meter {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code, reason = "wit-bindgen's export glue is unsafe code")]
        const _: () = {
            struct GarageMeterExport;
            impl $crate::__private::meter::Guest for GarageMeterExport {
                fn quote(
                    request: $crate::__private::wit_v0_5::QuoteRequest,
                ) -> ::std::result::Result<
                    ::std::option::Option<$crate::__private::wit_v0_5::Price>,
                    ::std::string::String,
                > {
                    $crate::__private::quote::<$plugin>(request)
                }
                fn charge(
                    events: ::std::vec::Vec<$crate::__private::wit_v0_5::UsageEvent>,
                ) -> ::std::vec::Vec<
                    ::std::result::Result<
                        $crate::__private::wit_v0_5::Charge,
                        ::std::string::String,
                    >,
                > {
                    $crate::__private::charge::<$plugin>(events)
                }
            }
            $crate::__private::meter::export_meter_world!(
                GarageMeterExport with_types_in $crate::__private::meter
            );
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = $crate::__private::assert_meter::<$plugin>();
    };
}

/// Exports a [`Reward`] as the component's `reward` world.
///
/// ```
/// # use garage_plugin_sdk::{Award, Host, Reward, UsageEvent};
/// struct Nothing;
/// impl Reward for Nothing {
///     fn on_usage(_: &dyn Host, _: &UsageEvent) -> Result<Vec<Award>, String> {
///         Ok(Vec::new())
///     }
/// }
/// garage_plugin_sdk::export_reward!(Nothing);
/// ```
#[macro_export]
macro_rules! export_reward {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code, reason = "wit-bindgen's export glue is unsafe code")]
        const _: () = {
            struct GarageRewardExport;
            impl $crate::__private::reward::Guest for GarageRewardExport {
                fn on_usage(
                    events: ::std::vec::Vec<$crate::__private::wit_v0_5::UsageEvent>,
                ) -> ::std::vec::Vec<
                    ::std::result::Result<
                        ::std::vec::Vec<$crate::__private::wit::Award>,
                        ::std::string::String,
                    >,
                > {
                    $crate::__private::on_usage::<$plugin>(events)
                }
                fn on_report(
                    report: $crate::__private::wit::RigReport,
                ) -> ::std::result::Result<
                    ::std::vec::Vec<$crate::__private::wit::Award>,
                    ::std::string::String,
                > {
                    $crate::__private::on_report::<$plugin>(report)
                }
            }
            $crate::__private::reward::export_reward_world!(
                GarageRewardExport with_types_in $crate::__private::reward
            );
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = $crate::__private::assert_reward::<$plugin>();
    };
}

/// What the export macros expand to; not part of the API.
#[doc(hidden)]
pub mod __private {
    #[cfg(target_arch = "wasm32")]
    pub use crate::guest::*;

    /// Compile-time check behind `export_router!` outside wasm32.
    pub const fn assert_router<P: crate::Router>() {}
    /// Compile-time check behind `export_rate_limiter!` outside wasm32.
    pub const fn assert_rate_limiter<P: crate::RateLimiter>() {}
    /// Compile-time check behind `export_meter!` outside wasm32.
    pub const fn assert_meter<P: crate::Meter>() {}
    /// Compile-time check behind `export_reward!` outside wasm32.
    pub const fn assert_reward<P: crate::Reward>() {}
}

/// The Rust examples of the crate's README (`plugin-sdk/README.md`), run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
