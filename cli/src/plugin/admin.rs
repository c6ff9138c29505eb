//! The gateway's admin API for plugins: upload (push), replay, promote, rollback, status.
//!
//! What a script wants goes to stdout (a version's sha256, a replay's summary, JSON); what a
//! person wants goes to stderr.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::Value;

use super::{AdminArgs, PushArgs, ReplayArgs, SlotArgs, StatusArgs};
use crate::cli::print_stdout;
use crate::client::{Client, GatewayUrl};

/// `\0asm`, then the version and layer of a component (a core module has 1, 0, 0, 0).
const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

/// The admin token: `--admin-token-file`, else GARAGE_ADMIN_TOKEN.
fn admin_token(args: &AdminArgs, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<String> {
    let token = match &args.admin_token_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the admin token file {}", path.display()))?
            .trim()
            .to_owned(),
        None => env("GARAGE_ADMIN_TOKEN")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    };
    if token.is_empty() {
        bail!(
            "no admin token: set GARAGE_ADMIN_TOKEN, or pass --admin-token-file (the file the \
             gateway was given, e.g. `gateway demo --admin-token-file`)"
        );
    }
    Ok(token)
}

fn client(url: GatewayUrl, args: &AdminArgs) -> anyhow::Result<Client> {
    let token = admin_token(args, |name| std::env::var(name).ok())?;
    Ok(Client::new(url, token)?)
}

/// A component's bytes, refused early when they are not one.
fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    check_component_header(&bytes)
        .with_context(|| format!("{} cannot be a policy", path.display()))?;
    Ok(bytes)
}

fn check_component_header(bytes: &[u8]) -> anyhow::Result<()> {
    if !bytes.starts_with(&COMPONENT_HEADER[..4]) {
        bail!("it is not WebAssembly (no \\0asm header)");
    }
    if !bytes.starts_with(&COMPONENT_HEADER) {
        bail!(
            "it is a core WebAssembly module, not a component: build it with `garage plugin build` \
             (for Rust, the wasm32-wasip2 target makes components)"
        );
    }
    Ok(())
}

/// `--config`: JSON text or `@FILE`, checked to be JSON before it is sent.
fn config_arg(config: Option<&str>) -> anyhow::Result<Option<String>> {
    let Some(config) = config else {
        return Ok(None);
    };
    let text = match config.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {path}"))?,
        None => config.to_owned(),
    };
    let value: Value =
        serde_json::from_str(&text).context("--config is not JSON (give JSON, or @FILE)")?;
    if !value.is_object() {
        bail!("--config must be a JSON object, got {value}");
    }
    // Compact: it travels in the query string.
    Ok(Some(value.to_string()))
}

fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

fn sha_of(version: &Value) -> &str {
    version["sha256"].as_str().unwrap_or("?")
}

pub async fn push(url: GatewayUrl, args: PushArgs) -> anyhow::Result<ExitCode> {
    let wasm = read_component(&args.file)?;
    let config = config_arg(args.config.as_deref())?;
    let client = client(url, &args.admin)?;
    let mut query = Vec::new();
    if let Some(config) = config {
        query.push(("config", config));
    }
    if let Some(canary) = args.canary {
        query.push(("canary", canary.to_string()));
    }
    let size = wasm.len();
    eprintln!(
        "uploading {} ({size} bytes) to the {} slot; the gateway compiles it first",
        args.file.display(),
        args.slot
    );
    let version = client
        .admin_call(
            Method::PUT,
            &["plugins", args.slot.as_str()],
            &query,
            Some(wasm),
        )
        .await
        .with_context(|| format!("cannot push {} to {}", args.file.display(), args.slot))?;
    let sha = sha_of(&version);
    match args.canary {
        Some(percent) => eprintln!(
            "{}: {} is the canary, serving {percent}% of calls; `garage plugin promote {}` makes it the active version, `garage plugin rollback {}` drops it",
            args.slot,
            short(sha),
            args.slot,
            args.slot
        ),
        None => eprintln!("{}: {} is active", args.slot, short(sha)),
    }
    print_stdout(&format!("{sha}\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// `promote` or `rollback`.
pub async fn promote(url: GatewayUrl, args: SlotArgs, action: &str) -> anyhow::Result<ExitCode> {
    let client = client(url, &args.admin)?;
    let version = client
        .admin_call(
            Method::POST,
            &["plugins", args.slot.as_str(), action],
            &[],
            None,
        )
        .await
        .with_context(|| format!("cannot {action} {}", args.slot))?;
    let sha = sha_of(&version);
    let what = if action == "promote" {
        "promoted"
    } else {
        "rolled back"
    };
    eprintln!("{}: {what}; {} is active", args.slot, short(sha));
    print_stdout(&format!("{sha}\n"))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn replay(url: GatewayUrl, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let wasm = read_component(&args.file)?;
    let config = config_arg(args.config.as_deref())?;
    let client = client(url, &args.admin)?;
    let mut query = Vec::new();
    if let Some(config) = config {
        query.push(("config", config));
    }
    if let Some(limit) = args.limit {
        query.push(("limit", limit.to_string()));
    }
    let answer = client
        .admin_call(
            Method::POST,
            &["plugins", args.slot.as_str(), "replay"],
            &query,
            Some(wasm),
        )
        .await
        .with_context(|| format!("cannot replay {} on {}", args.file.display(), args.slot))?;
    if args.json {
        print_stdout(&format!("{}\n", serde_json::to_string_pretty(&answer)?))?;
        return Ok(ExitCode::SUCCESS);
    }
    match answer["summary"].as_array() {
        Some(lines) => {
            let text: String = lines
                .iter()
                .map(|line| {
                    format!(
                        "{}\n",
                        line.as_str()
                            .map_or_else(|| line.to_string(), str::to_owned)
                    )
                })
                .collect();
            print_stdout(&text)?;
        }
        // An answer without a summary is still worth showing whole.
        None => print_stdout(&format!("{}\n", serde_json::to_string_pretty(&answer)?))?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(url: GatewayUrl, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = client(url, &args.admin)?;
    let list = client
        .admin_call(Method::GET, &["plugins"], &[], None)
        .await
        .context("cannot read the plugin slots")?;
    let slots: Vec<&Value> = list["data"]
        .as_array()
        .context("unexpected answer from the gateway: no `data` list of slots")?
        .iter()
        .filter(|slot| {
            args.slot
                .is_none_or(|wanted| slot["slot"] == wanted.as_str())
        })
        .collect();
    if args.json {
        let shown = match args.slot {
            Some(_) => slots.first().map_or(Value::Null, |slot| (*slot).clone()),
            None => list.clone(),
        };
        print_stdout(&format!("{}\n", serde_json::to_string_pretty(&shown)?))?;
    } else {
        print_stdout(&slots.iter().map(|slot| slot_line(slot)).collect::<String>())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `reward  active 1a2b3c4d5e6f {"x":1}  canary 9f8e7d6c5b4a 10%  2 earlier  120 calls  0 faults`
fn slot_line(slot: &Value) -> String {
    let name = slot["slot"].as_str().unwrap_or("?");
    let active = match &slot["active"] {
        Value::Null => "built-in fallback".to_owned(),
        version => format!("active {} {}", short(sha_of(version)), version["config"]),
    };
    let canary = match &slot["canary"] {
        Value::Null => String::new(),
        canary => format!(
            "  canary {} {}%",
            short(sha_of(canary)),
            canary["percent"].as_u64().unwrap_or(0)
        ),
    };
    let history = slot["history"].as_array().map_or(0, Vec::len);
    let calls = slot["calls"].as_u64().unwrap_or(0);
    let faults: u64 = slot["faults"]
        .as_object()
        .map_or(0, |faults| faults.values().filter_map(Value::as_u64).sum());
    let error = slot["load_error"]
        .as_str()
        .map(|error| format!("  load error: {error}"))
        .unwrap_or_default();
    format!(
        "{name:<12} {active}{canary}  {history} earlier  {calls} calls  {faults} faults{error}\n"
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_components_are_pushed() {
        assert!(check_component_header(&COMPONENT_HEADER).is_ok());
        let module = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
        let err = check_component_header(&module).expect_err("a core module");
        assert!(err.to_string().contains("not a component"), "{err}");
        let err = check_component_header(b"<html>").expect_err("not wasm");
        assert!(err.to_string().contains("not WebAssembly"), "{err}");
        assert!(check_component_header(b"").is_err());
    }

    #[test]
    fn config_is_json_object_or_a_file_of_one() {
        assert_eq!(config_arg(None).expect("none"), None);
        assert_eq!(
            config_arg(Some(r#"{ "a": 1 }"#)).expect("json").as_deref(),
            Some(r#"{"a":1}"#)
        );
        let err = config_arg(Some("{a: 1}")).expect_err("not JSON");
        assert!(err.to_string().contains("not JSON"), "{err}");
        let err = config_arg(Some("[1]")).expect_err("not an object");
        assert!(err.to_string().contains("JSON object"), "{err}");
        let err = config_arg(Some("@/nonexistent/config.json")).expect_err("no file");
        assert!(
            err.to_string().contains("/nonexistent/config.json"),
            "{err}"
        );
    }

    #[test]
    fn the_admin_token_comes_from_a_file_or_the_environment() {
        let none = AdminArgs {
            admin_token_file: None,
        };
        let env = |name: &str| (name == "GARAGE_ADMIN_TOKEN").then(|| " tok \n".to_owned());
        assert_eq!(admin_token(&none, env).expect("env"), "tok");
        let err = admin_token(&none, |_| None).expect_err("none");
        assert!(err.to_string().contains("GARAGE_ADMIN_TOKEN"), "{err}");
        let missing = AdminArgs {
            admin_token_file: Some("/nonexistent/token".into()),
        };
        assert!(admin_token(&missing, env).is_err());
    }

    #[test]
    fn a_slot_in_one_line() {
        let slot = json!({
            "slot": "reward",
            "active": {"sha256": "0123456789abcdef", "config": {"x": 1}},
            "canary": {"sha256": "fedcba9876543210", "percent": 10},
            "history": [{}, {}],
            "calls": 7,
            "faults": {"trap": 1, "timeout": 2},
            "load_error": null
        });
        assert_eq!(
            slot_line(&slot),
            "reward       active 0123456789ab {\"x\":1}  canary fedcba987654 10%  2 earlier  7 calls  3 faults\n"
        );
        let empty = json!({"slot": "router", "active": null, "canary": null, "history": []});
        assert!(slot_line(&empty).contains("built-in fallback"));
    }
}
