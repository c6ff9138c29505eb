//! `node-runner setup`: a rig in one command. It finds the GPUs (NVML), asks the container
//! engine whether containers see them (else falls back to the process driver, or to the
//! simulated engine on a machine with no NVIDIA GPU), takes the gateway and an enrollment token
//! (flags, or questions on a terminal), proposes the catalogue's models that fit the GPUs,
//! writes the config, then starts the rig once: it enrolls, the engine comes up and is
//! benchmarked. Last, the systemd unit: installed and started when run as root on a systemd
//! machine, otherwise written with the commands to run printed.
//!
//! Everything lands under `root` (`/` by default): tests give a temporary directory.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::agent::{Agent, AgentError};
use crate::catalogue::{self, SIMULATED_MODEL};
use crate::config::{ConfigError, DEFAULT_DOCKER_IMAGE, NodeConfig};
use crate::engines::EngineSet;
use crate::probe::{self, ContainerEngine, GpuInventory};

/// The config, below the root.
pub const CONFIG_PATH: &str = "etc/node-runner/node-runner.toml";
/// The rig's identity, below the root.
pub const STATE_PATH: &str = "var/lib/node-runner/state.json";
/// The last benchmark, below the root.
pub const BENCHMARK_PATH: &str = "var/lib/node-runner/benchmark.json";
/// Model weights downloaded by containers, below the root.
pub const MODEL_CACHE_PATH: &str = "var/lib/node-runner/hf-cache";
/// The systemd unit, below the root.
pub const UNIT_PATH: &str = "etc/systemd/system/node-runner.service";

/// Tokens the benchmark asks for: enough for a decode speed past the first token's latency.
const BENCHMARK_TOKENS: u32 = 128;

/// What `setup` is told.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Where `/etc` and `/var/lib` are: `/` for real.
    pub root: PathBuf,
    pub gateway_url: Option<String>,
    pub token: Option<String>,
    /// The model to serve; by default the largest of the catalogue that fits.
    pub model: Option<String>,
    pub name: Option<String>,
    /// A private CA the gateway's certificate comes from.
    pub gateway_ca_file: Option<PathBuf>,
    /// Plain http to another machine (a LAN the owner trusts).
    pub allow_insecure_http: bool,
    /// The container engine's socket; by default `DOCKER_HOST` or the local one.
    pub docker_host: Option<String>,
    /// The GPUs, when not read from NVML.
    pub gpus: Option<GpuInventory>,
    /// The engine's port on 127.0.0.1.
    pub port: u16,
    /// Answer yes to every question (overwrite a config, take the proposed model).
    pub yes: bool,
    /// Write the files only: start no engine, enroll nowhere, start no service.
    pub no_start: bool,
    /// Ask on the terminal for what flags did not give (only when stdin is one).
    pub interactive: bool,
    /// The `node-runner` the unit runs.
    pub binary: PathBuf,
}

impl SetupOptions {
    /// Defaults for everything but what the owner must say.
    pub fn new(root: impl Into<PathBuf>) -> SetupOptions {
        SetupOptions {
            root: root.into(),
            gateway_url: None,
            token: None,
            model: None,
            name: None,
            gateway_ca_file: None,
            allow_insecure_http: false,
            docker_host: None,
            gpus: None,
            port: 8001,
            yes: false,
            no_start: false,
            interactive: std::io::stdin().is_terminal(),
            binary: std::env::current_exe().unwrap_or_else(|_| "/usr/local/bin/node-runner".into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Something the owner must give or change; the message says what.
    #[error("{0}")]
    Input(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config would not load: {0}")]
    Config(#[from] ConfigError),
    #[error("gateway_ca_file: {0}")]
    CaFile(#[from] crate::agent::CaFileError),
    #[error("cannot join the gateway: {}", crate::probe::chain(.0))]
    Join(#[from] AgentError),
    #[error(
        "the engine did not answer /health within {0:?}: see the log above, then `node-runner doctor`"
    )]
    Unhealthy(Duration),
    #[error("the benchmark failed: {0}")]
    Benchmark(String),
}

/// How the rig will run its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Choice {
    /// vLLM's container, GPUs passed through.
    Docker,
    /// `vllm serve` from the rig's own Python.
    Process,
    /// No NVIDIA GPU: the simulated engine, for a trial.
    Simulated,
}

/// One benchmark: a short generation on the engine once it is up.
#[derive(Debug, Clone, Serialize)]
pub struct Benchmark {
    pub model: String,
    pub completion_tokens: u64,
    pub seconds: f64,
    /// Completion tokens over the whole request's time (the prompt's prefill included).
    pub tokens_per_sec: f64,
}

/// What `setup` did.
#[derive(Debug)]
pub struct SetupReport {
    pub config_path: PathBuf,
    pub unit_path: PathBuf,
    pub choice: Choice,
    pub model: String,
    pub gpus: Vec<u32>,
    /// The node id, when the rig enrolled.
    pub node_id: Option<String>,
    pub benchmark: Option<Benchmark>,
    /// Whether the service was enabled and started (else its commands were printed).
    pub service_started: bool,
}

/// Runs setup, telling the owner what it does on `out`.
pub async fn setup(
    options: SetupOptions,
    out: &mut (dyn Write + Send),
) -> Result<SetupReport, SetupError> {
    let mut say = |line: String| {
        // Progress lines only: a closed stdout must not stop the setup.
        let _ = writeln!(out, "{line}");
    };
    let root = options.root.clone();
    let config_path = root.join(CONFIG_PATH);
    let unit_path = root.join(UNIT_PATH);
    if root == Path::new("/") && !running_as_root() {
        return Err(SetupError::Input(
            "setup writes /etc and /var/lib: run it as root (sudo node-runner setup …), or \
             pass --root DIR to write below DIR instead"
                .into(),
        ));
    }
    if config_path.exists() && !options.yes && !ask_yes(&options, &config_path)? {
        return Err(SetupError::Input(format!(
            "{} exists: pass --yes to overwrite it (the rig's identity in {} is kept)",
            config_path.display(),
            root.join(STATE_PATH).display()
        )));
    }

    // 1. The GPUs and what can run on them.
    let inventory = options.gpus.clone().unwrap_or_else(GpuInventory::detect);
    say(format!("GPUs: {}", inventory.describe()));
    let choice = if inventory.gpus.is_empty() {
        say("no NVIDIA GPU: this rig will run the simulated engine, for a trial".into());
        Choice::Simulated
    } else {
        match probe::container_engine(options.docker_host.as_deref()).await {
            ContainerEngine::Ready { host, how } => {
                say(format!(
                    "containers: Docker at {host} gives them GPUs through {how}"
                ));
                Choice::Docker
            }
            ContainerEngine::NoGpuPassthrough { host, runtimes } => {
                say(format!(
                    "containers: Docker at {host} would not give them GPUs (runtimes: {}); \
                     install the NVIDIA Container Toolkit for vLLM's container. Falling back to \
                     the process driver (`vllm serve` from this machine's Python)",
                    runtimes.join(", ")
                ));
                Choice::Process
            }
            ContainerEngine::Unreachable { host, error } => {
                say(format!(
                    "containers: no Docker at {host} ({error}); falling back to the process \
                     driver (`vllm serve` from this machine's Python)"
                ));
                Choice::Process
            }
        }
    };

    // 2. The gateway and the token.
    let gateway_url = match &options.gateway_url {
        Some(url) => url.trim().to_owned(),
        None => ask(
            &options,
            "Gateway URL (https://…)",
            "--gateway-url (there is no terminal to ask on)",
        )?,
    };
    let state_path = root.join(STATE_PATH);
    let token = match &options.token {
        Some(token) => Some(token.trim().to_owned()),
        // A rig that enrolled before keeps its identity: no token needed.
        None if state_path.exists() => None,
        None => Some(ask(
            &options,
            "Enrollment token (from the gateway's admin)",
            "--token (there is no terminal to ask on)",
        )?),
    };

    // 3. The model and its GPUs.
    let (model, gpus) = choose_model(&options, &inventory, choice, &mut say)?;
    say(format!(
        "model: {model} on {}",
        match gpus.len() {
            0 => "no GPU".to_owned(),
            1 => format!("GPU {}", gpus[0]),
            n => format!(
                "GPUs {} (tensor parallel across {n})",
                gpus.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    ));

    // 4. The config, checked by the very loader `run` uses before it is written.
    let text = config_text(&ConfigInput {
        options: &options,
        gateway_url: &gateway_url,
        token: token.as_deref(),
        state_path: &state_path,
        choice,
        model: &model,
        gpus: &gpus,
    });
    let config = NodeConfig::load(&text, std::iter::empty())?;
    write_file(&config_path, text.as_bytes(), 0o600)?;
    say(format!("wrote {}", config_path.display()));
    let unit = unit_text(&options.binary, &config_path);
    write_file(&unit_path, unit.as_bytes(), 0o644)?;
    say(format!("wrote {}", unit_path.display()));

    let mut report = SetupReport {
        config_path: config_path.clone(),
        unit_path,
        choice,
        model: model.clone(),
        gpus,
        node_id: None,
        benchmark: None,
        service_started: false,
    };
    if options.no_start {
        say("--no-start: nothing started. When ready:".into());
        for command in service_commands(&options.root) {
            say(format!("  {command}"));
        }
        return Ok(report);
    }

    // 5. One start: enroll, bring the engine up, benchmark it, stop.
    say("starting the engine and joining the gateway (a first vLLM start downloads the model: minutes)".into());
    if let Some(dir) = state_path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| SetupError::Write {
            path: dir.to_owned(),
            source,
        })?;
    }
    let engines = EngineSet::start(config.engines.clone()).await;
    let mut agent_options = config.agent_options()?;
    agent_options.drain_timeout = Duration::from_secs(5);
    let agent = Agent::start(agent_options, engines).await?;
    report.node_id = Some(agent.node_id().to_owned());
    say(format!("enrolled as {}", agent.node_id()));
    let bound = Duration::from_secs(config.engines[0].health_timeout_secs);
    let benchmark = if agent.engines().wait_healthy(bound).await {
        benchmark(agent.engines(), &model).await
    } else {
        Err(SetupError::Unhealthy(bound))
    };
    agent.shutdown().await;
    let benchmark = benchmark?;
    say(format!(
        "benchmark: {} tokens in {:.2} s: {:.1} tokens/s",
        benchmark.completion_tokens, benchmark.seconds, benchmark.tokens_per_sec
    ));
    let json =
        serde_json::to_vec_pretty(&benchmark).map_err(|e| SetupError::Benchmark(e.to_string()))?;
    write_file(&root.join(BENCHMARK_PATH), &json, 0o644)?;
    report.benchmark = Some(benchmark);

    // 6. The service.
    if options.root == Path::new("/") && systemd_runs() {
        for args in [
            &["daemon-reload"][..],
            &["enable", "--now", "node-runner.service"],
        ] {
            let status = std::process::Command::new("systemctl")
                .args(args)
                .status()
                .map_err(|e| SetupError::Input(format!("cannot run systemctl: {e}")))?;
            if !status.success() {
                return Err(SetupError::Input(format!(
                    "systemctl {} failed ({status})",
                    args.join(" ")
                )));
            }
        }
        say(
            "node-runner.service is enabled and running: `journalctl -u node-runner -f` follows it"
                .into(),
        );
        report.service_started = true;
    } else {
        say("not installing the service here (not the real root, or no systemd); to do it:".into());
        for command in service_commands(&options.root) {
            say(format!("  {command}"));
        }
    }
    say("check the rig any time with `node-runner doctor`".into());
    Ok(report)
}

/// The commands that install and start the unit by hand.
fn service_commands(root: &Path) -> Vec<String> {
    let mut commands = Vec::new();
    if root != Path::new("/") {
        commands.push(format!(
            "sudo cp {} /{UNIT_PATH}  # and {} to /{CONFIG_PATH}, fixing its paths",
            root.join(UNIT_PATH).display(),
            root.join(CONFIG_PATH).display()
        ));
    }
    commands.push("sudo systemctl daemon-reload".into());
    commands.push("sudo systemctl enable --now node-runner.service".into());
    commands
}

/// Whether this process runs as root: `/proc/self` belongs to the effective user.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// Whether systemd is this machine's init (PID 1).
fn systemd_runs() -> bool {
    std::fs::read_to_string("/proc/1/comm").is_ok_and(|comm| comm.trim() == "systemd")
}

/// The model to serve and its GPUs.
fn choose_model(
    options: &SetupOptions,
    inventory: &GpuInventory,
    choice: Choice,
    say: &mut impl FnMut(String),
) -> Result<(String, Vec<u32>), SetupError> {
    if choice == Choice::Simulated {
        return match options.model.as_deref() {
            None | Some(SIMULATED_MODEL) => Ok((SIMULATED_MODEL.to_owned(), Vec::new())),
            Some(other) => Err(SetupError::Input(format!(
                "{other} needs an NVIDIA GPU and NVML finds none here: without one this rig can \
                 serve only the simulated engine (--model {SIMULATED_MODEL})"
            ))),
        };
    }
    let total_gib: u64 = inventory
        .gpus
        .iter()
        .map(|g| g.memory_total_bytes >> 30)
        .sum();
    if let Some(model) = &options.model {
        let model = model.trim();
        if model.is_empty() {
            return Err(SetupError::Input("--model is empty".into()));
        }
        return match catalogue::find(model) {
            Some(known) => match catalogue::placement(known.needs_gib, &inventory.gpus) {
                Some(gpus) => Ok((model.to_owned(), gpus)),
                None => Err(SetupError::Input(format!(
                    "{model} needs about {} GiB of GPU memory and this rig has {total_gib} GiB: \
                     pick a smaller model, or serve it from an engine group across rigs \
                     (docs/rigs.md)",
                    known.needs_gib
                ))),
            },
            None => {
                say(format!(
                    "{model} is not in the catalogue: its memory need is unknown, so it gets \
                     every GPU"
                ));
                Ok((
                    model.to_owned(),
                    inventory.gpus.iter().map(|g| g.index).collect(),
                ))
            }
        };
    }
    let fits = catalogue::fitting(&inventory.gpus);
    if fits.is_empty() {
        return Err(SetupError::Input(format!(
            "no model of the catalogue fits in {total_gib} GiB of GPU memory: name one with --model"
        )));
    }
    say("models that fit this rig:".into());
    for (i, (model, gpus)) in fits.iter().enumerate() {
        say(format!(
            "  {}. {} — {} ({} GiB, {} GPU{})",
            i + 1,
            model.id,
            model.about,
            model.needs_gib,
            gpus.len(),
            if gpus.len() == 1 { "" } else { "s" }
        ));
    }
    let picked = if options.interactive && !options.yes {
        let answer = prompt(&format!("Which one? [1-{}, default 1]", fits.len()))?;
        match answer.trim() {
            "" => 0,
            n => n
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=fits.len()).contains(n))
                .map(|n| n - 1)
                .ok_or_else(|| {
                    SetupError::Input(format!("{n:?} is not one of 1 to {}", fits.len()))
                })?,
        }
    } else {
        0
    };
    let (model, gpus) = &fits[picked];
    Ok((model.id.to_owned(), gpus.clone()))
}

/// What the config is made of.
struct ConfigInput<'a> {
    options: &'a SetupOptions,
    gateway_url: &'a str,
    token: Option<&'a str>,
    state_path: &'a Path,
    choice: Choice,
    model: &'a str,
    gpus: &'a [u32],
}

/// A TOML string, escaped.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The engine's name: the model's last path segment, in the letters a container name takes.
fn engine_name(model: &str) -> String {
    let last = model.rsplit('/').next().unwrap_or(model);
    let name: String = last
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '-',
        })
        .collect();
    if name.trim_matches('-').is_empty() {
        "engine".to_owned()
    } else {
        name
    }
}

fn config_text(input: &ConfigInput<'_>) -> String {
    let options = input.options;
    let mut text = String::from(
        "# Written by `node-runner setup`; edit freely. `node-runner doctor` checks it.\n",
    );
    text.push_str(&format!("gateway_url = {}\n", quoted(input.gateway_url)));
    if let Some(ca) = &options.gateway_ca_file {
        text.push_str(&format!(
            "gateway_ca_file = {}\n",
            quoted(&ca.display().to_string())
        ));
    }
    if options.allow_insecure_http {
        text.push_str("allow_insecure_http = true\n");
    }
    if let Some(token) = input.token {
        text.push_str(
            "# Used once, at the first start; the rig's identity then lives in state_file.\n",
        );
        text.push_str(&format!("enrollment_token = {}\n", quoted(token)));
    }
    if let Some(name) = &options.name {
        text.push_str(&format!("name = {}\n", quoted(name)));
    }
    text.push_str(&format!(
        "state_file = {}\n",
        quoted(&input.state_path.display().to_string())
    ));
    text.push_str("\n[[engines]]\n");
    text.push_str(&format!("name = {}\n", quoted(&engine_name(input.model))));
    text.push_str(&format!("models = [{}]\n", quoted(input.model)));
    if !input.gpus.is_empty() {
        let gpus: Vec<String> = input.gpus.iter().map(u32::to_string).collect();
        text.push_str(&format!(
            "gpus = [{}]  # several: vLLM's tensor parallelism across them\n",
            gpus.join(", ")
        ));
    }
    match input.choice {
        Choice::Docker => {
            text.push_str(&format!("port = {}\n", options.port));
            text.push_str("driver = \"docker\"\n");
            text.push_str(&format!("image = {}\n", quoted(DEFAULT_DOCKER_IMAGE)));
            text.push_str(&format!(
                "model_cache = {}\n",
                quoted(&options.root.join(MODEL_CACHE_PATH).display().to_string())
            ));
            if let Some(host) = &options.docker_host {
                text.push_str(&format!("docker_host = {}\n", quoted(host)));
            }
            text.push_str("# env = { HF_TOKEN = \"hf_…\" }  # for gated models\n");
        }
        Choice::Process => {
            text.push_str(&format!("port = {}\n", options.port));
            text.push_str("driver = \"process\"\n");
            text.push_str(&format!(
                "command = [\"vllm\", \"serve\", {}, \"--port\", \"{{port}}\"]\n",
                quoted(input.model)
            ));
        }
        Choice::Simulated => {
            text.push_str("driver = \"simulated\"\n");
            text.push_str("tokens_per_sec = 40\n");
        }
    }
    text
}

/// The unit. `KillMode=mixed`: on stop systemd signals node-runner alone, which drains its
/// requests and then stops its engines itself; the default would signal the engines at the same
/// moment and cut the answers being streamed.
fn unit_text(binary: &Path, config: &Path) -> String {
    format!(
        "[Unit]\n\
         Description=Garage rig agent (node-runner)\n\
         Wants=network-online.target\n\
         After=network-online.target docker.service\n\
         \n\
         [Service]\n\
         ExecStart={} run --config {}\n\
         Restart=on-failure\n\
         RestartSec=5\n\
         KillMode=mixed\n\
         # drain_timeout_secs (30 s by default) plus the engines' own stop\n\
         TimeoutStopSec=90\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        binary.display(),
        config.display()
    )
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SetupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let error = |source| SetupError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(error)?;
    file.write_all(bytes).map_err(error)
}

/// A short generation on the engine: its decode speed on this rig.
async fn benchmark(engines: &EngineSet, model: &str) -> Result<Benchmark, SetupError> {
    let base = engines
        .base_url_for(model)
        .ok_or_else(|| SetupError::Benchmark(format!("no healthy engine serves {model}")))?;
    let started = Instant::now();
    let response = crate::agent::http_client()
        .post(format!("{base}/v1/completions"))
        .json(&serde_json::json!({
            "model": model,
            "prompt": "Write a short story about a GPU in a garage.",
            "max_tokens": BENCHMARK_TOKENS,
            "ignore_eos": true,
            "temperature": 0,
        }))
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .map_err(|e| SetupError::Benchmark(probe::chain(&e)))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|e| SetupError::Benchmark(probe::chain(&e)))?;
    if !status.is_success() {
        return Err(SetupError::Benchmark(format!(
            "the engine answered {status}: {body}"
        )));
    }
    let seconds = started.elapsed().as_secs_f64();
    let completion_tokens = body["usage"]["completion_tokens"]
        .as_u64()
        .ok_or_else(|| SetupError::Benchmark(format!("no usage in the answer: {body}")))?;
    Ok(Benchmark {
        model: model.to_owned(),
        completion_tokens,
        seconds,
        tokens_per_sec: completion_tokens as f64 / seconds.max(1e-6),
    })
}

fn prompt(question: &str) -> Result<String, SetupError> {
    print!("{question}: ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| SetupError::Input(format!("cannot read the answer: {e}")))?;
    Ok(line.trim().to_owned())
}

/// Asks for a value on the terminal, or says which flag gives it.
fn ask(options: &SetupOptions, question: &str, flag: &str) -> Result<String, SetupError> {
    if !options.interactive {
        return Err(SetupError::Input(format!("missing {flag}")));
    }
    let answer = prompt(question)?;
    if answer.is_empty() {
        return Err(SetupError::Input(format!("no answer for {question}")));
    }
    Ok(answer)
}

fn ask_yes(options: &SetupOptions, config: &Path) -> Result<bool, SetupError> {
    if !options.interactive {
        return Ok(false);
    }
    let answer = prompt(&format!("{} exists. Overwrite it? [y/N]", config.display()))?;
    Ok(matches!(answer.as_str(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names_are_container_safe() {
        assert_eq!(engine_name("Qwen/Qwen3-14B"), "qwen3-14b");
        assert_eq!(engine_name("sim-llama-3-8b"), "sim-llama-3-8b");
        assert_eq!(engine_name("org/we ird:model"), "we-ird-model");
        assert_eq!(engine_name("org/@@"), "engine");
    }

    #[test]
    fn the_unit_lets_node_runner_drain_before_its_engines_stop() {
        let unit = unit_text(
            Path::new("/usr/local/bin/node-runner"),
            Path::new("/etc/node-runner/node-runner.toml"),
        );
        assert!(unit.contains(
            "ExecStart=/usr/local/bin/node-runner run --config /etc/node-runner/node-runner.toml"
        ));
        assert!(unit.contains("KillMode=mixed"));
        assert!(unit.contains("WantedBy=multi-user.target"));
    }
}
