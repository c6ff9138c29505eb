//! `node-runner setup` and `node-runner doctor` under a temporary root: real gateways on
//! loopback (one over TLS with a test CA), a fake Docker Engine API that answers with and without
//! the nvidia runtime, GPUs given as an inventory (no GPU here), ports held by real listeners.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use garage_node_runner::config::{Driver, NodeConfig};
use garage_node_runner::doctor::{Check, DoctorOptions, doctor};
use garage_node_runner::engines::container_spec;
use garage_node_runner::probe::GpuInventory;
use garage_node_runner::setup::{
    BENCHMARK_PATH, Choice, STATE_PATH, SetupOptions, UNIT_PATH, setup,
};
use serde_json::{Value, json};

use crate::support::{self, ADMIN, Replica, gateway_config};

/// A Docker Engine API that answers `/version` and `/info`, with `runtimes` in its info.
struct FakeDocker {
    url: String,
    server: tokio::task::JoinHandle<()>,
}

impl FakeDocker {
    async fn start(runtimes: &[&str]) -> FakeDocker {
        let runtimes: serde_json::Map<String, Value> = runtimes
            .iter()
            .map(|name| ((*name).to_owned(), json!({"path": name})))
            .collect();
        let info = Arc::new(json!({"ID": "fake", "Runtimes": runtimes}));
        let app = axum::Router::new().fallback(move |uri: Uri| {
            let info = Arc::clone(&info);
            async move {
                // bollard prefixes paths with the negotiated version: `/v1.47/info`.
                let path = uri.path();
                let path = match path.strip_prefix("/v1.") {
                    Some(rest) => rest.find('/').map_or(path, |at| &rest[at..]),
                    None => path,
                };
                match path {
                    "/version" => axum::Json(json!({"Version": "27.3.1", "ApiVersion": "1.47"}))
                        .into_response(),
                    "/info" => axum::Json((*info).clone()).into_response(),
                    _ => StatusCode::NOT_IMPLEMENTED.into_response(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeDocker { url, server }
    }
}

impl Drop for FakeDocker {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    support::free_port()
}

fn options(root: &Path) -> SetupOptions {
    SetupOptions {
        interactive: false,
        binary: PathBuf::from("/usr/local/bin/node-runner"),
        ..SetupOptions::new(root)
    }
}

fn gpus(spec: &str) -> Option<GpuInventory> {
    Some(GpuInventory::parse(spec).unwrap())
}

const TWO_4090S: &str = "NVIDIA GeForce RTX 4090:24,NVIDIA GeForce RTX 4090:24";

async fn run_setup(
    options: SetupOptions,
) -> (
    Result<garage_node_runner::setup::SetupReport, String>,
    String,
) {
    let mut out = Vec::new();
    let result = setup(options, &mut out).await.map_err(|e| e.to_string());
    (result, String::from_utf8_lossy(&out).into_owned())
}

async fn run_doctor(config: &Path, inventory: Option<GpuInventory>) -> Vec<Check> {
    doctor(&DoctorOptions {
        config: config.to_owned(),
        env: Vec::new(),
        gpus: inventory,
    })
    .await
}

fn lines(checks: &[Check]) -> String {
    checks
        .iter()
        .map(Check::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The one check whose line contains `needle`.
fn check<'a>(checks: &'a [Check], needle: &str) -> &'a Check {
    let found: Vec<&Check> = checks
        .iter()
        .filter(|c| c.to_string().contains(needle))
        .collect();
    assert_eq!(found.len(), 1, "{needle:?} in:\n{}", lines(checks));
    found[0]
}

#[tokio::test]
async fn setup_writes_a_docker_rig_across_two_gpus_and_says_how_to_start_it() {
    let root = tempfile::tempdir().unwrap();
    let docker = FakeDocker::start(&["runc", "nvidia"]).await;
    let (report, out) = run_setup(SetupOptions {
        gateway_url: Some("https://gateway.example.com".into()),
        token: Some("enr_test".into()),
        docker_host: Some(docker.url.clone()),
        gpus: gpus(TWO_4090S),
        no_start: true,
        ..options(root.path())
    })
    .await;
    let report = report.unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert_eq!(report.choice, Choice::Docker);
    // The largest model of the catalogue that fits 2 × 24 GiB, across both.
    assert_eq!(report.model, "Qwen/Qwen3-14B");
    assert_eq!(report.gpus, [0, 1]);
    assert!(out.contains("through the nvidia runtime"), "{out}");
    assert!(
        out.contains("sudo systemctl enable --now node-runner.service"),
        "{out}"
    );

    let config = NodeConfig::load_file(&report.config_path, std::iter::empty()).unwrap();
    assert_eq!(config.gateways(), ["https://gateway.example.com"]);
    assert_eq!(config.enrollment_token.as_deref(), Some("enr_test"));
    assert_eq!(config.state_file, root.path().join(STATE_PATH));
    let engine = &config.engines[0];
    let Driver::Docker(driver) = &engine.driver else {
        panic!("docker expected: {engine:?}")
    };
    assert_eq!(driver.docker_host.as_deref(), Some(docker.url.as_str()));
    // Two GPUs: vLLM is told to split the model across them without the owner saying so.
    let spec = serde_json::to_value(container_spec(engine, driver)).unwrap();
    let cmd: Vec<&str> = spec["Cmd"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        cmd.windows(2).any(|w| w == ["--tensor-parallel-size", "2"]),
        "{cmd:?}"
    );
    // The config holds the token: its owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&report.config_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    let unit = std::fs::read_to_string(root.path().join(UNIT_PATH)).unwrap();
    assert!(
        unit.contains(&format!(
            "ExecStart=/usr/local/bin/node-runner run --config {}",
            report.config_path.display()
        )),
        "{unit}"
    );
    // Nothing started: no identity, no benchmark.
    assert!(!root.path().join(STATE_PATH).exists());
    assert!(!root.path().join(BENCHMARK_PATH).exists());

    // Again without --yes: the config is not overwritten behind the owner's back.
    let (again, _) = run_setup(SetupOptions {
        gateway_url: Some("https://other.example.com".into()),
        token: Some("enr_other".into()),
        docker_host: Some(docker.url.clone()),
        gpus: gpus(TWO_4090S),
        no_start: true,
        ..options(root.path())
    })
    .await;
    let error = again.err().unwrap_or_default();
    assert!(error.contains("exists: pass --yes"), "{error}");
    let kept = NodeConfig::load_file(&report.config_path, std::iter::empty()).unwrap();
    assert_eq!(kept.gateways(), ["https://gateway.example.com"]);
}

#[tokio::test]
async fn without_gpu_passthrough_or_docker_setup_falls_back_to_vllm_as_a_process() {
    let no_nvidia = FakeDocker::start(&["runc"]).await;
    for (docker_host, said) in [
        (
            no_nvidia.url.clone(),
            "would not give them GPUs (runtimes: runc)",
        ),
        (format!("tcp://127.0.0.1:{}", closed_port()), "no Docker at"),
    ] {
        let root = tempfile::tempdir().unwrap();
        let (report, out) = run_setup(SetupOptions {
            gateway_url: Some("https://gateway.example.com".into()),
            token: Some("enr_test".into()),
            docker_host: Some(docker_host),
            gpus: gpus("NVIDIA GeForce RTX 4090:24"),
            no_start: true,
            ..options(root.path())
        })
        .await;
        let report = report.unwrap_or_else(|e| panic!("{e}\n{out}"));
        assert!(out.contains(said), "{out}");
        assert_eq!(report.choice, Choice::Process);
        assert_eq!(report.model, "Qwen/Qwen3-8B");
        assert_eq!(report.gpus, [0]);
        let config = NodeConfig::load_file(&report.config_path, std::iter::empty()).unwrap();
        let Driver::Process(process) = &config.engines[0].driver else {
            panic!("process expected")
        };
        assert_eq!(
            process.command,
            ["vllm", "serve", "Qwen/Qwen3-8B", "--port", "{port}"]
        );
    }
}

#[tokio::test]
async fn setup_refuses_what_cannot_work_and_says_why() {
    let docker = FakeDocker::start(&["nvidia"]).await;
    let cases: Vec<(SetupOptions, &str)> = vec![
        (
            SetupOptions {
                gateway_url: Some("https://gw.example".into()),
                token: Some("t".into()),
                model: Some("meta-llama/Llama-3.3-70B-Instruct".into()),
                docker_host: Some(docker.url.clone()),
                gpus: gpus("NVIDIA GeForce RTX 4090:24"),
                ..options(Path::new("/nonexistent-root"))
            },
            "needs about 160 GiB of GPU memory and this rig has 24 GiB",
        ),
        (
            SetupOptions {
                token: Some("t".into()),
                gpus: gpus("none"),
                ..options(Path::new("/nonexistent-root"))
            },
            "missing --gateway-url (there is no terminal to ask on)",
        ),
        (
            SetupOptions {
                gateway_url: Some("https://gw.example".into()),
                gpus: gpus("none"),
                ..options(Path::new("/nonexistent-root"))
            },
            "missing --token",
        ),
        (
            SetupOptions {
                gateway_url: Some("https://gw.example".into()),
                token: Some("t".into()),
                model: Some("Qwen/Qwen3-8B".into()),
                gpus: gpus("none"),
                ..options(Path::new("/nonexistent-root"))
            },
            "needs an NVIDIA GPU and NVML finds none here",
        ),
        (
            SetupOptions {
                gateway_url: Some("http://10.0.0.5:8080".into()),
                token: Some("t".into()),
                gpus: gpus("none"),
                ..options(Path::new("/nonexistent-root"))
            },
            "is plain http to another machine",
        ),
    ];
    for (options, expected) in cases {
        let (result, out) = run_setup(options).await;
        let error = result.err().unwrap_or_default();
        assert!(error.contains(expected), "{expected:?}: {error}\n{out}");
    }
    // Nothing was written for any of them.
    assert!(!Path::new("/nonexistent-root").exists());
}

#[tokio::test]
async fn setup_enrolls_starts_and_benchmarks_a_trial_rig_and_doctor_finds_it_well() {
    support::init_tracing();
    let gateway = Replica::start(gateway_config("memory")).await;
    let token = support::enrollment_token(&gateway.url, 1).await;
    let root = tempfile::tempdir().unwrap();
    let (report, out) = run_setup(SetupOptions {
        gateway_url: Some(gateway.url.clone()),
        token: Some(token.clone()),
        name: Some("trial-rig".into()),
        gpus: gpus("none"),
        ..options(root.path())
    })
    .await;
    let report = report.unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert_eq!(report.choice, Choice::Simulated);
    let node_id = report.node_id.clone().expect("enrolled");
    let benchmark = report.benchmark.clone().expect("benchmarked");
    assert_eq!(benchmark.completion_tokens, 128);
    assert!(benchmark.tokens_per_sec > 0.0, "{benchmark:?}");
    let recorded: Value =
        serde_json::from_slice(&std::fs::read(root.path().join(BENCHMARK_PATH)).unwrap()).unwrap();
    assert_eq!(recorded["completion_tokens"], 128);
    assert!(out.contains("benchmark: 128 tokens in"), "{out}");
    // Not the real root: the service is not touched, its commands are printed.
    assert!(!report.service_started);
    assert!(out.contains("sudo systemctl daemon-reload"), "{out}");

    // The gateway knows the rig by the name given, and the state file keeps its identity.
    let nodes: Value = support::client()
        .get(format!("{}/admin/nodes", gateway.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let node = nodes["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == node_id.as_str())
        .expect("the rig at the gateway");
    assert_eq!(node["name"], "trial-rig");
    assert!(root.path().join(STATE_PATH).exists());

    // doctor: every check passes, the credential included (the token is spent, not needed).
    let checks = run_doctor(&report.config_path, None).await;
    assert!(checks.iter().all(|c| c.ok), "{}", lines(&checks));
    check(
        &checks,
        &format!("enrolled as {node_id}: the gateway accepts"),
    );

    // The real binary says the same and exits 0.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runner"))
        .args(["doctor", "--config"])
        .arg(&report.config_path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.lines().all(|line| line.starts_with("ok   ")),
        "{stdout}"
    );

    // The admin removes the rig: its credential is refused, and doctor says what to do.
    let removed = support::client()
        .delete(format!("{}/admin/nodes/{node_id}", gateway.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(removed.status().is_success(), "{}", removed.status());
    let checks = run_doctor(&report.config_path, None).await;
    let refused = check(&checks, "refused the credential");
    assert!(!refused.ok);
    assert!(
        refused
            .to_string()
            .contains("ask the gateway's admin for a new enrollment token")
    );

    // A second setup with the spent token (its identity deleted) is refused by the gateway.
    let again = tempfile::tempdir().unwrap();
    let (result, out) = run_setup(SetupOptions {
        gateway_url: Some(gateway.url.clone()),
        token: Some(token),
        gpus: gpus("none"),
        ..options(again.path())
    })
    .await;
    let error = result.err().unwrap_or_default();
    assert!(
        error.contains("This enrollment token has been used up."),
        "{error}\n{out}"
    );
}

/// Writes `text` as a config in a fresh directory, its state file beside it.
fn config_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("node-runner.toml");
    let text = format!(
        "state_file = {:?}\n{text}",
        dir.join("state.json").display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn doctor_explains_a_refused_or_used_up_token() {
    let gateway = Replica::start(gateway_config("memory")).await;
    let token = support::enrollment_token(&gateway.url, 1).await;
    let engine = "[[engines]]\nname = \"sim\"\ndriver = \"simulated\"\nmodels = [\"m\"]\n";
    let text = |token: &str| {
        format!(
            "gateway_url = {:?}\nenrollment_token = {token:?}\n{engine}",
            gateway.url
        )
    };
    // Not enrolled yet: doctor enrolls as the first start would, and keeps the identity.
    let first = tempfile::tempdir().unwrap();
    let config = config_file(first.path(), &text(&token));
    let checks = run_doctor(&config, None).await;
    let enrolled = check(&checks, "enrolled now as node_");
    assert!(enrolled.ok, "{}", lines(&checks));
    assert!(first.path().join("state.json").exists());
    let checks = run_doctor(&config, None).await;
    assert!(check(&checks, "the gateway accepts the rig's credential").ok);

    // The token's one use is spent; another is made up.
    for (bad, said) in [
        (token.as_str(), "This enrollment token has been used up."),
        ("enr_made_up", "Invalid or expired enrollment token."),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let checks = run_doctor(&config_file(dir.path(), &text(bad)), None).await;
        let refused = check(&checks, "refused the enrollment token");
        assert!(!refused.ok);
        assert!(refused.to_string().contains(said), "{refused}");
        assert!(!dir.path().join("state.json").exists());
    }
    // No identity and no token.
    let dir = tempfile::tempdir().unwrap();
    let checks = run_doctor(
        &config_file(
            dir.path(),
            &format!("gateway_url = {:?}\n{engine}", gateway.url),
        ),
        None,
    )
    .await;
    assert!(!check(&checks, "and no enrollment_token").ok);
}

#[tokio::test]
async fn doctor_tells_an_untrusted_certificate_from_an_unreachable_gateway() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let mut config = gateway_config("memory");
    config.tls_cert_file = Some(fixtures.join("cert.pem"));
    config.tls_key_file = Some(fixtures.join("key.pem"));
    let gateway = Replica::start(config).await;
    let base = format!("https://localhost:{}", gateway.addr.port());
    let engine = "[[engines]]\nname = \"sim\"\ndriver = \"simulated\"\nmodels = [\"m\"]\n";
    let dir = tempfile::tempdir().unwrap();

    let checks = run_doctor(
        &config_file(dir.path(), &format!("gateway_url = {base:?}\n{engine}")),
        None,
    )
    .await;
    let tls = check(&checks, &format!("TLS to {base}"));
    assert!(!tls.ok);
    assert!(tls.to_string().contains("UnknownIssuer"), "{tls}");
    assert!(tls.to_string().contains("set gateway_ca_file"), "{tls}");

    // With the CA: the gateway answers (and the rig, without a token, is told it needs one).
    let ca = fixtures.join("ca.pem");
    let checks = run_doctor(
        &config_file(
            dir.path(),
            &format!(
                "gateway_url = {base:?}\ngateway_ca_file = {:?}\n{engine}",
                ca.display().to_string()
            ),
        ),
        None,
    )
    .await;
    assert!(
        check(&checks, &format!("gateway {base} answers")).ok,
        "{}",
        lines(&checks)
    );

    let down = format!("http://127.0.0.1:{}", closed_port());
    let checks = run_doctor(
        &config_file(dir.path(), &format!("gateway_url = {down:?}\n{engine}")),
        None,
    )
    .await;
    let unreachable = check(&checks, &format!("gateway {down} unreachable"));
    assert!(!unreachable.ok);
    // One cause, one line: no enrollment check against a gateway that cannot be reached.
    assert!(!lines(&checks).contains("enrol"), "{}", lines(&checks));
}

/// A stand-in engine whose `/health` answers 500.
async fn sick_engine() -> (u16, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, server)
}

#[tokio::test]
async fn doctor_names_each_thing_wrong_on_the_rig_one_line_each() {
    let no_nvidia = FakeDocker::start(&["runc"]).await;
    let with_nvidia = FakeDocker::start(&["runc", "nvidia"]).await;
    // Held by a program that answers no HTTP.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let (sick, _server) = sick_engine().await;
    let free = support::free_port();
    let gone = format!("unix:///nonexistent/{}/docker.sock", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let engine = |name: &str, port: u16, gpus: &str, host: &str| {
        format!(
            "[[engines]]\nname = {name:?}\nmodels = [\"{name}-model\"]\nport = {port}\ngpus = \
             {gpus}\ndriver = \"docker\"\ndocker_host = {host:?}\n"
        )
    };
    let text = format!(
        "gateway_url = \"http://127.0.0.1:{}\"\n{}{}{}{}",
        closed_port(),
        engine("squatted", taken, "[0]", &with_nvidia.url),
        engine("sick", sick, "[1]", &no_nvidia.url),
        engine("nosocket", free, "[2]", &gone),
        engine("fine", support::free_port(), "[]", &with_nvidia.url),
    );
    let config = config_file(dir.path(), &text);
    let checks = run_doctor(&config, gpus(TWO_4090S)).await;
    let all = lines(&checks);
    assert!(check(&checks, "config ").ok, "{all}");
    assert!(!check(&checks, "unreachable").ok, "{all}");
    assert!(
        check(
            &checks,
            "answers and gives containers GPUs through the nvidia runtime"
        )
        .ok,
        "{all}"
    );
    let passthrough = check(&checks, "GPUs are not visible in containers");
    assert!(
        passthrough
            .to_string()
            .contains("nvidia-ctk runtime configure"),
        "{all}"
    );
    let socket = check(&checks, "no Docker socket at unix:///nonexistent/");
    assert!(!socket.ok, "{all}");
    let gpu = check(&checks, "GPU 2 (engine \"nosocket\") pinned but NVML sees");
    assert!(!gpu.ok, "{all}");
    let port = check(
        &checks,
        &format!("port {taken} of engine \"squatted\" is taken"),
    );
    assert!(!port.ok, "{all}");
    let unhealthy = check(
        &checks,
        &format!("engine \"sick\" on port {sick} is unhealthy (/health answered 500)"),
    );
    assert!(!unhealthy.ok, "{all}");
    assert!(check(&checks, &format!("port {free} is free")).ok, "{all}");
    // Every line is one check: `ok` or `FAIL … — what to do`.
    for line in all.lines() {
        assert!(
            line.starts_with("ok   ") || (line.starts_with("FAIL ") && line.contains(" — ")),
            "{line}"
        );
    }

    // Without NVML, a pinned GPU is one failure, not one per engine.
    let checks = run_doctor(&config, gpus("none")).await;
    assert!(!check(&checks, "NVML is not available").ok);

    // The binary exits non-zero and prints the same lines.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-runner"))
        .args(["doctor", "--assume-gpus", TWO_4090S, "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("FAIL port {taken} of engine")),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("of 10 checks failed"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    drop(squatter);

    // A config that does not load is one failure, and nothing else is checked.
    let broken = config_file(
        dir.path(),
        "gateway_url = \"https://gw\"\n[[engines]]\nname = \"x\"\n",
    );
    let checks = run_doctor(&broken, None).await;
    assert_eq!(checks.len(), 1, "{}", lines(&checks));
    assert!(!checks[0].ok);
    assert!(
        checks[0]
            .to_string()
            .contains("write a new one with `node-runner setup`")
    );
}
