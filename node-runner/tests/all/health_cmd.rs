//! `node-runner health`, the container image's health check, run as the real binary against
//! engines that are real HTTP servers on loopback: healthy when the rig has enrolled and every
//! engine on a fixed port answers `/health`; unhealthy, saying why, otherwise.

use std::path::Path;
use std::process::{Command, Output};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use garage_node_runner::agent::NodeIdentity;

/// An engine stand-in on a free loopback port whose `/health` answers `status`; it stops when
/// the test's runtime does.
async fn engine_answering(status: StatusCode) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new().route("/health", get(move || async move { status }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn write_identity(path: &Path) {
    let identity = NodeIdentity {
        gateway_url: "http://127.0.0.1:9".into(),
        gateway_urls: vec!["http://127.0.0.1:9".into()],
        node_id: "node-health-test".into(),
        credential: "cred".into(),
        operator: "op".into(),
        heartbeat_interval_secs: 5,
        receipt_key: None,
    };
    std::fs::write(path, serde_json::to_vec(&identity).unwrap()).unwrap();
}

/// A rig config with a state file in `dir` and process engines on `ports` (the health check only
/// reads their ports; nothing is started).
fn write_config(dir: &Path, ports: &[u16]) -> std::path::PathBuf {
    let mut text = format!(
        "gateway_url = \"http://127.0.0.1:9\"\nstate_file = \"{}\"\n",
        dir.join("state.json").display()
    );
    for (i, port) in ports.iter().enumerate() {
        text.push_str(&format!(
            "\n[[engines]]\nname = \"engine-{i}\"\nmodels = [\"m\"]\nport = {port}\n\
             driver = \"process\"\ncommand = [\"true\"]\n"
        ));
    }
    let path = dir.join("rig.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `node-runner health --config <config>` in a thread of its own (the engines answer on
/// this test's runtime meanwhile), with no NODE_RUNNER_* variables from the test's environment.
async fn health(config: &Path) -> Output {
    let config = config.to_owned();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_node-runner"))
            .arg("health")
            .arg("--config")
            .arg(&config)
            .env_clear()
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn an_enrolled_rig_with_answering_engines_is_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [
        engine_answering(StatusCode::OK).await,
        engine_answering(StatusCode::OK).await,
    ];
    let config = write_config(dir.path(), &ports);
    write_identity(&dir.path().join("state.json"));

    let output = health(&config).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "healthy");
}

#[tokio::test]
async fn a_rig_that_has_not_enrolled_is_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &[engine_answering(StatusCode::OK).await]);

    let output = health(&config).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("not enrolled"),
        "{}",
        stderr(&output)
    );

    // A state file that is not an identity (cut short, overwritten) is no enrollment either.
    std::fs::write(dir.path().join("state.json"), b"{\"node_id\": ").unwrap();
    let output = health(&config).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("not enrolled"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn an_engine_that_fails_or_is_gone_makes_the_rig_unhealthy_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let healthy = engine_answering(StatusCode::OK).await;
    let failing = engine_answering(StatusCode::SERVICE_UNAVAILABLE).await;
    // A port nobody listens on: bound, read, and closed again.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = write_config(dir.path(), &[healthy, failing, gone]);
    write_identity(&dir.path().join("state.json"));

    let output = health(&config).await;
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(!message.contains("engine-0"), "{message}");
    assert!(
        message.contains("engine engine-1 answered 503"),
        "{message}"
    );
    assert!(message.contains("engine engine-2 at"), "{message}");
}

#[tokio::test]
async fn a_missing_or_broken_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let output = health(&missing).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("cannot load"),
        "{}",
        stderr(&output)
    );

    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "gateway_url = \"http://127.0.0.1:9\"\nstat_file = \"x\"\n",
    )
    .unwrap();
    let output = health(&broken).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("stat_file"), "{}", stderr(&output));
}
