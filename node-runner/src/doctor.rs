//! `node-runner doctor`: what is wrong with this rig, one line per check, `ok` or `FAIL <what> —
//! <what to do>`. The config, the gateway (reachable, its TLS trusted), the rig's enrollment
//! (its credential accepted, or its token good), the container engine and whether containers see
//! the GPUs, the members of the engine groups this rig heads, the GPUs the engines pin, and each
//! engine's port (free, or held by a healthy engine).
//!
//! Nothing here changes the rig, with one exception: a rig that has not enrolled yet enrolls,
//! exactly as its first start would (the token cannot be checked without spending it), and keeps
//! the identity in its state file for `run`.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use garage_node_protocol::{ErrorBody, STATEMENT_PATH};

use crate::agent::{Agent, AgentError};
use crate::config::{Driver, NodeConfig};
use crate::engines::EngineSet;
use crate::probe::{self, ContainerEngine, GatewayProblem, GpuInventory, PortState};

/// One check's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub ok: bool,
    /// What was checked, or what is wrong.
    pub what: String,
    /// What to do about it (failures only).
    pub fix: Option<String>,
}

impl Check {
    fn ok(what: impl Into<String>) -> Check {
        Check {
            ok: true,
            what: what.into(),
            fix: None,
        }
    }

    fn fail(what: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            ok: false,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fix {
            None => write!(f, "ok   {}", self.what),
            Some(fix) => write!(f, "FAIL {} — {fix}", self.what),
        }
    }
}

/// What `doctor` is told.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    pub config: PathBuf,
    /// The environment the config's overrides are read from.
    pub env: Vec<(String, String)>,
    /// The GPUs, when not read from NVML.
    pub gpus: Option<GpuInventory>,
}

/// Runs every check that applies, in order; a failed config stops there.
pub async fn doctor(options: &DoctorOptions) -> Vec<Check> {
    let mut checks = Vec::new();
    let config = match NodeConfig::load_file(&options.config, options.env.clone()) {
        Ok(config) => config,
        Err(error) => {
            // A TOML error spans lines (the snippet, a caret): one line here.
            let error = error.to_string();
            checks.push(Check::fail(
                error.split_whitespace().collect::<Vec<_>>().join(" "),
                "fix the file, or write a new one with `node-runner setup`",
            ));
            return checks;
        }
    };
    checks.push(Check::ok(format!(
        "config {} loads",
        options.config.display()
    )));

    let http = match config.gateway_ca_file.as_deref() {
        Some(ca) => match crate::agent::http_client_trusting(ca) {
            Ok(http) => Some(http),
            Err(error) => {
                checks.push(Check::fail(
                    format!("gateway_ca_file: {error}"),
                    "point gateway_ca_file at the PEM file of the CA the gateway's certificate \
                     comes from",
                ));
                None
            }
        },
        None => Some(crate::agent::http_client()),
    };
    if let Some(http) = http {
        let mut reachable = Vec::new();
        for url in config.gateways() {
            match probe::gateway(&http, &url).await {
                Ok(()) => {
                    checks.push(Check::ok(format!("gateway {url} answers")));
                    reachable.push(url);
                }
                Err(GatewayProblem::Tls(cause)) => checks.push(Check::fail(
                    format!("TLS to {url}: {cause}"),
                    "if the gateway's certificate comes from a private CA, set gateway_ca_file \
                     to that CA's PEM file; otherwise check the URL's host name",
                )),
                Err(GatewayProblem::Unreachable(cause)) => checks.push(Check::fail(
                    format!("gateway {url} unreachable: {cause}"),
                    "check the URL, that the gateway runs, and this machine's network",
                )),
                Err(GatewayProblem::Status(status)) => checks.push(Check::fail(
                    format!("gateway {url} answered {status} on /health"),
                    "the gateway is up but unwell: ask its operator",
                )),
            }
        }
        if !reachable.is_empty() {
            checks.push(enrollment(&config, &http, &reachable).await);
        }
    }

    checks.extend(container_engines(&config).await);
    checks.extend(gpus(&config, options.gpus.clone()));
    checks.extend(group_members(&config).await);
    for engine in &config.engines {
        if engine.port == 0 {
            continue;
        }
        let (name, port) = (&engine.name, engine.port);
        checks.push(match probe::port(port).await {
            PortState::Free => Check::ok(format!("port {port} is free for engine {name:?}")),
            PortState::Healthy => Check::ok(format!(
                "engine {name:?} answers /health on port {port} (node-runner runs)"
            )),
            PortState::Unhealthy { status } => Check::fail(
                format!("engine {name:?} on port {port} is unhealthy (/health answered {status})"),
                "read the engine's output in node-runner's log (journalctl -u node-runner); \
                 node-runner restarts it after three failed checks",
            ),
            PortState::Taken => Check::fail(
                format!(
                    "port {port} of engine {name:?} is taken by a program that is not an engine"
                ),
                format!(
                    "stop that program (`ss -ltnp 'sport = {port}'` names it) or give the engine \
                     another port"
                ),
            ),
        });
    }
    checks
}

/// The rig's credential, when it has enrolled; else its token, by enrolling.
async fn enrollment(config: &NodeConfig, http: &reqwest::Client, reachable: &[String]) -> Check {
    let state_file = &config.state_file;
    let identity = match crate::agent::read_identity(state_file) {
        Ok(identity) => identity,
        Err(error) => {
            return Check::fail(
                error.to_string(),
                "the state file must be readable and writable by node-runner's user",
            );
        }
    };
    if let Some(identity) = identity {
        let url = &reachable[0];
        let answer = http
            .get(format!("{url}{STATEMENT_PATH}?limit=1"))
            .bearer_auth(&identity.credential)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        return match answer {
            Ok(response) if response.status().is_success() => Check::ok(format!(
                "enrolled as {}: the gateway accepts the rig's credential",
                identity.node_id
            )),
            Ok(response) if matches!(response.status().as_u16(), 401 | 403) => Check::fail(
                format!(
                    "the gateway refused the credential of {} ({}): the rig was removed, or the \
                     state file is another gateway's",
                    identity.node_id,
                    response.status().as_u16()
                ),
                format!(
                    "ask the gateway's admin for a new enrollment token, put it in \
                     enrollment_token, delete {} and start again",
                    state_file.display()
                ),
            ),
            Ok(response) => Check::fail(
                format!(
                    "the gateway answered {} when asked about this rig",
                    response.status().as_u16()
                ),
                "an older gateway, or an unwell one: ask its operator",
            ),
            Err(error) => Check::fail(
                format!(
                    "cannot ask the gateway about this rig: {}",
                    probe::chain(&error)
                ),
                "check the network, then run doctor again",
            ),
        };
    }
    let Some(_) = &config.enrollment_token else {
        return Check::fail(
            format!(
                "not enrolled ({} holds no identity) and no enrollment_token",
                state_file.display()
            ),
            "ask the gateway's admin for an enrollment token and set enrollment_token (or \
             NODE_RUNNER_ENROLLMENT_TOKEN)",
        );
    };
    // Enrolls as the first start would; no engine starts, and the rig leaves at once.
    let options = match config.agent_options() {
        Ok(mut options) => {
            options.probe_gpus = false;
            options.batch.enabled = false;
            options.drain_timeout = Duration::from_secs(1);
            options
        }
        Err(error) => return Check::fail(format!("gateway_ca_file: {error}"), "fix the file"),
    };
    match Agent::start(options, EngineSet::start(Vec::new()).await).await {
        Ok(agent) => {
            let node = agent.node_id().to_owned();
            agent.shutdown().await;
            Check::ok(format!(
                "enrolled now as {node} with the token (the identity is kept in {})",
                state_file.display()
            ))
        }
        Err(AgentError::EnrollRefused { status, message }) => {
            let message = serde_json::from_str::<ErrorBody>(&message)
                .map(|body| body.error.message)
                .unwrap_or(message);
            Check::fail(
                format!("the gateway refused the enrollment token ({status}): {message}"),
                "ask the gateway's admin for a new token (each has a number of uses and an \
                 expiry) and put it in enrollment_token",
            )
        }
        Err(error) => Check::fail(
            format!("cannot enroll: {}", probe::chain(&error)),
            "check the state file's directory and the gateway, then run doctor again",
        ),
    }
}

/// The container engine of each docker engine, and whether its containers see GPUs.
async fn container_engines(config: &NodeConfig) -> Vec<Check> {
    let hosts: BTreeSet<Option<String>> = config
        .engines
        .iter()
        .filter_map(|engine| match &engine.driver {
            Driver::Docker(docker) => Some(docker.docker_host.clone()),
            _ => None,
        })
        .collect();
    let mut checks = Vec::new();
    for host in hosts {
        checks.push(match probe::container_engine(host.as_deref()).await {
            ContainerEngine::Ready { host, how } => Check::ok(format!(
                "Docker at {host} answers and gives containers GPUs through {how}"
            )),
            ContainerEngine::Unreachable { host, error } => Check::fail(
                format!("no Docker socket at {host}: {error}"),
                "install and start Docker (or Podman's API socket), or point docker_host at it; \
                 node-runner's user must be allowed on the socket",
            ),
            ContainerEngine::NoGpuPassthrough { host, runtimes } => Check::fail(
                format!(
                    "GPUs are not visible in containers: Docker at {host} has no nvidia runtime \
                     and no NVIDIA CDI device (runtimes: {})",
                    runtimes.join(", ")
                ),
                "install the NVIDIA Container Toolkit, run `sudo nvidia-ctk runtime configure \
                 --runtime=docker` and restart Docker; or use the process driver",
            ),
        });
    }
    checks
}

/// Each member of the engine groups this rig heads: there, and with the same secret.
async fn group_members(config: &NodeConfig) -> Vec<Check> {
    let mut checks = Vec::new();
    for engine in &config.engines {
        let Driver::Process(process) = &engine.driver else {
            continue;
        };
        let Some(group) = &process.group else {
            continue;
        };
        for member in &group.members {
            let name = &engine.name;
            checks.push(
                match crate::engines::group::member_state(member, &group.secret).await {
                    Ok(report) => Check::ok(format!(
                        "group {name:?}: member {member} answers (its Ray worker {})",
                        if report.running {
                            "runs"
                        } else {
                            "waits for the head"
                        }
                    )),
                    Err(why) => Check::fail(
                        format!("group {name:?}: member {member} {why}"),
                        "start node-runner on that rig with its [group_member] table, the same \
                     secret, and listen on this address; the rigs must share a LAN",
                    ),
                },
            );
        }
    }
    checks
}

/// The GPUs the engines pin, against what NVML sees.
fn gpus(config: &NodeConfig, inventory: Option<GpuInventory>) -> Vec<Check> {
    let pinned: BTreeSet<(u32, &str)> = config
        .engines
        .iter()
        .flat_map(|engine| engine.gpus.iter().map(|gpu| (*gpu, engine.name.as_str())))
        .collect();
    if pinned.is_empty() {
        return Vec::new();
    }
    let inventory = inventory.unwrap_or_else(GpuInventory::detect);
    if !inventory.nvml {
        return vec![Check::fail(
            "NVML is not available: the NVIDIA driver is missing or not loaded",
            "install the NVIDIA driver (`nvidia-smi` must list the GPUs)",
        )];
    }
    let missing: Vec<String> = pinned
        .iter()
        .filter(|(gpu, _)| !inventory.gpus.iter().any(|g| g.index == *gpu))
        .map(|(gpu, engine)| format!("GPU {gpu} (engine {engine:?})"))
        .collect();
    if missing.is_empty() {
        vec![Check::ok(format!("GPUs: {}", inventory.describe()))]
    } else {
        vec![Check::fail(
            format!(
                "{} pinned but NVML sees {}",
                missing.join(", "),
                inventory.describe()
            ),
            "pin GPUs by the indexes `nvidia-smi` shows",
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_is_one_line() {
        assert_eq!(
            Check::ok("gateway answers").to_string(),
            "ok   gateway answers"
        );
        assert_eq!(
            Check::fail("port 8001 taken", "free it").to_string(),
            "FAIL port 8001 taken — free it"
        );
    }
}
