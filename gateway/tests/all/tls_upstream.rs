//! TLS under a private CA, both ways.
//!
//! `https` upstreams: a simulated vLLM serving TLS with a certificate from a private CA, as
//! `vllm serve --ssl-certfile --ssl-keyfile` does. The gateway reaches it through its own
//! connection pool once `dispatch.tls_ca_file` (or the upstream's own `tls_ca_file`, which
//! replaces it for that upstream) names the CA, refuses it without, and will not start with a
//! CA file it cannot use.
//!
//! The gateway's own listener: HTTPS with `tls_cert_file` and `tls_key_file`, for apps and for
//! rigs. A node-runner agent that trusts the CA (`gateway_ca_file`) enrolls and serves through
//! its tunnel; one that trusts only the public roots cannot enroll.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;
use garage_gateway::server::Gateway;
use garage_sim_engine::{SimConfig, SimEngine};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A private CA and an engine certificate for `localhost` that it signed, written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "garage test CA");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let engine_key = KeyPair::generate().unwrap();
        let engine = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&engine_key, &ca)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("engine.pem"), engine.pem()).unwrap();
        std::fs::write(dir.path().join("engine.key"), engine_key.serialize_pem()).unwrap();
        Pki { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The simulated engine on HTTPS with the CA-signed certificate, read from the PEM files as
/// the `sim-engine --ssl-certfile --ssl-keyfile` command line reads them.
async fn tls_sim(pki: &Pki) -> SimEngine {
    let tls =
        garage_sim_engine::tls_server_config(&pki.file("engine.pem"), &pki.file("engine.key"))
            .expect("certificate and key load");
    SimEngine::start_tls(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            models: vec![MODEL.into()],
            ..SimConfig::default()
        },
        tls,
    )
    .await
    .expect("TLS engine starts")
}

/// A gateway whose one upstream is the engine, by the name its certificate carries; probed
/// for health when `probed`.
async fn gateway_to(engine: &SimEngine, ca_file: Option<&Path>, probed: bool) -> Gateway {
    gateway(config_to(engine, ca_file, None, probed)).await
}

/// The config of [`gateway_to`], with `dispatch.tls_ca_file` and the upstream's own
/// `tls_ca_file`.
fn config_to(
    engine: &SimEngine,
    dispatch_ca: Option<&Path>,
    upstream_ca: Option<&Path>,
    probed: bool,
) -> garage_gateway::config::Config {
    assert_eq!(engine.scheme(), "https");
    let url = format!(
        "https://localhost:{}/v1",
        engine.addr().expect("a TCP engine").port()
    );
    let mut upstream = upstream("tls-engine", url);
    upstream.health_path = probed.then(|| "/health".into());
    upstream.tls_ca_file = upstream_ca.map(Path::to_owned);
    let mut config = config(vec![upstream]);
    config.dispatch.tls_ca_file = dispatch_ca.map(Path::to_owned);
    config
}

#[tokio::test]
async fn an_https_upstream_under_the_configured_ca_serves_plain_and_streamed_chat() {
    let pki = Pki::new();
    let engine = tls_sim(&pki).await;
    let gw = gateway_to(&engine, Some(&pki.file("ca.pem")), false).await;
    let base = gw.url();
    let (_, key) = create_key(&base, serde_json::json!({"name": "tls"})).await;

    for _ in 0..3 {
        let (status, body) = post_chat(&base, &key, &chat(false)).await;
        assert_eq!(status, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["usage"]["completion_tokens"], 5);
    }
    // One TLS connection, kept alive and reused: a handshake per request would show as more.
    let idle = || gw.state().backends().snapshot().all()[0].idle_connections();
    wait_until(
        Duration::from_secs(5),
        "the connection back in the pool",
        || async { idle() == 1 },
    )
    .await;
    let (status, body) = post_chat(&base, &key, &chat(true)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("chat.completion.chunk"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    // The gateway asked for usage; the client did not, so it does not see it.
    assert!(!body.contains("\"usage\":{"), "{body}");
    assert_eq!(engine.requests_served(), 4);
    gw.shutdown(Duration::from_secs(5)).await;
}

/// The log lines written while `body` runs, at warn and above. The test's runtime runs on this
/// one thread, the gateway's tasks included, so a thread-local subscriber sees them all.
async fn warnings_during<F: std::future::Future>(body: F) -> (F::Output, String) {
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let output = body.await;
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    (output, text)
}

#[tokio::test]
async fn an_https_upstream_under_an_unknown_ca_is_refused_and_the_log_says_why() {
    let pki = Pki::new();
    let engine = tls_sim(&pki).await;
    let ((status, body), log) = warnings_during(async {
        let gw = gateway_to(&engine, None, false).await;
        let base = gw.url();
        let (_, key) = create_key(&base, serde_json::json!({"name": "tls"})).await;
        let answer = post_chat(&base, &key, &chat(false)).await;
        gw.shutdown(Duration::from_secs(5)).await;
        answer
    })
    .await;
    // The client gets OpenAI's error shape; the operator's log names the cause.
    assert_eq!(status, 502, "{body}");
    error_of(&body);
    assert!(log.contains("backend unreachable"), "{log}");
    assert!(log.contains("UnknownIssuer"), "{log}");
    assert_eq!(engine.requests_served(), 0);
}

#[tokio::test]
async fn health_probes_verify_the_certificate_too() {
    let pki = Pki::new();
    let engine = tls_sim(&pki).await;
    let trusting = gateway_to(&engine, Some(&pki.file("ca.pem")), true).await;
    let distrusting = gateway_to(&engine, None, true).await;
    // The first probe goes out at start: the gateway that cannot verify the engine takes it
    // out of rotation.
    let ready = |gw: &Gateway| {
        let url = format!("{}/ready", gw.url());
        async move { client().get(url).send().await.unwrap().status().as_u16() }
    };
    wait_until(
        Duration::from_secs(10),
        "the unverified engine is out",
        || async { ready(&distrusting).await == 503 },
    )
    .await;
    // The one that trusts the CA probed it at start as well, and keeps it.
    assert_eq!(ready(&trusting).await, 200);
    trusting.shutdown(Duration::from_secs(5)).await;
    distrusting.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_ca_file_the_gateway_cannot_use_stops_its_start_and_names_the_file() {
    let pki = Pki::new();
    let not_pem = pki.file("notes.txt");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    // A key alone: PEM, but no certificate in it.
    let key_only = pki.file("engine.key");
    let missing = pki.file("missing.pem");
    for (file, says) in [
        (&not_pem, "holds no certificate"),
        (&key_only, "holds no certificate"),
        (&missing, "cannot read"),
    ] {
        let mut config = config(Vec::new());
        config.dispatch.tls_ca_file = Some(file.clone());
        let error = Gateway::start(config)
            .await
            .err()
            .expect("the start fails")
            .to_string();
        assert!(error.contains(says), "{error}");
        assert!(error.contains(&file.display().to_string()), "{error}");
    }
}

#[tokio::test]
async fn an_upstreams_own_ca_file_replaces_the_dispatch_one_for_it() {
    let (ours, other) = (Pki::new(), Pki::new());
    let engine = tls_sim(&ours).await;
    let ready = |gw: &Gateway| {
        let url = format!("{}/ready", gw.url());
        async move { client().get(url).send().await.unwrap().status().as_u16() }
    };

    // The upstream names the CA its certificate is from; the dispatch-wide file is another
    // CA's, which alone would be refused (see the tests above).
    let own = config_to(
        &engine,
        Some(&other.file("ca.pem")),
        Some(&ours.file("ca.pem")),
        true,
    );
    let gw = gateway(own).await;
    let (_, key) = create_key(&gw.url(), serde_json::json!({"name": "tls"})).await;
    let (status, body) = post_chat(&gw.url(), &key, &chat(false)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_chat(&gw.url(), &key, &chat(true)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    // Its health probes use the same trust.
    assert_eq!(ready(&gw).await, 200);
    gw.shutdown(Duration::from_secs(5)).await;
    assert_eq!(engine.requests_served(), 2);

    // The other way round: the upstream's own file replaces the dispatch-wide one (the right
    // CA there does not help), so neither requests nor probes verify the engine.
    let swapped = |probed| {
        config_to(
            &engine,
            Some(&ours.file("ca.pem")),
            Some(&other.file("ca.pem")),
            probed,
        )
    };
    let gw = gateway(swapped(false)).await;
    let (_, key) = create_key(&gw.url(), serde_json::json!({"name": "tls"})).await;
    let (status, body) = post_chat(&gw.url(), &key, &chat(false)).await;
    assert_eq!(status, 502, "{body}");
    error_of(&body);
    gw.shutdown(Duration::from_secs(5)).await;
    let gw = gateway(swapped(true)).await;
    wait_until(
        Duration::from_secs(10),
        "the unverified engine is out",
        || async { ready(&gw).await == 503 },
    )
    .await;
    gw.shutdown(Duration::from_secs(5)).await;
    assert_eq!(engine.requests_served(), 2);
}

#[tokio::test]
async fn an_upstream_ca_file_the_gateway_cannot_use_stops_its_start_and_names_both() {
    let pki = Pki::new();
    let engine = tls_sim(&pki).await;
    let missing = pki.file("missing.pem");
    let error = Gateway::start(config_to(&engine, None, Some(&missing), false))
        .await
        .err()
        .expect("the start fails")
        .to_string();
    assert!(error.contains("upstream \"tls-engine\""), "{error}");
    assert!(error.contains("cannot read"), "{error}");
    assert!(error.contains(&missing.display().to_string()), "{error}");
}

/// The `sim-engine` binary, killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_sim_engine_command_serves_https_with_vllm_flags() {
    use std::io::BufRead;
    let pki = Pki::new();
    let mut child = std::process::Command::new(workspace_binary("sim-engine"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--model",
            MODEL,
            "--ssl-certfile",
        ])
        .arg(pki.file("engine.pem"))
        .arg("--ssl-keyfile")
        .arg(pki.file("engine.key"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sim-engine runs");
    let stdout = child.stdout.take().unwrap();
    let child = Child(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    })
    .await
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("sim-engine listening on https://")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"));
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();

    let url = format!("https://localhost:{port}/v1");
    let mut config = config(vec![upstream("tls-engine", url)]);
    config.dispatch.tls_ca_file = Some(pki.file("ca.pem"));
    let gw = gateway(config).await;
    let (_, key) = create_key(&gw.url(), serde_json::json!({"name": "tls"})).await;
    let (status, body) = post_chat(&gw.url(), &key, &chat(true)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    gw.shutdown(Duration::from_secs(5)).await;
    drop(child);
}

#[test]
fn the_sim_engine_command_wants_both_tls_files() {
    let output = std::process::Command::new(workspace_binary("sim-engine"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--ssl-certfile",
            "/nonexistent.pem",
        ])
        .output()
        .expect("sim-engine runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--ssl-keyfile"), "{stderr}");
}

/// A gateway serving HTTPS with the CA-signed `localhost` certificate; its URL by that name,
/// and a client that trusts the CA (a rig agent's client: HTTP/1.1, as OpenAI clients speak).
async fn tls_gateway(
    pki: &Pki,
    upstreams: Vec<garage_gateway::config::UpstreamConfig>,
) -> (Gateway, String, reqwest::Client) {
    let mut config = config(upstreams);
    config.tls_cert_file = Some(pki.file("engine.pem"));
    config.tls_key_file = Some(pki.file("engine.key"));
    let gw = gateway(config).await;
    assert!(gw.url().starts_with("https://"), "{}", gw.url());
    let base = format!("https://localhost:{}", gw.addr().port());
    let client = garage_node_runner::agent::http_client_trusting(&pki.file("ca.pem")).unwrap();
    (gw, base, client)
}

#[tokio::test]
async fn the_gateway_serves_its_api_over_tls() {
    let pki = Pki::new();
    let engine = fast_sim().await;
    let (gw, base, https) = tls_gateway(&pki, vec![upstream("sim", engine.base_url())]).await;
    let (_, key) = create_key_with(&https, &base, serde_json::json!({"name": "tls"})).await;
    for stream in [false, true] {
        let (status, body) = post_chat_with(&https, &base, &key, &chat(stream)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("chat.completion"), "{body}");
    }
    // Plain HTTP on the TLS port gets no answer it could mistake for one.
    let plain = client()
        .get(format!("http://{}/health", gw.addr()))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    gw.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn tls_files_go_together_and_must_load() {
    let pki = Pki::new();
    let text = format!(
        "tls_cert_file = {:?}\n",
        pki.file("engine.pem").display().to_string()
    );
    let error = garage_gateway::Config::load(Some(&text), std::iter::empty())
        .expect_err("a certificate without its key is refused")
        .to_string();
    assert!(error.contains("tls_key_file"), "{error}");

    // A CA certificate with the engine's key: not a pair.
    let mut config = config(Vec::new());
    config.tls_cert_file = Some(pki.file("ca.pem"));
    config.tls_key_file = Some(pki.file("engine.key"));
    let error = Gateway::start(config)
        .await
        .err()
        .expect("a mismatched pair")
        .to_string();
    assert!(error.contains("cannot serve TLS"), "{error}");
}

#[tokio::test]
async fn a_rig_that_trusts_the_ca_joins_a_gateway_over_tls_and_one_that_does_not_cannot() {
    let pki = Pki::new();
    let (gw, base, https) = tls_gateway(&pki, Vec::new()).await;
    let token = enrollment_token_with(&https, &base, 2).await;

    // Only the public roots: the gateway's certificate is not one of theirs.
    let mut distrusting = rig_options(&base, "distrusting", &token);
    distrusting.http = Some(garage_node_runner::agent::http_client());
    let engines = garage_node_runner::engines::EngineSet::start(Vec::new()).await;
    let refused = garage_node_runner::agent::Agent::start(distrusting, engines).await;
    let error = format!(
        "{:#}",
        anyhow::Error::from(refused.err().expect("cannot enroll"))
    );
    assert!(error.contains("certificate"), "{error}");

    let mut trusting = rig_options(&base, "trusting", &token);
    trusting.http = Some(
        garage_node_runner::agent::http_client_trusting(&pki.file("ca.pem")).expect("CA loads"),
    );
    let rig = sim_rig(trusting, 0.0).await;
    wait_until(Duration::from_secs(10), "the rig is routable", || async {
        routable_rigs_with(&https, &base).await == 1
    })
    .await;
    // A request to the gateway reaches the rig through the tunnel it opened over TLS.
    let (_, key) = create_key_with(&https, &base, serde_json::json!({"name": "tls"})).await;
    let (status, body) = post_chat_with(&https, &base, &key, &chat(true)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    rig.shutdown().await;
    gw.shutdown(Duration::from_secs(5)).await;
}
