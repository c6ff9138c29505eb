//! Engine groups: one model bigger than one rig, served by vLLM over Ray across rigs on a LAN.
//!
//! The **head** rig's engine (a process engine with `[engines.group]`) is supervised as one
//! engine: its start runs `ray start --head`, tells every member to (re)start its Ray worker,
//! then starts vLLM with `--pipeline-parallel-size` (one stage per rig), `--tensor-parallel-size`
//! (the GPUs of each rig) and `--distributed-executor-backend ray`. It counts as dead when vLLM,
//! the Ray head or any member is down; the supervisor then stops it and starts it again, which
//! restarts the members' workers with it: the group comes back together.
//!
//! A **member** rig (`[group_member]`) runs a Ray worker that joins the head's Ray, and answers
//! the head on its `listen` address: `GET /group/v1/member` (is the worker running) and
//! `POST /group/v1/restart`. Both need the group's secret. The member never restarts its worker
//! on its own: only the head knows when its Ray is ready to be joined.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use garage_node_protocol::GroupMember;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::EngineError;
use super::process::ProcessEngine;
use crate::config::{Driver, EngineConfig, EngineGroup, GroupMemberConfig, ProcessDriver};

/// A member's state.
pub const MEMBER_PATH: &str = "/group/v1/member";
/// Restarts a member's Ray worker.
pub const RESTART_PATH: &str = "/group/v1/restart";

/// How long the head waits for a member's answer: members are on the LAN.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(2);

/// A worker that is replaced gets this long to leave Ray cleanly.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(10);

/// What a member answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberReport {
    pub group: String,
    /// Its Ray worker runs.
    pub running: bool,
    /// Starts of its worker so far.
    pub generation: u64,
}

/// The vLLM flags a group's head adds unless its command sets them: pipeline parallel across
/// the rigs, tensor parallel across each rig's GPUs, Ray to reach the other rigs.
pub fn group_args(gpus: &[u32], members: usize, command: &[String]) -> Vec<String> {
    let sets = |flag: &str| {
        command
            .iter()
            .any(|arg| arg == flag || arg.starts_with(&format!("{flag}=")))
    };
    let mut args = Vec::new();
    if !sets("--pipeline-parallel-size") && !sets("-pp") {
        args.extend([
            "--pipeline-parallel-size".to_owned(),
            (members + 1).to_string(),
        ]);
    }
    args.extend(super::vllm::tensor_parallel_args(gpus, command));
    if !sets("--distributed-executor-backend") {
        args.extend([
            "--distributed-executor-backend".to_owned(),
            "ray".to_owned(),
        ]);
    }
    args
}

/// A process driver running `command`, for the Ray processes.
fn ray_process(name: String, gpus: &[u32], port: u16, command: Vec<String>) -> EngineConfig {
    EngineConfig {
        name,
        models: Vec::new(),
        gpus: gpus.to_vec(),
        port,
        driver: Driver::Process(ProcessDriver {
            command,
            env: BTreeMap::new(),
            workdir: None,
            group: None,
        }),
        health_timeout_secs: 1,
    }
}

fn spawn(config: &EngineConfig) -> Result<ProcessEngine, EngineError> {
    match &config.driver {
        Driver::Process(driver) => ProcessEngine::spawn(config, driver),
        // Only built above, always with the process driver.
        other => Err(EngineError::Spawn {
            program: other.kind().to_owned(),
            source: std::io::Error::other("a group's processes run with the process driver"),
        }),
    }
}

// ---- The head ----

/// Starts a group's head: Ray's head, the members' workers, vLLM.
pub(crate) struct GroupLauncher {
    driver: ProcessDriver,
    group: EngineGroup,
    /// Read by [`super::EngineSet::statuses`].
    members: Arc<Mutex<Vec<GroupMember>>>,
    http: reqwest::Client,
}

impl GroupLauncher {
    pub(crate) fn new(
        driver: &ProcessDriver,
        group: &EngineGroup,
        members: Arc<Mutex<Vec<GroupMember>>>,
    ) -> GroupLauncher {
        GroupLauncher {
            driver: driver.clone(),
            group: group.clone(),
            members,
            http: crate::agent::http_client(),
        }
    }

    pub(crate) async fn start(
        &mut self,
        config: &EngineConfig,
    ) -> Result<GroupInstance, EngineError> {
        let group = &self.group;
        // Members first: a member that cannot be reached fails the start before Ray does.
        for member in &group.members {
            ask(&self.http, member, &group.secret, false)
                .await
                .map_err(|why| member_error(member, why))?;
        }
        let mut head_command = group.ray_command.clone();
        head_command.extend([
            "start".to_owned(),
            "--head".to_owned(),
            "--block".to_owned(),
            "--port={port}".to_owned(),
            format!("--node-ip-address={}", group.address),
            format!("--num-gpus={}", config.gpus.len()),
        ]);
        let mut head = spawn(&ray_process(
            format!("{}-ray-head", config.name),
            &config.gpus,
            group.ray_port,
            head_command,
        ))?;
        let mut reports = Vec::with_capacity(group.members.len());
        for member in &group.members {
            match ask(&self.http, member, &group.secret, true).await {
                Ok(report) => reports.push(GroupMember {
                    address: member.clone(),
                    up: report.running,
                    generation: report.generation,
                }),
                Err(why) => {
                    head.stop(WORKER_STOP_GRACE).await;
                    return Err(member_error(member, why));
                }
            }
        }
        *lock(&self.members) = reports;
        let mut driver = self.driver.clone();
        let extra = group_args(&config.gpus, group.members.len(), &driver.command);
        driver.command.extend(extra);
        let vllm = match ProcessEngine::spawn(config, &driver) {
            Ok(vllm) => vllm,
            Err(error) => {
                head.stop(WORKER_STOP_GRACE).await;
                return Err(error);
            }
        };
        Ok(GroupInstance {
            vllm,
            head,
            group: group.clone(),
            members: Arc::clone(&self.members),
            http: self.http.clone(),
        })
    }
}

fn member_error(member: &str, why: String) -> EngineError {
    EngineError::ExitedDuringStartup(format!("group member {member}: {why}"))
}

/// Asks a member for its state (`doctor`): its report, or why there is none.
pub async fn member_state(member: &str, secret: &str) -> Result<MemberReport, String> {
    ask(&crate::agent::http_client(), member, secret, false).await
}

/// Asks a member for its state, or to restart its worker.
async fn ask(
    http: &reqwest::Client,
    member: &str,
    secret: &str,
    restart: bool,
) -> Result<MemberReport, String> {
    let request = if restart {
        http.post(format!("http://{member}{RESTART_PATH}"))
    } else {
        http.get(format!("http://{member}{MEMBER_PATH}"))
    };
    let response = request
        .bearer_auth(secret)
        .timeout(MEMBER_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("no answer ({})", crate::probe::chain(&e)))?;
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    response
        .json()
        .await
        .map_err(|e| format!("answered something else than a member's state: {e}"))
}

/// A running group, as the supervisor sees one engine.
pub(crate) struct GroupInstance {
    vllm: ProcessEngine,
    head: ProcessEngine,
    group: EngineGroup,
    members: Arc<Mutex<Vec<GroupMember>>>,
    http: reqwest::Client,
}

impl GroupInstance {
    pub(crate) fn port(&self) -> u16 {
        self.vllm.port()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.vllm.pid()
    }

    /// `Some(why)` once vLLM, the Ray head or a member is down: the whole group is.
    pub(crate) async fn exited(&mut self) -> Option<String> {
        if let Some(exit) = self.vllm.exited() {
            return Some(format!("vLLM exited ({exit})"));
        }
        if let Some(exit) = self.head.exited() {
            return Some(format!("the Ray head exited ({exit})"));
        }
        let mut down = None;
        let mut seen = Vec::with_capacity(self.group.members.len());
        for member in &self.group.members {
            let answer = ask(&self.http, member, &self.group.secret, false).await;
            let (up, generation) = match &answer {
                Ok(report) => (report.running, report.generation),
                Err(_) => (false, 0),
            };
            if !up && down.is_none() {
                down = Some(match answer {
                    Ok(_) => format!("member {member}'s Ray worker is down"),
                    Err(why) => format!("member {member}: {why}"),
                });
            }
            seen.push(GroupMember {
                address: member.clone(),
                up,
                generation,
            });
        }
        *lock(&self.members) = seen;
        down
    }

    /// vLLM first (it drains), then the Ray head; the members' workers lose their head and
    /// wait for the next start to be restarted.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        self.vllm.stop(grace).await;
        self.head.stop(grace).await;
    }
}

// ---- A member ----

struct MemberState {
    worker: Option<ProcessEngine>,
    generation: u64,
}

/// A member rig's side: its Ray worker and the channel the head asks it on.
pub struct Member {
    addr: SocketAddr,
    state: Arc<tokio::sync::Mutex<MemberState>>,
    stop: CancellationToken,
    server: JoinHandle<()>,
}

impl Member {
    /// Starts the worker and listens on `config.listen`.
    pub async fn start(config: GroupMemberConfig) -> std::io::Result<Member> {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let config = Arc::new(config);
        let state = Arc::new(tokio::sync::Mutex::new(MemberState {
            worker: None,
            generation: 0,
        }));
        restart_worker(&config, &mut *state.lock().await).await;
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Arc::clone(&config),
            Arc::clone(&state),
            stop.clone(),
        ));
        tracing::info!(group = %config.group, %addr, head = %config.head, "group member listening");
        Ok(Member {
            addr,
            state,
            stop,
            server,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The Ray worker's process id while it runs.
    pub async fn worker_pid(&self) -> Option<u32> {
        let mut state = self.state.lock().await;
        let worker = state.worker.as_mut()?;
        worker.exited().is_none().then(|| worker.pid())
    }

    /// Starts of the worker so far.
    pub async fn generation(&self) -> u64 {
        self.state.lock().await.generation
    }

    /// Stops answering, then stops the worker.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.server.await;
        if let Some(worker) = &mut self.state.lock().await.worker {
            worker.stop(WORKER_STOP_GRACE).await;
        }
    }
}

async fn restart_worker(config: &GroupMemberConfig, state: &mut MemberState) {
    if let Some(old) = &mut state.worker {
        old.stop(WORKER_STOP_GRACE).await;
    }
    let mut command = config.ray_command.clone();
    command.extend([
        "start".to_owned(),
        "--block".to_owned(),
        format!("--address={}", config.head),
        format!("--node-ip-address={}", config.listen.ip()),
        format!("--num-gpus={}", config.gpus.len()),
    ]);
    state.generation += 1;
    state.worker = match spawn(&ray_process(
        format!("{}-ray-worker", config.group),
        &config.gpus,
        0,
        command,
    )) {
        Ok(worker) => Some(worker),
        Err(error) => {
            tracing::warn!(group = %config.group, %error, "cannot start the Ray worker");
            None
        }
    };
}

async fn serve(
    listener: tokio::net::TcpListener,
    config: Arc<GroupMemberConfig>,
    state: Arc<tokio::sync::Mutex<MemberState>>,
    stop: CancellationToken,
) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let (config, state, stop) = (Arc::clone(&config), Arc::clone(&state), stop.clone());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (config, state) = (Arc::clone(&config), Arc::clone(&state));
                async move {
                    Ok::<_, std::convert::Infallible>(answer(&config, &state, request).await)
                }
            });
            let connection =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

async fn answer(
    config: &GroupMemberConfig,
    state: &tokio::sync::Mutex<MemberState>,
    request: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, body: String| {
        let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() =
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        response
    };
    let expected = format!("Bearer {}", config.secret);
    let authorized = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|value| constant_time_eq(value.as_bytes(), expected.as_bytes()));
    if !authorized {
        let body = garage_node_protocol::ErrorBody::new(
            "the group's secret is required",
            "invalid_request_error",
            Some("invalid_api_key"),
        );
        return reply(401, body.to_json());
    }
    let mut state = state.lock().await;
    match (request.method(), request.uri().path()) {
        (&http::Method::GET, MEMBER_PATH) => {}
        (&http::Method::POST, RESTART_PATH) => {
            tracing::info!(group = %config.group, "the head restarts this member's Ray worker");
            restart_worker(config, &mut state).await;
        }
        _ => {
            let body = garage_node_protocol::ErrorBody::new(
                "no such route",
                "invalid_request_error",
                Some("not_found"),
            );
            return reply(404, body.to_json());
        }
    }
    let running = match &mut state.worker {
        Some(worker) => worker.exited().is_none(),
        None => false,
    };
    let report = MemberReport {
        group: config.group.clone(),
        running,
        generation: state.generation,
    };
    reply(200, serde_json::to_string(&report).unwrap_or_default())
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// The member list is plain data, valid whatever a panicking holder left.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_head_adds_pipeline_and_tensor_parallelism_unless_set() {
        assert_eq!(
            group_args(&[0, 1], 1, &strings(&["vllm", "serve", "m"])),
            [
                "--pipeline-parallel-size",
                "2",
                "--tensor-parallel-size",
                "2",
                "--distributed-executor-backend",
                "ray"
            ]
        );
        assert_eq!(
            group_args(&[0], 3, &strings(&["vllm", "serve", "m", "-pp=2"])),
            ["--distributed-executor-backend", "ray"]
        );
        assert!(
            group_args(
                &[0, 1],
                1,
                &strings(&[
                    "--pipeline-parallel-size",
                    "2",
                    "-tp",
                    "2",
                    "--distributed-executor-backend=mp"
                ])
            )
            .is_empty()
        );
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer abc", b"Bearer abd"));
        assert!(!constant_time_eq(b"Bearer ab", b"Bearer abc"));
    }
}
