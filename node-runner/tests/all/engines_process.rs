//! The supervisor for real, with the `process` driver running the `sim-engine` binary: it comes
//! up, its load is scraped, it is killed and restarted, and a stop leaves no process behind.
//!
//! Needs `cargo build -p garage-sim-engine --bin sim-engine` first.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use garage_node_protocol::EngineState;
use garage_node_runner::config::{Driver, EngineConfig, ProcessDriver};
use garage_node_runner::engines::EngineSet;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Generous: a debug sim-engine starts in milliseconds, but CI machines are busy.
const BOUND: Duration = Duration::from_secs(30);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "garage_node_runner=debug".into()),
        )
        .try_init();
}

/// `sim-engine` beside this test's own executable (`target/debug/deps/..` → `target/debug`).
fn sim_engine_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable has no target directory")?;
    let binary = dir.join("sim-engine");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: run `cargo build -p garage-sim-engine --bin sim-engine` first",
        binary.display()
    );
    Ok(binary)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn process_engine(name: &str, port: u16, command: Vec<String>) -> EngineConfig {
    EngineConfig {
        name: name.into(),
        models: vec![format!("{name}-model")],
        gpus: vec![],
        port,
        driver: Driver::Process(ProcessDriver {
            command,
            env: Default::default(),
            workdir: None,
            group: None,
        }),
        health_timeout_secs: 30,
    }
}

fn sim_engine_command(extra: &[&str]) -> anyhow::Result<Vec<String>> {
    let binary = sim_engine_binary()?;
    let mut command = vec![
        binary.display().to_string(),
        "--listen".into(),
        "127.0.0.1:{port}".into(),
    ];
    command.extend(extra.iter().map(|s| s.to_string()));
    Ok(command)
}

fn process_exists(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// Polls `condition` every 20 ms until it holds; false after `bound`.
async fn eventually(bound: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn chat(client: &reqwest::Client, base_url: &str, model: &str) -> anyhow::Result<String> {
    let response = client
        .post(format!("{base_url}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
        }))
        .send()
        .await?
        .error_for_status()?;
    Ok(response.text().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_engine_is_restarted_and_serves_again() -> anyhow::Result<()> {
    init_tracing();
    let port = free_port()?;
    // Paced decoding keeps one request running long enough to be seen in the scraped load.
    let command = sim_engine_command(&["--model", "proc-model", "--tokens-per-sec", "20"])?;
    let engines = EngineSet::start(vec![process_engine("proc", port, command)]).await;
    assert!(engines.wait_healthy(BOUND).await, "{engines:?}");
    let base_url = format!("http://127.0.0.1:{port}");
    assert_eq!(engines.base_url_for("proc-model"), Some(base_url.clone()));
    assert_eq!(engines.base_url_for("another-model"), None);
    assert!(engines.serves_any());
    let client = http_client();
    chat(&client, &base_url, "proc-model").await?;

    // Load: one slow request in flight shows up as running.
    let slow = tokio::spawn({
        let client = client.clone();
        let base_url = base_url.clone();
        async move {
            client
                .post(format!("{base_url}/v1/completions"))
                .json(&serde_json::json!({"model": "proc-model", "prompt": "x", "max_tokens": 200}))
                .send()
                .await
        }
    });
    assert!(
        eventually(BOUND, || {
            engines.statuses()[0]
                .stats
                .is_some_and(|s| s.requests_running >= 1.0)
        })
        .await,
        "the running request never showed in the stats: {engines:?}"
    );

    // Kill it behind the supervisor's back.
    let pid = engines.pid("proc").context("no pid")?;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
    assert!(
        engines
            .wait_for_state("proc", EngineState::Restarting, 1, BOUND)
            .await,
        "{engines:?}"
    );
    assert_eq!(engines.base_url_for("proc-model"), None);
    assert!(!engines.serves_any());
    assert!(
        engines
            .wait_for_state("proc", EngineState::Healthy, 1, BOUND)
            .await,
        "{engines:?}"
    );
    let status = &engines.statuses()[0];
    assert_eq!(status.restarts, 1);
    let new_pid = engines.pid("proc").context("no pid after the restart")?;
    assert_ne!(new_pid, pid);
    assert_eq!(engines.base_url_for("proc-model"), Some(base_url.clone()));
    chat(&client, &base_url, "proc-model").await?;
    // The request cut by the kill failed one way or another; it must not hang.
    let _ = tokio::time::timeout(BOUND, slow).await?;

    engines.shutdown(Duration::from_secs(5)).await;
    assert_eq!(engines.statuses()[0].state, EngineState::Stopped);
    assert_eq!(engines.pid("proc"), None);
    assert!(
        !process_exists(new_pid),
        "the engine process survived the stop"
    );
    assert!(
        client
            .get(format!("{base_url}/health"))
            .send()
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn an_engine_that_cannot_start_is_retried_and_stops_cleanly() -> anyhow::Result<()> {
    init_tracing();
    // Not an address: sim-engine exits at once with an error.
    let mut command = sim_engine_command(&[])?;
    command[2] = "nowhere".into();
    let engines = EngineSet::start(vec![process_engine("broken", free_port()?, command)]).await;
    assert!(
        engines
            .wait_for_state("broken", EngineState::Restarting, 1, BOUND)
            .await,
        "{engines:?}"
    );
    assert!(!engines.wait_healthy(Duration::from_millis(100)).await);
    assert_eq!(engines.base_url_for("broken-model"), None);
    let started = Instant::now();
    engines.shutdown(Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stop waited out the backoff"
    );
    assert_eq!(engines.statuses()[0].state, EngineState::Stopped);
    Ok(())
}

#[tokio::test]
async fn a_missing_program_is_retried() -> anyhow::Result<()> {
    init_tracing();
    let command = vec!["/nonexistent/vllm".to_owned(), "serve".to_owned()];
    let engines = EngineSet::start(vec![process_engine("ghost", free_port()?, command)]).await;
    assert!(
        engines
            .wait_for_state("ghost", EngineState::Restarting, 1, BOUND)
            .await,
        "{engines:?}"
    );
    engines.stop(Duration::from_secs(1)).await;
    Ok(())
}

#[tokio::test]
async fn an_engine_ignoring_sigterm_is_killed_with_its_whole_group() -> anyhow::Result<()> {
    init_tracing();
    // A shell and its child that both ignore SIGTERM (the disposition is inherited) and never
    // answer /health: the stop must escalate to SIGKILL for the whole process group. The marker
    // says the trap is set, so the SIGTERM cannot arrive before it.
    let dir = tempfile::tempdir()?;
    let marker = dir.path().join("trapped");
    let script = format!(
        "trap '' TERM; sleep 300 & touch '{}'; wait",
        marker.display()
    );
    let command = vec!["sh".to_owned(), "-c".to_owned(), script];
    let engines = EngineSet::start(vec![process_engine("stubborn", free_port()?, command)]).await;
    assert!(
        eventually(BOUND, || marker.exists()).await,
        "the script never ran: {engines:?}"
    );
    let pid = engines.pid("stubborn").context("no pid")?;
    let grace = Duration::from_millis(300);
    let started = Instant::now();
    engines.shutdown(grace).await;
    assert!(
        started.elapsed() >= grace,
        "SIGTERM should have been ignored"
    );
    assert!(started.elapsed() < BOUND);
    assert!(!process_exists(pid));
    // The `sleep` child was in the engine's process group: nothing of the group is left.
    assert!(
        eventually(Duration::from_secs(5), || nix::sys::signal::killpg(
            Pid::from_raw(pid as i32),
            None
        )
        .is_err())
        .await,
        "a member of the engine's process group survived"
    );
    Ok(())
}
