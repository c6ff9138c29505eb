//! `garage plugin`: a policy from idea to live on a gateway. `new` writes a project from a
//! template, `test` runs its native tests and its component in wasmtime, `build` makes the
//! component, and `replay`, `push`, `promote`, `rollback` and `status` drive the gateway's
//! admin API (`/admin/plugins`).

mod admin;
mod project;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::client::GatewayUrl;
pub use project::{Lang, Slot};

/// The exit status of `garage plugin test` when a test or a sample call failed.
pub const EXIT_TESTS_FAILED: u8 = 5;

const GUIDE: &str = "\
From idea to live policy (docs/plugins.md has the whole guide):

  garage plugin new reward pay-verified --lang python   # or rust, js
  cd pay-verified                                       # edit policy.py, test_policy.py, samples.json
  garage plugin test                                    # native tests, then the component in wasmtime
  garage plugin build                                   # prints dist/pay-verified.wasm
  garage plugin replay reward dist/pay-verified.wasm    # recorded calls: old answers vs new
  garage plugin push reward dist/pay-verified.wasm --canary 10
  garage plugin status
  garage plugin promote reward                          # or: garage plugin rollback reward

The admin commands need the gateway's admin token: GARAGE_ADMIN_TOKEN, or --admin-token-file.
Exit status: 0 done; 1 an error; 2 a bad command line; 5 a test or sample call failed.";

#[derive(Debug, Subcommand)]
#[command(after_help = GUIDE)]
pub enum PluginCommand {
    /// Write a new policy project: the policy, its native tests, sample calls, build config.
    New(NewArgs),
    /// Build the project's WebAssembly component; prints its path.
    Build(ProjectArgs),
    /// Run the native tests, build, then call the component in wasmtime with sample inputs.
    Test(TestArgs),
    /// Replay the slot's recorded calls on a component: what would change, without serving it.
    Replay(ReplayArgs),
    /// Upload a component to a slot and activate it, outright or as a canary.
    Push(PushArgs),
    /// Make a slot's canary its active version.
    Promote(SlotArgs),
    /// Go back one version in a slot (or drop its canary).
    Rollback(SlotArgs),
    /// Show the slots: active version, canary, history, calls and faults.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The slot the policy fills (templates exist for `reward` and `meter`).
    #[arg(value_enum)]
    slot: Slot,
    /// The project's name: the folder, crate or package, and component file.
    name: String,
    /// The language to write it in.
    #[arg(long, value_enum)]
    lang: Lang,
    /// Where to create it (default: ./NAME).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The Garage repository's plugin-sdk folder. The SDK is not published: projects point at
    /// it by path. Default: the plugin-sdk of the repository this garage was built from.
    #[arg(long, env = "GARAGE_PLUGIN_SDK")]
    sdk: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProjectArgs {
    /// The project folder.
    #[arg(default_value = ".")]
    dir: PathBuf,
    #[command(flatten)]
    reuse: ReuseArgs,
}

#[derive(Debug, Args)]
pub struct ReuseArgs {
    /// Use this Python virtual environment (componentize-py, pytest and wasmtime at the
    /// pinned versions, like the repository's .venv-plugins) instead of the project's .venv.
    #[arg(long, env = "GARAGE_PLUGIN_VENV", help_heading = "Tools")]
    venv: Option<PathBuf>,
    /// Link this node_modules (componentize-js and rolldown at the pinned versions, like the
    /// repository's plugins/js/reward/node_modules) instead of running npm install.
    #[arg(long, env = "GARAGE_PLUGIN_NODE_MODULES", help_heading = "Tools")]
    node_modules: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    #[command(flatten)]
    project: ProjectArgs,
    /// The sample calls (default: the project's samples.json).
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Skip the native tests: only build and call the component.
    #[arg(long)]
    no_native: bool,
    /// Call this component instead of building the project's: one made by another toolchain
    /// (C, Go, Zig...), checked with the project's samples and tools. Skips the native tests.
    #[arg(long, value_name = "FILE.wasm")]
    component: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// A file holding the gateway's admin token (else GARAGE_ADMIN_TOKEN). The token itself is
    /// never an argument, which every local user could read.
    #[arg(long, help_heading = "Gateway")]
    admin_token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SlotArgs {
    #[arg(value_enum)]
    slot: Slot,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    #[arg(value_enum)]
    slot: Slot,
    /// The component (`garage plugin build` prints its path).
    file: PathBuf,
    /// The plugin's configuration: JSON, or @FILE. Default `{}`.
    #[arg(long)]
    config: Option<String>,
    /// Serve this share of the slot's calls (1-100 percent) beside the active version, until
    /// `promote` or `rollback`.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    canary: Option<u8>,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[arg(value_enum)]
    slot: Slot,
    /// The candidate component.
    file: PathBuf,
    /// The candidate's configuration: JSON, or @FILE. Default `{}`.
    #[arg(long)]
    config: Option<String>,
    /// How many recorded calls to replay, newest first (the gateway's default: 1000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
    /// Print the gateway's JSON answer instead of its summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this slot.
    #[arg(value_enum)]
    slot: Option<Slot>,
    /// Print the gateway's JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    admin: AdminArgs,
}

impl ReuseArgs {
    fn reuse(&self) -> tools::Reuse {
        tools::Reuse {
            venv: self.venv.clone(),
            node_modules: self.node_modules.clone(),
        }
    }
}

pub async fn run(url: GatewayUrl, command: PluginCommand) -> anyhow::Result<ExitCode> {
    match command {
        PluginCommand::New(args) => new(args),
        PluginCommand::Build(args) => {
            let project = project::Project::open(&args.dir)?;
            let component = tools::build(&project, &args.reuse.reuse())?;
            crate::cli::print_stdout(&format!("{}\n", component.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Test(args) => test(args),
        PluginCommand::Replay(args) => admin::replay(url, args).await,
        PluginCommand::Push(args) => admin::push(url, args).await,
        PluginCommand::Promote(args) => admin::promote(url, args, "promote").await,
        PluginCommand::Rollback(args) => admin::promote(url, args, "rollback").await,
        PluginCommand::Status(args) => admin::status(url, args).await,
    }
}

fn new(args: NewArgs) -> anyhow::Result<ExitCode> {
    let sdk = project::find_sdk(args.sdk.as_deref())?;
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let project = project::create(&dir, &args.name, args.slot, args.lang, &sdk)?;
    let manifest = &project.manifest;
    eprintln!(
        "created {} ({} {} policy on the SDK at {})",
        dir.display(),
        manifest.lang,
        manifest.slot,
        manifest.sdk.display()
    );
    eprintln!(
        "next: cd {} && garage plugin test    (the first run installs the pinned tools)",
        dir.display()
    );
    crate::cli::print_stdout(&format!("{}\n", dir.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let project = project::Project::open(&args.project.dir)?;
    let reuse = args.project.reuse.reuse();
    let samples = match args.samples {
        Some(path) => path,
        None => project.dir.join(project::SAMPLES),
    };
    // Canonical: the check runs in the project folder, whatever the caller's.
    let samples = std::fs::canonicalize(&samples)
        .with_context(|| format!("no sample calls at {}", samples.display()))?;
    let component = match args.component {
        Some(component) => std::fs::canonicalize(&component)
            .with_context(|| format!("no component at {}", component.display()))?,
        None => {
            if !args.no_native {
                eprintln!("native tests");
                if let Err(err) = tools::native_tests(&project, &reuse) {
                    eprintln!("error: {err:#}");
                    return Ok(ExitCode::from(EXIT_TESTS_FAILED));
                }
            }
            eprintln!("building the component");
            tools::build(&project, &reuse)?
        }
    };
    eprintln!("the component in wasmtime, with {}", samples.display());
    if tools::check_component(&project, &reuse, &component, &samples)? {
        eprintln!("all passed: {}", component.display());
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(EXIT_TESTS_FAILED))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::Cli;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("garage").chain(args.iter().copied()))
    }

    #[test]
    fn plugin_command_lines() {
        assert!(parse(&["plugin", "new", "reward", "pay", "--lang", "python"]).is_ok());
        assert!(parse(&["plugin", "new", "reward", "pay", "--lang", "javascript"]).is_ok());
        assert!(parse(&["plugin", "new", "rewards", "pay", "--lang", "rust"]).is_err());
        assert!(parse(&["plugin", "new", "reward", "pay", "--lang", "cobol"]).is_err());
        assert!(
            parse(&["plugin", "new", "reward", "pay"]).is_err(),
            "--lang is needed"
        );
        assert!(parse(&["plugin", "push", "reward", "x.wasm", "--canary", "10"]).is_ok());
        assert!(parse(&["plugin", "push", "reward", "x.wasm", "--canary", "0"]).is_err());
        assert!(parse(&["plugin", "push", "reward", "x.wasm", "--canary", "101"]).is_err());
        assert!(parse(&["plugin", "replay", "meter", "x.wasm", "--limit", "0"]).is_err());
        assert!(parse(&["plugin", "status", "--json"]).is_ok());
        assert!(parse(&["plugin", "promote", "rate-limiter"]).is_ok());
        assert!(parse(&["plugin", "test", "proj", "--no-native"]).is_ok());
        assert!(parse(&["plugin", "test", "--component", "c.wasm"]).is_ok());
    }
}
