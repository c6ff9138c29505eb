//! A policy project on disk: the templates `garage plugin new` writes, and the manifest
//! (`garage-plugin.json`) that tells `build` and `test` its slot, language and where the SDK is.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The file at the root of every generated project.
pub const MANIFEST: &str = "garage-plugin.json";

/// The sample calls `garage plugin test` makes to the component.
pub const SAMPLES: &str = "samples.json";

/// Where the built component goes, inside the project.
pub const DIST: &str = "dist";

/// Tool state of the CLI inside a project (stamps, the component check script).
pub const STATE: &str = ".garage";

/// A policy slot of the gateway: the WIT world its component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Slot {
    Router,
    RateLimiter,
    Meter,
    Reward,
}

impl Slot {
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Router => "router",
            Slot::RateLimiter => "rate-limiter",
            Slot::Meter => "meter",
            Slot::Reward => "reward",
        }
    }

    /// The folder under `wit/` holding the newest contract the gateway loads for this slot
    /// (what the SDKs build against, plugin-sdk/README.md).
    pub fn wit_version(self) -> &'static str {
        match self {
            Slot::Meter | Slot::Reward => "v0.5",
            Slot::Router | Slot::RateLimiter => "v0.4",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The language a policy is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lang {
    Rust,
    Python,
    #[value(alias = "javascript")]
    Js,
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
        })
    }
}

/// `garage-plugin.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub slot: Slot,
    pub lang: Lang,
    /// The Garage repository's `plugin-sdk` folder (absolute).
    pub sdk: PathBuf,
    /// The WIT folder the component is built against (absolute).
    pub wit: PathBuf,
}

/// A project: its folder and manifest.
#[derive(Debug, Clone)]
pub struct Project {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Project {
    pub fn open(dir: &Path) -> anyhow::Result<Project> {
        // Absolute: tools run inside the folder, and messages name it in full.
        let dir = &std::fs::canonicalize(dir)
            .with_context(|| format!("no project folder {}", dir.display()))?;
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a policy project: no {MANIFEST} (make one with `garage plugin new`)",
                dir.display()
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid {MANIFEST}", path.display()))?;
        Ok(Project {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// `dist/<name>.wasm`.
    pub fn component(&self) -> PathBuf {
        self.dir
            .join(DIST)
            .join(format!("{}.wasm", self.manifest.name))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(STATE)
    }
}

/// One template: files and their text with `{{placeholders}}`.
type Template = &'static [(&'static str, &'static str)];

macro_rules! template {
    ($lang:literal, $slot:literal, [$($file:literal $(as $name:literal)?),* $(,)?]) => {
        &[$((
            template!(@name $file $(, $name)?),
            include_str!(concat!("../../templates/", $lang, "/", $slot, "/", $file)),
        )),*]
    };
    // A language's files that are the same whatever the slot.
    ($lang:literal, [$($file:literal $(as $name:literal)?),* $(,)?]) => {
        &[$((
            template!(@name $file $(, $name)?),
            include_str!(concat!("../../templates/", $lang, "/", $file)),
        )),*]
    };
    (@name $file:literal) => { $file };
    (@name $file:literal, $name:literal) => { $name };
}

const SAMPLES_REWARD: &str = include_str!("../../templates/reward.samples.json");
const SAMPLES_METER: &str = include_str!("../../templates/meter.samples.json");
const SAMPLES_ROUTER: &str = include_str!("../../templates/router.samples.json");
const SAMPLES_RATE_LIMITER: &str = include_str!("../../templates/rate-limiter.samples.json");

const RUST_COMMON: Template = template!("rust", [
    "Cargo.toml", "rust-toolchain.toml", "gitignore" as ".gitignore",
]);
const PYTHON_COMMON: Template = template!("python", [
    "pytest.ini", "requirements.txt", "gitignore" as ".gitignore",
]);
const JS_COMMON: Template = template!("js", [
    "build.mjs", "package.json", "gitignore" as ".gitignore",
]);

const RUST_REWARD: Template = template!("rust", "reward", ["src/lib.rs", "src/tests.rs",]);
const PYTHON_REWARD: Template = template!(
    "python",
    "reward",
    ["policy.py", "app.py", "test_policy.py",]
);
const JS_REWARD: Template = template!(
    "js",
    "reward",
    ["policy.js", "component.js", "policy.test.mjs",]
);

const RUST_METER: Template = template!("rust", "meter", ["src/lib.rs", "src/tests.rs",]);
const PYTHON_METER: Template = template!(
    "python",
    "meter",
    ["policy.py", "app.py", "test_policy.py",]
);
const JS_METER: Template = template!(
    "js",
    "meter",
    ["policy.js", "component.js", "policy.test.mjs",]
);

const RUST_ROUTER: Template = template!("rust", "router", ["src/lib.rs", "src/tests.rs",]);
const RUST_RATE_LIMITER: Template =
    template!("rust", "rate-limiter", ["src/lib.rs", "src/tests.rs",]);

const PYTHON_ROUTER: Template = template!(
    "python",
    "router",
    ["policy.py", "app.py", "test_policy.py",]
);
const PYTHON_RATE_LIMITER: Template = template!(
    "python",
    "rate-limiter",
    ["policy.py", "app.py", "test_policy.py",]
);

const JS_ROUTER: Template = template!(
    "js",
    "router",
    ["policy.js", "component.js", "policy.test.mjs",]
);
const JS_RATE_LIMITER: Template = template!(
    "js",
    "rate-limiter",
    ["policy.js", "component.js", "policy.test.mjs",]
);

/// The template of a language and slot, with its sample calls.
fn template(lang: Lang, slot: Slot) -> (Template, &'static str) {
    match (lang, slot) {
        (Lang::Rust, Slot::Reward) => (RUST_REWARD, SAMPLES_REWARD),
        (Lang::Python, Slot::Reward) => (PYTHON_REWARD, SAMPLES_REWARD),
        (Lang::Js, Slot::Reward) => (JS_REWARD, SAMPLES_REWARD),
        (Lang::Rust, Slot::Meter) => (RUST_METER, SAMPLES_METER),
        (Lang::Python, Slot::Meter) => (PYTHON_METER, SAMPLES_METER),
        (Lang::Js, Slot::Meter) => (JS_METER, SAMPLES_METER),
        (Lang::Rust, Slot::Router) => (RUST_ROUTER, SAMPLES_ROUTER),
        (Lang::Rust, Slot::RateLimiter) => (RUST_RATE_LIMITER, SAMPLES_RATE_LIMITER),
        (Lang::Python, Slot::Router) => (PYTHON_ROUTER, SAMPLES_ROUTER),
        (Lang::Python, Slot::RateLimiter) => (PYTHON_RATE_LIMITER, SAMPLES_RATE_LIMITER),
        (Lang::Js, Slot::Router) => (JS_ROUTER, SAMPLES_ROUTER),
        (Lang::Js, Slot::RateLimiter) => (JS_RATE_LIMITER, SAMPLES_RATE_LIMITER),
    }
}

/// A project name: it becomes a crate, an npm package and a file name, so lower-case letters,
/// digits and inner dashes, starting with a letter.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && !name.contains("--")
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!(
            "bad name {name:?}: use 1 to 64 lower-case letters, digits and single dashes, \
             starting with a letter (it names the crate or package and the component file)"
        );
    }
    Ok(())
}

/// The SDK folder: `--sdk` (or GARAGE_PLUGIN_SDK), else the `plugin-sdk` of the repository
/// this binary was built from. Checked to hold the three libraries and the WIT beside it.
pub fn find_sdk(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk");
    let (path, how) = match given {
        Some(path) => (path.to_path_buf(), "--sdk"),
        None => (
            built_from,
            "the repository this garage was built from; pass --sdk PATH/plugin-sdk",
        ),
    };
    let sdk = std::fs::canonicalize(&path)
        .with_context(|| format!("the Garage SDK is not at {} ({how})", path.display()))?;
    for inside in [
        "Cargo.toml",
        "python/garage_policy/__init__.py",
        "js/package.json",
        "../wit",
    ] {
        if !sdk.join(inside).exists() {
            bail!(
                "{} is not the Garage SDK (the repository's plugin-sdk folder): it has no {inside} ({how})",
                sdk.display()
            );
        }
    }
    // The path goes into TOML, JSON, an ini file and JavaScript strings as written.
    let text = sdk.to_string_lossy();
    if text.contains(['"', '\\', '\'', '\n']) || sdk.to_str().is_none() {
        bail!(
            "the SDK path {} has a quote, a backslash, a line break or non-UTF-8 in it, which the \
             project files cannot hold: move the repository",
            sdk.display()
        );
    }
    Ok(sdk)
}

/// Writes a new project into `dir` (which must not exist, or be empty).
pub fn create(
    dir: &Path,
    name: &str,
    slot: Slot,
    lang: Lang,
    sdk: &Path,
) -> anyhow::Result<Project> {
    check_name(name)?;
    let (files, samples) = template(lang, slot);
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_none();
        if !empty {
            bail!(
                "{} exists and is not empty: choose another name or --dir",
                dir.display()
            );
        }
    }
    let repo = sdk.parent().context("the SDK folder has no parent")?;
    let wit = repo.join("wit").join(slot.wit_version());
    let manifest = Manifest {
        name: name.to_owned(),
        slot,
        lang,
        sdk: sdk.to_path_buf(),
        wit,
    };
    let sdk_text = sdk.to_string_lossy();
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{sdk}}", &sdk_text)
            .replace("{{world}}", slot.as_str())
            .replace("{{rust_channel}}", &rust_channel(repo))
    };
    let common = match lang {
        Lang::Rust => RUST_COMMON,
        Lang::Python => PYTHON_COMMON,
        Lang::Js => JS_COMMON,
    };
    for (path, text) in common.iter().chain(files).copied() {
        write(&dir.join(path), &fill(text))?;
    }
    write(&dir.join(SAMPLES), samples)?;
    write(
        &dir.join(MANIFEST),
        &format!("{}\n", serde_json::to_string_pretty(&manifest)?),
    )?;
    // A Rust project starts from the lockfile the SDK's own plugins are tested with, so its
    // first build resolves the same versions (cargo drops what the project does not use).
    let guests_lock = repo.join("plugins/guests/Cargo.lock");
    if lang == Lang::Rust && guests_lock.is_file() {
        std::fs::copy(&guests_lock, dir.join("Cargo.lock"))
            .with_context(|| format!("cannot copy {}", guests_lock.display()))?;
    }
    Ok(Project {
        dir: dir.to_path_buf(),
        manifest,
    })
}

/// The repository's pinned Rust toolchain (`rust-toolchain.toml`), else `stable`.
fn rust_channel(repo: &Path) -> String {
    std::fs::read_to_string(repo.join("rust-toolchain.toml"))
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let value = line
                    .trim()
                    .strip_prefix("channel")?
                    .trim()
                    .strip_prefix('=')?;
                Some(value.trim().trim_matches('"').to_owned())
            })
        })
        .filter(|channel| !channel.is_empty())
        .unwrap_or_else(|| "stable".to_owned())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_become_crates_and_packages() {
        for good in ["a", "pay-verified", "reward2", "x-1-y"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Pay",
            "1st",
            "-a",
            "a-",
            "a--b",
            "a_b",
            "a b",
            "../x",
            &"a".repeat(65),
        ] {
            let err = check_name(bad).expect_err(bad);
            assert!(err.to_string().contains("lower-case"), "{err}");
        }
    }

    #[test]
    fn every_template_fills_its_placeholders() {
        let sdk = find_sdk(None).expect("the repository's SDK");
        for (lang, slot) in [Lang::Rust, Lang::Python, Lang::Js]
            .into_iter()
            .flat_map(|lang| {
                [Slot::Reward, Slot::Meter, Slot::Router, Slot::RateLimiter]
                    .map(|slot| (lang, slot))
            })
        {
            let dir = std::env::temp_dir().join(format!(
                "garage-cli-template-{}-{lang:?}-{slot}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let project = create(&dir, "pay-me", slot, lang, &sdk).expect("created");
            assert_eq!(
                Project::open(&dir).expect("opens").manifest,
                project.manifest
            );
            for entry in walk(&dir) {
                let text = std::fs::read_to_string(&entry).unwrap_or_default();
                assert!(
                    !text.contains("{{"),
                    "{} keeps a placeholder",
                    entry.display()
                );
            }
            assert!(project.manifest.wit.join("policy.wit").is_file());
            // A second `new` into the same folder is refused.
            let err = create(&dir, "pay-me", slot, lang, &sdk).expect_err("exists");
            assert!(err.to_string().contains("not empty"), "{err}");
            std::fs::remove_dir_all(&dir).expect("cleaned up");
        }
    }

    #[test]
    fn an_sdk_elsewhere_must_be_the_sdk() {
        let err = find_sdk(Some(Path::new("/nonexistent/plugin-sdk"))).expect_err("missing");
        assert!(err.to_string().contains("--sdk"), "{err}");
        let err = find_sdk(Some(Path::new(env!("CARGO_MANIFEST_DIR")))).expect_err("the cli");
        assert!(err.to_string().contains("is not the Garage SDK"), "{err}");
    }

    #[test]
    fn a_manifest_must_be_one() {
        let dir = std::env::temp_dir().join(format!("garage-cli-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let err = Project::open(&dir).expect_err("none");
        assert!(format!("{err:#}").contains("garage plugin new"), "{err:#}");
        std::fs::write(dir.join(MANIFEST), r#"{"name": "x", "slot": "rewards"}"#).expect("w");
        let err = Project::open(&dir).expect_err("bad slot");
        assert!(format!("{err:#}").contains("rewards"), "{err:#}");
        std::fs::remove_dir_all(&dir).expect("cleaned up");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).expect("readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }
}
