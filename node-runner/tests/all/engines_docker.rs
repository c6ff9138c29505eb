//! The `docker` driver without Docker: the container spec as a pure value, then the whole life
//! cycle against a fake Docker Engine API that records every call. The "container" itself is a
//! simulated engine the test runs on the port the spec publishes, so health checks are real.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use garage_node_protocol::EngineState;
use garage_node_runner::config::{DockerDriver, Driver, EngineConfig};
use garage_node_runner::engines::EngineSet;
use garage_node_runner::engines::docker::{DEFAULT_SHM_SIZE_BYTES, container_spec};
use garage_sim_engine::{SimConfig, SimEngine};
use serde_json::{Value, json};

const BOUND: Duration = Duration::from_secs(10);

fn docker_engine(port: u16, gpus: Vec<u32>, driver: DockerDriver) -> EngineConfig {
    EngineConfig {
        name: "llama".into(),
        models: vec!["meta-llama/Llama-3.1-8B-Instruct".into(), "llama".into()],
        gpus,
        port,
        driver: Driver::Docker(driver),
        health_timeout_secs: 10,
    }
}

fn driver() -> DockerDriver {
    DockerDriver {
        image: "vllm/vllm-openai".into(),
        model_cache: Some("/srv/hf".into()),
        env: BTreeMap::from([("HF_TOKEN".into(), "hf_secret".into())]),
        args: vec!["--tensor-parallel-size".into(), "2".into()],
        docker_host: None,
        shm_size_bytes: None,
    }
}

#[test]
fn container_spec_pins_gpus_publishes_on_loopback_and_mounts_the_cache() -> anyhow::Result<()> {
    let spec = serde_json::to_value(container_spec(
        &docker_engine(8001, vec![0, 2], driver()),
        &driver(),
    ))?;
    assert_eq!(spec["Image"], "vllm/vllm-openai");
    assert_eq!(
        spec["Cmd"],
        json!([
            "--model",
            "meta-llama/Llama-3.1-8B-Instruct",
            "--served-model-name",
            "meta-llama/Llama-3.1-8B-Instruct",
            "llama",
            "--port",
            "8001",
            "--host",
            "0.0.0.0",
            "--tensor-parallel-size",
            "2"
        ])
    );
    assert_eq!(
        spec["Env"],
        json!(["HF_TOKEN=hf_secret", "HF_HOME=/root/.cache/huggingface"])
    );
    assert_eq!(spec["ExposedPorts"], json!({"8001/tcp": {}}));
    assert_eq!(spec["Labels"]["garage.engine"], "llama");
    let host = &spec["HostConfig"];
    assert_eq!(
        host["DeviceRequests"],
        json!([{"Driver": "nvidia", "DeviceIDs": ["0", "2"], "Capabilities": [["gpu"]]}])
    );
    assert_eq!(
        host["PortBindings"],
        json!({"8001/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8001"}]})
    );
    assert_eq!(host["Binds"], json!(["/srv/hf:/root/.cache/huggingface"]));
    assert_eq!(host["ShmSize"], DEFAULT_SHM_SIZE_BYTES);
    assert!(host.get("RestartPolicy").is_none_or(Value::is_null));
    Ok(())
}

#[test]
fn container_spec_without_pinned_gpus_takes_them_all() -> anyhow::Result<()> {
    let driver = DockerDriver {
        model_cache: None,
        env: BTreeMap::from([("HF_HOME".into(), "/models".into())]),
        args: vec![],
        shm_size_bytes: Some(1 << 30),
        ..driver()
    };
    let spec = serde_json::to_value(container_spec(
        &docker_engine(9000, vec![], driver.clone()),
        &driver,
    ))?;
    assert_eq!(
        spec["HostConfig"]["DeviceRequests"],
        json!([{"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}])
    );
    assert!(spec["HostConfig"].get("Binds").is_none_or(Value::is_null));
    assert_eq!(spec["HostConfig"]["ShmSize"], 1 << 30);
    assert_eq!(spec["Env"], json!(["HF_HOME=/models"]));
    Ok(())
}

/// One request the fake daemon received, its API version prefix stripped.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

impl Call {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Default)]
struct FakeDocker {
    calls: Mutex<Vec<Call>>,
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    image_present: bool,
    container_exists: bool,
    running: bool,
}

impl FakeDocker {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn lines(&self) -> Vec<String> {
        self.calls().iter().map(Call::line).collect()
    }

    fn container_exists(&self) -> bool {
        self.state.lock().unwrap().container_exists
    }

    /// The container dies on its own, as an engine crashing out of memory would.
    fn crash(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.running = false;
        }
    }
}

fn no_such(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"message": format!("No such {what}")})),
    )
        .into_response()
}

async fn fake_docker(
    State(fake): State<Arc<FakeDocker>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    // bollard prefixes paths with the negotiated version: `/v1.47/containers/...`.
    let path = uri.path();
    let path = match path.strip_prefix("/v1.") {
        Some(rest) => rest.find('/').map_or(path, |at| &rest[at..]),
        None => path,
    }
    .to_owned();
    let call = Call {
        method: method.clone(),
        path: path.clone(),
        query: uri.query().unwrap_or_default().to_owned(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    if let Ok(mut calls) = fake.calls.lock() {
        calls.push(call);
    }
    let Ok(mut state) = fake.state.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let container = "/containers/garage-llama";
    match (method, path.as_str()) {
        (Method::GET, "/version") => {
            axum::Json(json!({"Version": "27.3.1", "ApiVersion": "1.47"})).into_response()
        }
        (Method::POST, "/images/create") => {
            state.image_present = true;
            "{\"status\":\"Pulling from vllm/vllm-openai\"}\n{\"status\":\"Download complete\"}\n"
                .into_response()
        }
        (Method::POST, "/containers/create") if !state.image_present => no_such("image"),
        (Method::POST, "/containers/create") => {
            state.container_exists = true;
            (
                StatusCode::CREATED,
                axum::Json(json!({"Id": "c0ffee", "Warnings": []})),
            )
                .into_response()
        }
        (_, p) if p.starts_with(container) && !state.container_exists => no_such("container"),
        (Method::DELETE, p) if p == container => {
            state.container_exists = false;
            state.running = false;
            StatusCode::NO_CONTENT.into_response()
        }
        (Method::POST, p) if p == format!("{container}/start") => {
            state.running = true;
            StatusCode::NO_CONTENT.into_response()
        }
        (Method::POST, p) if p == format!("{container}/stop") => {
            let was_running = std::mem::replace(&mut state.running, false);
            if was_running {
                StatusCode::NO_CONTENT.into_response()
            } else {
                StatusCode::NOT_MODIFIED.into_response()
            }
        }
        (Method::GET, p) if p == format!("{container}/json") => axum::Json(json!({
            "Id": "c0ffee",
            "State": {"Running": state.running, "ExitCode": if state.running { 0 } else { 137 }},
        }))
        .into_response(),
        // Follows end at once: no output from a fake container.
        (Method::GET, p) if p == format!("{container}/logs") => StatusCode::OK.into_response(),
        _ => StatusCode::NOT_IMPLEMENTED.into_response(),
    }
}

async fn start_fake_docker()
-> anyhow::Result<(Arc<FakeDocker>, String, tokio::task::JoinHandle<()>)> {
    let fake = Arc::new(FakeDocker::default());
    let app = axum::Router::new()
        .fallback(fake_docker)
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((fake, url, server))
}

async fn eventually(bound: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

#[tokio::test]
async fn docker_engine_life_cycle_against_a_fake_daemon() -> anyhow::Result<()> {
    let (fake, docker_url, server) = start_fake_docker().await?;
    // What the container would serve on its published port.
    let vllm = SimEngine::start(
        "127.0.0.1:0".parse()?,
        SimConfig {
            models: vec!["llama".into()],
            ..SimConfig::default()
        },
    )
    .await?;
    let port = vllm.addr().expect("a TCP engine").port();
    let driver = DockerDriver {
        docker_host: Some(docker_url),
        ..driver()
    };
    let engines = EngineSet::start(vec![docker_engine(port, vec![0, 1], driver)]).await;
    assert!(engines.wait_healthy(BOUND).await, "{engines:?}");
    assert_eq!(
        engines.base_url_for("llama"),
        Some(format!("http://127.0.0.1:{port}"))
    );

    // Start: negotiate, clear a stale container, create (the image is missing: pull, create
    // again), start, follow the logs.
    let lines = fake.lines();
    assert_eq!(
        lines[..6],
        [
            "GET /version",
            "DELETE /containers/garage-llama",
            "POST /containers/create",
            "POST /images/create",
            "POST /containers/create",
            "POST /containers/garage-llama/start",
        ],
        "{lines:#?}"
    );
    // Then, in either order, the log follower (on its own task) and the liveness checks.
    let followed = |from: usize| {
        fake.lines()[from..]
            .iter()
            .any(|l| l == "GET /containers/garage-llama/logs")
    };
    assert!(
        eventually(BOUND, || followed(6)).await,
        "{:#?}",
        fake.lines()
    );
    assert!(
        lines[6..]
            .iter()
            .all(|l| l.starts_with("GET /containers/garage-llama/"))
    );
    let calls = fake.calls();
    assert!(calls[1].query.contains("force=true"), "{:?}", calls[1]);
    assert!(
        calls[2].query.contains("name=garage-llama"),
        "{:?}",
        calls[2]
    );
    // An untagged image is pulled as `latest`, never every tag.
    assert!(
        calls[3].query.contains("fromImage=vllm%2Fvllm-openai"),
        "{:?}",
        calls[3]
    );
    assert!(calls[3].query.contains("tag=latest"), "{:?}", calls[3]);
    let create = &calls[4].body;
    assert_eq!(create["Image"], "vllm/vllm-openai");
    assert_eq!(
        create["HostConfig"]["DeviceRequests"][0]["DeviceIDs"],
        json!(["0", "1"])
    );
    assert_eq!(
        create["HostConfig"]["PortBindings"][format!("{port}/tcp")],
        json!([{"HostIp": "127.0.0.1", "HostPort": port.to_string()}])
    );
    assert_eq!(
        create["HostConfig"]["Binds"],
        json!(["/srv/hf:/root/.cache/huggingface"])
    );
    assert_eq!(create["Cmd"][1], "meta-llama/Llama-3.1-8B-Instruct");

    // The container dies: stopped and removed, then created and started again.
    let before_crash = fake.calls().len();
    fake.crash();
    assert!(
        engines
            .wait_for_state("llama", EngineState::Restarting, 1, BOUND)
            .await,
        "{engines:?}"
    );
    assert!(
        engines
            .wait_for_state("llama", EngineState::Healthy, 1, BOUND)
            .await,
        "{engines:?}"
    );
    assert_eq!(engines.statuses()[0].restarts, 1);
    assert!(eventually(BOUND, || followed(before_crash)).await);
    let after_crash: Vec<String> = fake.lines()[before_crash..]
        .iter()
        .filter(|line| !line.ends_with("/json"))
        .cloned()
        .collect();
    assert_eq!(
        after_crash,
        [
            "POST /containers/garage-llama/stop",
            "DELETE /containers/garage-llama",
            "DELETE /containers/garage-llama",
            "POST /containers/create",
            "POST /containers/garage-llama/start",
            "GET /containers/garage-llama/logs",
        ],
        "{after_crash:#?}"
    );

    // Stop: the daemon is given the grace, then the container is removed.
    let before_stop = fake.calls().len();
    engines.shutdown(Duration::from_secs(7)).await;
    assert_eq!(engines.statuses()[0].state, EngineState::Stopped);
    let stop_calls: Vec<Call> = fake.calls()[before_stop..]
        .iter()
        .filter(|call| !call.path.ends_with("/json"))
        .cloned()
        .collect();
    assert_eq!(
        stop_calls.iter().map(Call::line).collect::<Vec<_>>(),
        [
            "POST /containers/garage-llama/stop",
            "DELETE /containers/garage-llama"
        ]
    );
    assert!(stop_calls[0].query.contains("t=7"), "{:?}", stop_calls[0]);
    assert!(stop_calls[1].query.contains("force=true"));
    assert!(!fake.container_exists());

    vllm.shutdown().await;
    server.abort();
    Ok(())
}

#[tokio::test]
async fn an_unreachable_daemon_is_retried_until_stopped() -> anyhow::Result<()> {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let driver = DockerDriver {
        docker_host: Some(format!("tcp://127.0.0.1:{port}")),
        ..driver()
    };
    let engines = EngineSet::start(vec![docker_engine(8001, vec![], driver)]).await;
    assert!(
        engines
            .wait_for_state("llama", EngineState::Restarting, 1, BOUND)
            .await,
        "{engines:?}"
    );
    engines.shutdown(Duration::from_secs(1)).await;
    assert_eq!(engines.statuses()[0].state, EngineState::Stopped);
    assert!(eventually(BOUND, || !engines.serves_any()).await);
    Ok(())
}

#[tokio::test]
async fn a_stop_during_startup_removes_the_container() -> anyhow::Result<()> {
    let (fake, docker_url, server) = start_fake_docker().await?;
    // Nothing answers /health on this port: the engine stays Starting.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let driver = DockerDriver {
        docker_host: Some(docker_url),
        ..driver()
    };
    let engines = EngineSet::start(vec![docker_engine(port, vec![], driver)]).await;
    assert!(
        eventually(BOUND, || fake
            .lines()
            .iter()
            .any(|l| l == "POST /containers/garage-llama/start"))
        .await
    );
    engines.stop(Duration::from_secs(1)).await;
    let lines = fake.lines();
    let tail: Vec<&String> = lines.iter().filter(|l| !l.ends_with("/json")).collect();
    assert_eq!(
        tail.last().map(|s| s.as_str()),
        Some("DELETE /containers/garage-llama"),
        "{lines:#?}"
    );
    assert!(!fake.container_exists());
    server.abort();
    Ok(())
}
