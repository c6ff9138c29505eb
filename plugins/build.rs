//! Builds the guests workspace (`guests/`: the default plugins and the hostile fixtures) into
//! `wasm32-wasip2` components, and copies them into `OUT_DIR` for `include_bytes!`.
//!
//! The guests build with a target directory of their own, `<target>/wasm-plugins`: a nested
//! cargo pointed at the outer build's directory would wait forever on the lock the outer cargo
//! holds while it runs this script. The directory is shared by every profile and by
//! check/clippy/test, so only the first build compiles the guests. The same habit as wasmtime's
//! `crates/test-programs/artifacts/build.rs`.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

const TARGET: &str = "wasm32-wasip2";

/// The guests workspace's members: folder under `guests/` and artifact (library) name.
/// `src/lib.rs` includes each `<artifact>.wasm`.
const GUESTS: &[(&str, &str)] = &[
    ("router-round-robin", "router_round_robin"),
    ("router-least-loaded", "router_least_loaded"),
    ("router-prefix-affinity", "router_prefix_affinity"),
    ("rate-limiter", "rate_limiter"),
    ("meter", "meter"),
    ("reward", "reward"),
    ("fixtures/infinite-loop", "fixture_infinite_loop"),
    ("fixtures/memory-bomb", "fixture_memory_bomb"),
    ("fixtures/trap", "fixture_trap"),
    ("fixtures/wrong-world", "fixture_wrong_world"),
    ("fixtures/huge-output", "fixture_huge_output"),
    ("fixtures/picky-meter", "fixture_picky_meter"),
    ("fixtures/meter-v0-3", "fixture_meter_v0_3"),
    ("fixtures/meter-v0-4", "fixture_meter_v0_4"),
    ("fixtures/router-v0-4", "fixture_router_v0_4"),
    ("fixtures/router-says", "fixture_router_says"),
    ("fixtures/limiter-says", "fixture_limiter_says"),
    ("fixtures/limiter-v0-4", "fixture_limiter_v0_4"),
];

/// Settings of the outer build that must not leak into the guests' build: flags meant for the
/// host target (`-C target-cpu=native`, coverage instrumentation), the outer target directory,
/// and clippy's wrapper (the guests are linted by their own workspace).
const OUTER_ONLY_VARS: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_BUILD_DIR",
];

fn main() -> Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    let guests = manifest_dir.join("guests");

    let mut inputs = vec![
        guests.join("Cargo.toml"),
        guests.join("Cargo.lock"),
        manifest_dir.join("../plugin-sdk/Cargo.toml"),
        manifest_dir.join("../plugin-sdk/src"),
        manifest_dir.join("../wit"),
    ];
    for (folder, _) in GUESTS {
        inputs.push(guests.join(folder).join("Cargo.toml"));
        inputs.push(guests.join(folder).join("src"));
    }
    for input in &inputs {
        println!("cargo:rerun-if-changed={}", input.display());
    }

    require_target()?;

    let target_dir = guest_target_dir(&out_dir);
    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cargo
        .args(["build", "--release", "--locked", "--target", TARGET])
        .arg("--manifest-path")
        .arg(guests.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // This script's stdout is read by cargo for `cargo:` directives.
        .stdout(Stdio::from(std::io::stderr()));
    for var in OUTER_ONLY_VARS {
        cargo.env_remove(var);
    }
    for (var, _) in env::vars_os() {
        if var.to_string_lossy().starts_with("CARGO_PROFILE_") {
            cargo.env_remove(var);
        }
    }
    eprintln!("running: {cargo:?}");
    let status = cargo
        .status()
        .context("running cargo to build the guest plugins")?;
    if !status.success() {
        bail!(
            "building the guest plugins failed ({status}); to see why, run in {}: \
             cargo build --release --target {TARGET}",
            guests.display()
        );
    }

    let built = target_dir.join(TARGET).join("release");
    for (_, artifact) in GUESTS {
        let from = built.join(format!("{artifact}.wasm"));
        let to = out_dir.join(format!("{artifact}.wasm"));
        fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// Fails with the fix when the toolchain lacks the guests' target.
fn require_target() -> Result<()> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let output = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .context("asking rustc where the wasm32-wasip2 standard library is")?;
    let libdir = String::from_utf8_lossy(&output.stdout);
    let libdir = Path::new(libdir.trim());
    if !output.status.success() || !libdir.is_dir() {
        bail!(
            "the {TARGET} target is not installed for this toolchain; \
             run `rustup target add {TARGET}` (the guest plugins are built for it)"
        );
    }
    Ok(())
}

/// `<target>/wasm-plugins`: the outer target directory is the nearest ancestor of `OUT_DIR`
/// that cargo tagged with `CACHEDIR.TAG`; failing that, a folder inside `OUT_DIR`.
fn guest_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .unwrap_or(out_dir)
        .join("wasm-plugins")
}
