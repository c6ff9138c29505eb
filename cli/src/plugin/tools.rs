//! What `build` and `test` run: each language's own tools (cargo; componentize-py and pytest in
//! a virtual environment; npm, rolldown, componentize-js and node's test runner), pinned to
//! the versions `scripts/build-plugins-polyglot.sh` builds the repository's examples with, and
//! wasmtime (its Python package) for the component check.
//!
//! The CLI does not link wasmtime itself: that would make `garage` carry a compiler for a
//! command most of its users never run, and the Python package is the engine of the gateway's
//! host too (the same Cranelift code generator and component model).

use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use super::project::{Lang, Project};

/// componentize-py, which makes Python components (bundles CPython: a new version may bring
/// another CPython and WASI).
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// The wasmtime Python package, which runs the component check.
pub const WASMTIME_PY: &str = "50.0.1";
/// componentize-js, which makes JavaScript components (StarlingMonkey).
pub const COMPONENTIZE_JS: &str = "0.23.0";
/// rolldown, which bundles a JavaScript policy with its library for componentize-js.
pub const ROLLDOWN: &str = "1.3.2";

const CHECK_SCRIPT: &str = include_str!("../../templates/run_component.py");

/// Tools fetched elsewhere to reuse, instead of installing them into the project.
#[derive(Debug, Clone, Default)]
pub struct Reuse {
    /// A Python virtual environment with componentize-py, pytest and wasmtime at the pinned
    /// versions (the repository's `.venv-plugins`).
    pub venv: Option<PathBuf>,
    /// A node_modules with componentize-js and rolldown at the pinned versions (the
    /// repository's `plugins/js/reward/node_modules`).
    pub node_modules: Option<PathBuf>,
}

/// Runs a command in the project, its output on stderr (stdout is for what scripts read).
fn run(project: &Project, what: &str, command: &mut Command) -> anyhow::Result<()> {
    command
        .current_dir(&project.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()));
    let status = command
        .status()
        .with_context(|| format!("cannot run {:?} ({what})", command.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs the policy's native tests: `cargo test`, pytest or `node --test`.
pub fn native_tests(project: &Project, reuse: &Reuse) -> anyhow::Result<()> {
    match project.manifest.lang {
        Lang::Rust => run(project, "cargo test", Command::new("cargo").arg("test")),
        Lang::Python => {
            let python = python(project, reuse, PythonUse::Build)?;
            run(
                project,
                "pytest",
                Command::new(python).args(["-m", "pytest", "-q", "-p", "no:cacheprovider"]),
            )
        }
        Lang::Js => {
            node_modules(project, reuse)?;
            let mut tests: Vec<String> = std::fs::read_dir(&project.dir)
                .with_context(|| format!("cannot read {}", project.dir.display()))?
                .flatten()
                .filter_map(|entry| entry.file_name().into_string().ok())
                .filter(|name| name.ends_with(".test.mjs") || name.ends_with(".test.js"))
                .collect();
            tests.sort();
            if tests.is_empty() {
                bail!("no tests: node --test runs the project's *.test.mjs files");
            }
            run(
                project,
                "node --test",
                Command::new("node").arg("--test").args(&tests),
            )
        }
    }
}

/// Builds the component into `dist/<name>.wasm`; its path.
pub fn build(project: &Project, reuse: &Reuse) -> anyhow::Result<PathBuf> {
    let output = project.component();
    let dist = output.parent().context("dist folder")?;
    std::fs::create_dir_all(dist).with_context(|| format!("cannot create {}", dist.display()))?;
    let manifest = &project.manifest;
    let world = manifest.slot.as_str();
    match manifest.lang {
        Lang::Rust => {
            run(
                project,
                "cargo build --release --target wasm32-wasip2",
                Command::new("cargo").args(["build", "--release", "--target", "wasm32-wasip2"]),
            )?;
            let target = match std::env::var_os("CARGO_TARGET_DIR") {
                Some(dir) => project.dir.join(dir),
                None => project.dir.join("target"),
            };
            let built = target
                .join("wasm32-wasip2/release")
                .join(format!("{}.wasm", manifest.name.replace('-', "_")));
            std::fs::copy(&built, &output).with_context(|| {
                format!("cannot copy {} to {}", built.display(), output.display())
            })?;
        }
        Lang::Python | Lang::Js => {
            // componentize takes seconds: skip it while nothing it reads has changed.
            let library = manifest.sdk.join(match manifest.lang {
                Lang::Python => "python",
                _ => "js",
            });
            let stamp = inputs_hash(&[&project.dir, &library, &manifest.wit])?;
            let stamp_file = project.state_dir().join("build.stamp");
            let current = std::fs::read_to_string(&stamp_file).unwrap_or_default();
            if output.is_file() && current.trim() == stamp {
                eprintln!("{} is up to date", output.display());
                return Ok(output);
            }
            let _ = std::fs::remove_file(&stamp_file);
            let partial = output.with_extension("wasm.part");
            if manifest.lang == Lang::Python {
                let python = python(project, reuse, PythonUse::Build)?;
                let componentize = python.with_file_name("componentize-py");
                // VIRTUAL_ENV would make componentize-py bundle that venv's site-packages.
                run(
                    project,
                    "componentize-py",
                    Command::new(componentize)
                        .env_remove("VIRTUAL_ENV")
                        .arg("-d")
                        .arg(&manifest.wit)
                        .args(["-w", world, "componentize", "app", "-p", "."])
                        .arg("-p")
                        .arg(&library)
                        .arg("--stub-wasi")
                        .arg("-o")
                        .arg(&partial),
                )?;
            } else {
                node_modules(project, reuse)?;
                run(
                    project,
                    "node build.mjs (rolldown and componentize-js)",
                    Command::new("node")
                        .arg("build.mjs")
                        .arg(&manifest.wit)
                        .arg(&partial),
                )?;
            }
            std::fs::rename(&partial, &output)
                .with_context(|| format!("cannot write {}", output.display()))?;
            write_state(project, "build.stamp", &stamp)?;
        }
    }
    Ok(output)
}

/// Loads `component` in wasmtime and makes the sample calls of `samples`; whether every call
/// answered what it expects.
pub fn check_component(
    project: &Project,
    reuse: &Reuse,
    component: &Path,
    samples: &Path,
) -> anyhow::Result<bool> {
    let python = python(project, reuse, PythonUse::Check)?;
    let script = write_state(project, "run_component.py", CHECK_SCRIPT)?;
    let status = Command::new(python)
        .current_dir(&project.dir)
        .arg(script)
        .arg(project.manifest.slot.as_str())
        .arg(component)
        .arg(samples)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .context("cannot run the component check")?;
    match status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!("the component check could not run ({status})"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PythonUse {
    /// componentize-py and pytest (a Python project).
    Build,
    /// wasmtime only.
    Check,
}

/// The Python of the virtual environment to use: the one to reuse, or the project's `.venv`,
/// created and given the pinned packages on first use (and again when they change).
fn python(project: &Project, reuse: &Reuse, purpose: PythonUse) -> anyhow::Result<PathBuf> {
    if let Some(venv) = &reuse.venv {
        let python = venv.join("bin/python");
        if !python.is_file() {
            bail!(
                "{} is not a Python virtual environment (no bin/python)",
                venv.display()
            );
        }
        if purpose == PythonUse::Build && project.manifest.lang == Lang::Python {
            let output = Command::new(venv.join("bin/componentize-py"))
                .arg("--version")
                .output()
                .with_context(|| format!("no componentize-py in {}", venv.display()))?;
            let version = String::from_utf8_lossy(&output.stdout);
            if !version.contains(COMPONENTIZE_PY) {
                bail!(
                    "{} has componentize-py {}, this garage builds with {COMPONENTIZE_PY}",
                    venv.display(),
                    version.trim()
                );
            }
        }
        return Ok(python);
    }
    let requirements = match project.manifest.lang {
        Lang::Python => std::fs::read_to_string(project.dir.join("requirements.txt"))
            .context("cannot read requirements.txt")?,
        // Rust and JavaScript projects need Python only for the wasmtime check.
        Lang::Rust | Lang::Js => format!("wasmtime=={WASMTIME_PY}\n"),
    };
    let venv = project.dir.join(".venv");
    let python = venv.join("bin/python");
    if !python.is_file() {
        eprintln!("creating {}", venv.display());
        run(
            project,
            "python3 -m venv .venv",
            Command::new("python3").args(["-m", "venv", ".venv"]),
        )?;
    }
    let stamp = format!("{:016x}", hash_bytes(requirements.as_bytes()));
    let stamp_file = venv.join(".garage-requirements");
    if std::fs::read_to_string(&stamp_file).unwrap_or_default() != stamp {
        let file = write_state(project, "requirements.txt", &requirements)?;
        eprintln!(
            "installing the pinned Python packages into {}",
            venv.display()
        );
        run(
            project,
            "pip install",
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(file),
        )?;
        std::fs::write(&stamp_file, &stamp)
            .with_context(|| format!("cannot write {}", stamp_file.display()))?;
    }
    Ok(python)
}

/// Makes sure the project has its node_modules: a link to the one to reuse, or `npm install`
/// of package.json's exact versions (it writes package-lock.json, which `npm ci` then follows).
fn node_modules(project: &Project, reuse: &Reuse) -> anyhow::Result<()> {
    let here = project.dir.join("node_modules");
    if let Some(shared) = &reuse.node_modules {
        for (package, pinned) in [
            ("@bytecodealliance/componentize-js", COMPONENTIZE_JS),
            ("rolldown", ROLLDOWN),
        ] {
            let version = package_version(&shared.join(package))?;
            if version != pinned {
                bail!(
                    "{} has {package} {version}, this garage builds with {pinned}",
                    shared.display()
                );
            }
        }
        if !here.exists() {
            let shared = std::fs::canonicalize(shared)
                .with_context(|| format!("{} does not exist", shared.display()))?;
            std::os::unix::fs::symlink(&shared, &here).with_context(|| {
                format!("cannot link {} to {}", here.display(), shared.display())
            })?;
        }
        return Ok(());
    }
    let package_json =
        std::fs::read(project.dir.join("package.json")).context("cannot read package.json")?;
    let stamp = format!("{:016x}", hash_bytes(&package_json));
    let stamp_file = project.state_dir().join("npm.stamp");
    let current = std::fs::read_to_string(&stamp_file).unwrap_or_default();
    if here.is_dir() && current == stamp {
        return Ok(());
    }
    let lockfile = project.dir.join("package-lock.json").is_file();
    let (what, args): (&str, &[&str]) = if lockfile && current.is_empty() {
        (
            "npm ci",
            &["ci", "--no-audit", "--no-fund", "--loglevel=error"],
        )
    } else {
        (
            "npm install",
            &["install", "--no-audit", "--no-fund", "--loglevel=error"],
        )
    };
    eprintln!("{what}: the pinned componentize-js {COMPONENTIZE_JS} and rolldown {ROLLDOWN}");
    run(project, what, Command::new("npm").args(args))?;
    write_state(project, "npm.stamp", &stamp)?;
    Ok(())
}

fn package_version(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("package.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    json["version"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{} has no version", path.display()))
}

/// Writes a file under the project's `.garage/`; its path.
fn write_state(project: &Project, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let dir = project.state_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Folders and files that are the tools' or the build's, never a build's input.
fn skipped(name: &str) -> bool {
    matches!(
        name,
        ".venv" | "node_modules" | "dist" | "target" | ".garage" | "__pycache__" | ".git"
    )
}

/// A hash of every file under `roots` (names and contents, in a fixed order): a build's inputs
/// for its up-to-date stamp. Not a security boundary, so the standard library's hasher does.
fn inputs_hash(roots: &[&Path]) -> anyhow::Result<String> {
    let mut hasher = DefaultHasher::new();
    for root in roots {
        let mut pending = vec![root.to_path_buf()];
        let mut files = Vec::new();
        // WIT folders link to each other (`deps/`): each folder is read once.
        let mut seen = std::collections::HashSet::new();
        while let Some(dir) = pending.pop() {
            if !seen.insert(std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone())) {
                continue;
            }
            for entry in std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read {}", dir.display()))?
                .flatten()
            {
                let name = entry.file_name();
                if skipped(&name.to_string_lossy()) {
                    continue;
                }
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        files.sort();
        for file in files {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            hasher.write(file.to_string_lossy().as_bytes());
            hasher.write_u64(hash_bytes(&bytes));
        }
    }
    Ok(format!("{:016x}", hasher.finish()))
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(bytes);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_file(path: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
    }

    /// The pins here, in the templates and in the repository's examples (which
    /// scripts/build-plugins-polyglot.sh builds) are the same versions.
    #[test]
    fn the_pins_are_the_repository_examples_pins() {
        for requirements in [
            repo_file("plugins/python/reward/requirements.txt"),
            repo_file("cli/templates/python/requirements.txt"),
        ] {
            assert!(requirements.contains(&format!("componentize-py=={COMPONENTIZE_PY}\n")));
            assert!(requirements.contains(&format!("wasmtime=={WASMTIME_PY}\n")));
        }
        for package in [
            repo_file("plugins/js/reward/package.json"),
            repo_file("cli/templates/js/package.json"),
        ] {
            let json: serde_json::Value = serde_json::from_str(&package).expect("JSON");
            let dev = &json["devDependencies"];
            assert_eq!(dev["@bytecodealliance/componentize-js"], COMPONENTIZE_JS);
            assert_eq!(dev["rolldown"], ROLLDOWN);
            assert_eq!(
                dev["@bytecodealliance/preview2-shim"],
                repo_file("plugins/js/reward/package.json")
                    .parse::<serde_json::Value>()
                    .expect("JSON")["devDependencies"]["@bytecodealliance/preview2-shim"]
            );
        }
    }

    #[test]
    fn the_inputs_hash_follows_contents_not_tool_folders() {
        let dir = std::env::temp_dir().join(format!("garage-cli-hash-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("node_modules")).expect("dir");
        std::fs::write(dir.join("policy.js"), "a").expect("write");
        let first = inputs_hash(&[&dir]).expect("hash");
        std::fs::write(dir.join("node_modules/x.js"), "tool").expect("write");
        assert_eq!(inputs_hash(&[&dir]).expect("hash"), first);
        std::fs::write(dir.join("policy.js"), "b").expect("write");
        let second = inputs_hash(&[&dir]).expect("hash");
        assert_ne!(second, first);
        // A link to a folder above (as wit/v0.5/deps/garage-policy-0.2.0 -> ../..) is read once.
        std::os::unix::fs::symlink(".", dir.join("up")).expect("link");
        assert!(inputs_hash(&[&dir]).is_ok());
        std::fs::remove_dir_all(&dir).expect("cleaned up");
    }
}
