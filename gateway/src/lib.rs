//! Garage AI gateway: an OpenAI-compatible inference gateway for a community GPU network.
//!
//! The `gateway` binary (`gateway/bin`: the command line and the demo) is a thin shell over
//! this library, so tests and benchmarks drive the same code; the library links no rig agent,
//! simulator or command-line parser.
//!
//! A folder per concept, and dependencies that run one way (a test below keeps them so):
//!
//! 1. [`config`] and [`store`] (with [`store::keyspace`], every name kept in the store) depend
//!    on nothing else here; [`metrics`], [`request_id`], [`error`] (the one place errors
//!    become OpenAI's shape) and [`telemetry`] (traces) only on those.
//! 2. [`plugins`] (the policy host), [`upstream`] (connections to engines) and [`keys`] (API
//!    keys) build on them; [`cluster`] (connections to the other replicas) on [`upstream`];
//!    [`backends`] on [`upstream`], [`cluster`] and [`plugins`]; [`ledger`] (usage, billing,
//!    rewards) on the store.
//! 3. [`nodes`] (rigs and their tunnels) and [`batch`] (the Batch API) build on those;
//!    [`inference`] is the request path: parse, admit, route, forward, stream, bill.
//!    [`accounts`] (prepaid credits: holds at admission, settlement at the charge) builds on
//!    the store, the plugins' prices and the ledger's events.
//!    [`webhooks`] (events pushed to operators' systems, and the usage export) builds on the
//!    ledger and the store.
//! 4. [`state`] holds one of each; every folder's `api` module (its HTTP handlers) takes the
//!    state; [`http`] assembles the routes and serves connections; [`server`] starts and
//!    stops it all.

pub mod accounts;
pub mod backends;
pub mod batch;
pub mod cluster;
pub mod config;
pub mod console;
pub mod error;
pub mod http;
pub mod inference;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod nodes;
pub mod plugins;
pub mod request_id;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod upstream;
pub mod webhooks;

pub use config::Config;
pub use server::Gateway;

/// The layout's one rule that a compiler does not check: no module depends on itself through
/// others (`crate::` paths, outside tests), so the dependency story above stays true.
#[cfg(test)]
mod layout {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    /// Every module of the crate: its path (`inference::forward`) and its source.
    fn modules() -> BTreeMap<String, String> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&root, &mut files);
        files
            .into_iter()
            .map(|file| {
                let relative = file.strip_prefix(&root).unwrap_or(&file).with_extension("");
                let mut parts: Vec<String> = relative
                    .iter()
                    .map(|part| part.to_string_lossy().into_owned())
                    .collect();
                if parts
                    .last()
                    .is_some_and(|last| last == "mod" || last == "lib")
                {
                    parts.pop();
                }
                let source = std::fs::read_to_string(&file).unwrap_or_default();
                // Tests may reach anywhere.
                let source = match source.find("#[cfg(test)]\nmod ") {
                    Some(at) => source[..at].to_owned(),
                    None => source,
                };
                (parts.join("::"), source)
            })
            .collect()
    }

    #[test]
    fn no_module_depends_on_itself() {
        let modules = modules();
        let resolve = |path: &str| {
            let segments: Vec<&str> = path.split("::").collect();
            (1..=segments.len())
                .rev()
                .map(|n| segments[..n].join("::"))
                .find(|candidate| modules.contains_key(candidate))
        };
        let mut deps: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (module, source) in &modules {
            let mut rest = source.as_str();
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let path: String = rest
                    .chars()
                    .take_while(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == ':'
                    })
                    .collect();
                if let Some(target) = resolve(path.trim_end_matches(':'))
                    && &target != module
                {
                    deps.entry(module).or_default().insert(target);
                }
            }
        }
        // Depth-first search from every module, reporting the first path back to a module.
        fn back_to(
            start: &str,
            at: &str,
            deps: &BTreeMap<&str, BTreeSet<String>>,
            path: &mut Vec<String>,
            seen: &mut BTreeSet<String>,
        ) -> bool {
            for next in deps.get(at).into_iter().flatten() {
                path.push(next.clone());
                if next == start
                    || (seen.insert(next.clone()) && back_to(start, next, deps, path, seen))
                {
                    return true;
                }
                path.pop();
            }
            false
        }
        for module in modules.keys() {
            let mut path = vec![module.clone()];
            if back_to(module, module, &deps, &mut path, &mut BTreeSet::new()) {
                panic!("a module cycle: {}", path.join(" -> "));
            }
        }
        assert!(modules.len() > 30, "found {} modules", modules.len());
    }
}
