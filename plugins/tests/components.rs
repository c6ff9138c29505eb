//! The built components, checked without a runtime: each is a valid component of its world,
//! imports nothing beyond the `garage:policy` interfaces and the WASI ones Rust's `std` links,
//! and stays small. (Running them is the gateway's plugin host's business.)

use wasmparser::{ComponentTypeRef, Encoding, Parser, Payload, Validator};

/// The functions a component of `world` exports.
/// The exports of component `name` of `world`: a meter of `garage:policy@0.5.0` (the SDK's)
/// quotes too; the fixtures standing for older meters do not.
fn world_exports(name: &str, world: &str) -> &'static [&'static str] {
    match world {
        "router" => &["route"],
        "rate-limiter" => &["admit", "settle"],
        "meter" if matches!(name, "fixture-meter-v0-3" | "fixture-meter-v0-4") => &["charge"],
        "meter" => &["charge", "quote"],
        "reward" => &["on-usage", "on-report"],
        other => panic!("unknown world {other}"),
    }
}

/// Import prefixes a component may have. `wasi:io` and `wasi:cli` come from Rust's `std` on
/// `wasm32-wasip2` (panic messages go to stderr); anything else (files, sockets, clocks,
/// randomness...) would mean a plugin reaches past the contract.
const ALLOWED_IMPORTS: &[&str] = &["garage:policy/", "wasi:io/", "wasi:cli/"];

/// DESIGN.md measured a 44 KB Rust router; compile and instantiation time grow with size. The
/// largest default is about 120 KB today: twice that leaves room, and catches a dependency
/// that drags in a lot.
const MAX_DEFAULT_PLUGIN_BYTES: usize = 256 * 1024;

/// Top-level import and export names of a component.
struct Surface {
    /// Imported instances and functions; type imports (the world's `use`d records, such as
    /// `route-request`) are left out: they grant nothing.
    imports: Vec<String>,
    exports: Vec<String>,
}

fn surface(name: &str, bytes: &[u8]) -> Surface {
    let mut surface = Surface {
        imports: Vec::new(),
        exports: Vec::new(),
    };
    // Nested core modules and components have sections of their own: only depth 1 counts.
    let mut depth = 0;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.unwrap_or_else(|e| panic!("{name}: {e}")) {
            Payload::Version { encoding, .. } => {
                if depth == 0 {
                    assert_eq!(encoding, Encoding::Component, "{name} is not a component");
                }
                depth += 1;
            }
            Payload::End(_) => depth -= 1,
            Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    let import = import.unwrap_or_else(|e| panic!("{name}: {e}"));
                    if !matches!(import.ty, ComponentTypeRef::Type(_)) {
                        surface.imports.push(import.name.name.to_owned());
                    }
                }
            }
            Payload::ComponentExportSection(reader) if depth == 1 => {
                for export in reader {
                    let export = export.unwrap_or_else(|e| panic!("{name}: {e}"));
                    surface.exports.push(export.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    surface
}

fn every_component() -> impl Iterator<Item = (&'static str, &'static [u8])> {
    garage_plugins::all()
        .iter()
        .chain(garage_plugins::fixtures::all())
        .copied()
}

#[test]
fn every_component_is_valid_and_exports_exactly_its_world() {
    for (name, bytes) in every_component() {
        Validator::new()
            .validate_all(bytes)
            .unwrap_or_else(|e| panic!("{name} is not a valid component: {e}"));
        let world = garage_plugins::world(name).unwrap_or_else(|| panic!("{name} has no world"));
        let mut exports = surface(name, bytes).exports;
        exports.sort();
        let mut expected: Vec<String> = world_exports(name, world)
            .iter()
            .map(|s| s.to_string())
            .collect();
        expected.sort();
        assert_eq!(exports, expected, "{name} should export the {world} world");
    }
}

#[test]
fn components_import_only_the_policy_interfaces_and_what_std_needs() {
    let round_robin = surface("router-round-robin", garage_plugins::ROUTER_ROUND_ROBIN);
    assert!(
        round_robin
            .imports
            .contains(&"garage:policy/kv@0.2.0".to_owned()),
        "the parser sees imports: {:?}",
        round_robin.imports
    );
    for (name, bytes) in every_component() {
        for import in surface(name, bytes).imports {
            assert!(
                ALLOWED_IMPORTS
                    .iter()
                    .any(|prefix| import.starts_with(prefix)),
                "{name} imports {import}"
            );
            // Every interface is 0.2.0's but 0.5.0's `market`; 0.3.0 to 0.7.0 add the records
            // of their `types` (the SDK's components carry those imports whatever their world).
            if import.starts_with("garage:") {
                assert!(
                    import.ends_with("@0.2.0")
                        || import == "garage:policy/types@0.3.0"
                        || import == "garage:policy/types@0.4.0"
                        || import == "garage:policy/types@0.5.0"
                        || import == "garage:policy/types@0.6.0"
                        || import == "garage:policy/types@0.7.0"
                        || import == "garage:policy/market@0.5.0",
                    "{name} imports {import}"
                );
            }
            // `market` belongs to the meter world alone.
            if import.starts_with("garage:policy/market") {
                assert_eq!(garage_plugins::world(name), Some("meter"), "{name}");
            }
            // `candidates` belongs to the router world alone: a meter importing it would not
            // link against its own world.
            if import.starts_with("garage:policy/candidates") {
                assert_eq!(garage_plugins::world(name), Some("router"), "{name}");
            }
        }
    }
}

#[test]
fn default_plugins_stay_small() {
    for (name, bytes) in garage_plugins::all() {
        eprintln!("{name}: {} bytes", bytes.len());
        assert!(
            bytes.len() <= MAX_DEFAULT_PLUGIN_BYTES,
            "{name} is {} bytes, over {MAX_DEFAULT_PLUGIN_BYTES}",
            bytes.len()
        );
    }
}

#[test]
fn the_catalogue_names_every_component_once() {
    let mut names: Vec<&str> = every_component().map(|(name, _)| name).collect();
    let count = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), count);
    assert_eq!(count, 18);
}
