//! The default policy plugins and the hostile test fixtures, as compiled WebAssembly components
//! (`wasm32-wasip2`, world of the `garage:policy@0.2.0` package in `wit/`).
//!
//! `build.rs` compiles them from `guests/` (a workspace of its own) on every change of their
//! sources, the SDK or the WIT; this crate holds their bytes. Each plugin's behaviour and
//! config format are documented at the top of its `guests/<name>/src/lib.rs`.
//!
//! ```
//! for (name, component) in garage_plugins::all() {
//!     assert!(component.starts_with(b"\0asm"), "{name}");
//!     assert!(garage_plugins::world(name).is_some());
//! }
//! ```
#![deny(missing_docs)]

macro_rules! component {
    ($artifact:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $artifact, ".wasm"))
    };
}

/// Router: round robin, one turn counter per model shared by every replica.
pub const ROUTER_ROUND_ROBIN: &[u8] = component!("router_round_robin");

/// Router: least loaded first, load normalised by each rig's measured decode speed.
pub const ROUTER_LEAST_LOADED: &[u8] = component!("router_least_loaded");

/// Router: prompt-prefix affinity by rendezvous hashing, with bounded load
/// (config `{"epsilon": 0.25}`).
pub const ROUTER_PREFIX_AFFINITY: &[u8] = component!("router_prefix_affinity");

/// Rate limiter: requests and tokens per minute, per key and per key and model, limits from
/// the key's metadata or the plugin config.
pub const RATE_LIMITER: &[u8] = component!("rate_limiter");

/// Meter: per-model price table, running spend per key, budgets.
pub const METER: &[u8] = component!("meter");

/// Reward: points per token served (weighted by model and batch) and per uptime hour.
pub const REWARD: &[u8] = component!("reward");

/// The default plugins, by name: `router-round-robin`, `router-least-loaded`,
/// `router-prefix-affinity`, `rate-limiter`, `meter`, `reward`.
pub fn all() -> &'static [(&'static str, &'static [u8])] {
    const ALL: &[(&str, &[u8])] = &[
        ("router-round-robin", ROUTER_ROUND_ROBIN),
        ("router-least-loaded", ROUTER_LEAST_LOADED),
        ("router-prefix-affinity", ROUTER_PREFIX_AFFINITY),
        ("rate-limiter", RATE_LIMITER),
        ("meter", METER),
        ("reward", REWARD),
    ];
    ALL
}

/// The WIT world (`router`, `rate-limiter`, `meter` or `reward`) that the component named
/// `name` (a default plugin or a fixture) implements.
///
/// ```
/// assert_eq!(garage_plugins::world("router-prefix-affinity"), Some("router"));
/// assert_eq!(garage_plugins::world("fixture-wrong-world"), Some("meter"));
/// assert_eq!(garage_plugins::world("nonsense"), None);
/// ```
pub fn world(name: &str) -> Option<&'static str> {
    Some(match name {
        "router-round-robin" | "router-least-loaded" | "router-prefix-affinity" => "router",
        "rate-limiter" | "fixture-limiter-says" | "fixture-limiter-v0-4" => "rate-limiter",
        "meter"
        | "fixture-wrong-world"
        | "fixture-picky-meter"
        | "fixture-meter-v0-3"
        | "fixture-meter-v0-4" => "meter",
        "reward" => "reward",
        "fixture-infinite-loop"
        | "fixture-memory-bomb"
        | "fixture-trap"
        | "fixture-huge-output"
        | "fixture-router-v0-4"
        | "fixture-router-says" => "router",
        _ => return None,
    })
}

/// Hostile components, built from real source like the defaults, for the host's tests. Every
/// one but the meters ([`WRONG_WORLD`](fixtures::WRONG_WORLD),
/// [`PICKY_METER`](fixtures::PICKY_METER), [`METER_V0_3`](fixtures::METER_V0_3),
/// [`METER_V0_4`](fixtures::METER_V0_4)) and the rate limiters
/// ([`LIMITER_SAYS`](fixtures::LIMITER_SAYS), [`LIMITER_V0_4`](fixtures::LIMITER_V0_4)) is a
/// router. Garbage bytes need no fixture.
pub mod fixtures {
    /// A router that never returns: the epoch deadline must interrupt it.
    pub const INFINITE_LOOP: &[u8] = component!("fixture_infinite_loop");

    /// A router that allocates a mebibyte at a time without bound: the memory limit must stop
    /// it (the failed allocation aborts, a trap).
    pub const MEMORY_BOMB: &[u8] = component!("fixture_memory_bomb");

    /// A router that logs an error line, then panics: a trap.
    pub const TRAP: &[u8] = component!("fixture_trap");

    /// A valid meter (it charges nothing), to upload to the router slot: validation against
    /// the `router` world must refuse it.
    pub const WRONG_WORLD: &[u8] = component!("fixture_wrong_world");

    /// A router answering with 4,194,304 in-range indices (16 MiB), or as many as its config
    /// `{"entries": N}` says: the host must bound what it accepts.
    pub const HUGE_OUTPUT: &[u8] = component!("fixture_huge_output");

    /// A meter that answers each event of a list, and each quote, by its model: `refused`
    /// gets an error, `trap` traps (failing the whole call), others one credit (or their
    /// quoted price); quotes for `nan` and `negative` are prices no one can be charged,
    /// `none` quotes nothing, others 2 and 4 credits per 1,000 tokens.
    pub const PICKY_METER: &[u8] = component!("fixture_picky_meter");

    /// A meter built against `garage:policy@0.3.0` with wit-bindgen alone (no SDK), standing
    /// for a component from before 0.4.0: a credit per thousand tokens of each event.
    pub const METER_V0_3: &[u8] = component!("fixture_meter_v0_3");

    /// A meter built against `garage:policy@0.4.0` with wit-bindgen alone (no SDK), standing
    /// for a component from before 0.5.0: it quotes nothing.
    pub const METER_V0_4: &[u8] = component!("fixture_meter_v0_4");

    /// A router built against `garage:policy@0.4.0` with wit-bindgen alone (no SDK), standing
    /// for a router from before 0.6.0: candidate records in, every index out, sorted by the
    /// least-loaded score of that time (a verified rig's score halved).
    pub const ROUTER_V0_4: &[u8] = component!("fixture_router_v0_4");

    /// A router of `garage:policy@0.6.0` answering the indices its config lists
    /// (`{"answer": [2, 0]}`: out of range, repeated or none), or without one the candidate
    /// with the most free GPU memory, then the verified one with the largest key.
    pub const ROUTER_SAYS: &[u8] = component!("fixture_router_says");

    /// A rate limiter of `garage:policy@0.7.0` answering what its config says
    /// (`{"allow": false, "settle": true, "unlimited_ms": 60000, "remaining_requests": 3}`,
    /// every field optional), promises included; it counts its `admit` calls in its state
    /// (`admits`).
    pub const LIMITER_SAYS: &[u8] = component!("fixture_limiter_says");

    /// A rate limiter built against `garage:policy@0.4.0` with wit-bindgen alone (no SDK),
    /// standing for a limiter from before 0.7.0: it allows `{"limit": N}` requests per key in
    /// all (default 2), nothing to settle, and can promise nothing.
    pub const LIMITER_V0_4: &[u8] = component!("fixture_limiter_v0_4");

    /// The fixtures, by name: `fixture-infinite-loop`, `fixture-memory-bomb`, `fixture-trap`,
    /// `fixture-wrong-world`, `fixture-huge-output`, `fixture-picky-meter`,
    /// `fixture-meter-v0-3`, `fixture-meter-v0-4`, `fixture-router-v0-4`,
    /// `fixture-router-says`, `fixture-limiter-says`, `fixture-limiter-v0-4`.
    pub fn all() -> &'static [(&'static str, &'static [u8])] {
        const ALL: &[(&str, &[u8])] = &[
            ("fixture-infinite-loop", INFINITE_LOOP),
            ("fixture-memory-bomb", MEMORY_BOMB),
            ("fixture-trap", TRAP),
            ("fixture-wrong-world", WRONG_WORLD),
            ("fixture-huge-output", HUGE_OUTPUT),
            ("fixture-picky-meter", PICKY_METER),
            ("fixture-meter-v0-3", METER_V0_3),
            ("fixture-meter-v0-4", METER_V0_4),
            ("fixture-router-v0-4", ROUTER_V0_4),
            ("fixture-router-says", ROUTER_SAYS),
            ("fixture-limiter-says", LIMITER_SAYS),
            ("fixture-limiter-v0-4", LIMITER_V0_4),
        ];
        ALL
    }
}
