//! Rigs through the real node-runner: enrollment, the reversed HTTP/2 tunnel, heartbeats,
//! engine supervision, drain and removal, against a gateway on port 0.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::*;
use futures::StreamExt;
use serde_json::json;

/// A gateway that expects heartbeats every second and gives up on a rig after two missed.
fn rig_gateway_config() -> garage_gateway::Config {
    let mut cfg = config(vec![]);
    cfg.nodes.heartbeat_interval_secs = 1;
    cfg.nodes.missed_heartbeats = 2;
    cfg
}

async fn wait_routable(base: &str, n: usize) {
    wait_until(
        Duration::from_secs(20),
        &format!("{n} routable rigs"),
        || async { routable_rigs(base).await == n },
    )
    .await;
}

/// `node-runner run` with the process driver running `sim-engine` on `engine_port`.
fn process_rig(
    dir: &Path,
    base: &str,
    token: &str,
    engine_port: u16,
    tokens_per_sec: u32,
) -> NodeRunner {
    let sim_engine = workspace_binary("sim-engine");
    let config = format!(
        r#"gateway_url = "{base}"
enrollment_token = "{token}"
name = "garage-pc"
state_file = "{state}"
drain_timeout_secs = 20

[[engines]]
name = "vllm"
models = ["{MODEL}"]
port = {engine_port}
driver = "process"
command = ["{sim}", "--listen", "127.0.0.1:{{port}}", "--model", "{MODEL}", "--tokens-per-sec", "{tokens_per_sec}"]
"#,
        state = dir.join("state.json").display(),
        sim = sim_engine.display(),
    );
    NodeRunner::start(dir, &config)
}

/// The pid of the process whose command line mentions `needle` (the engine on its port).
fn pid_of(needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains("sim-engine") && cmdline.contains(needle)).then_some(pid)
        })
}

async fn stream_body(base: &str, key: &str, max_tokens: u32) -> reqwest::Response {
    let mut body = chat(true);
    body["max_tokens"] = json!(max_tokens);
    client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("gateway answers")
}

#[tokio::test]
async fn node_runner_serves_survives_its_engine_dying_and_drains_on_sigterm() {
    let gw = gateway(rig_gateway_config()).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let token = enrollment_token(&base, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let engine_port = free_port();
    let mut rig = process_rig(dir.path(), &base, &token, engine_port, 20);

    wait_until(Duration::from_secs(30), "the rig in routing", || async {
        routable_rigs(&base).await == 1
    })
    .await;
    let nodes = admin_get(&base, "/admin/nodes").await;
    let node = &nodes["data"][0];
    assert_eq!(node["name"], "garage-pc");
    assert_eq!(node["operator"], "op-test");
    assert_eq!(node["models"], json!([MODEL]));
    assert_eq!(node["heartbeat"]["engines"][0]["state"], "healthy");
    // The identity is kept for the next start, readable by the rig's user only.
    let state = dir.path().join("state.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Streamed chat through the tunnel.
    let (status, body) = post_chat(&base, &key, &chat(true)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");

    // Kill the engine: the supervisor restarts it and traffic resumes.
    let engine_pid = pid_of(&format!("127.0.0.1:{engine_port}")).expect("engine process");
    Command::new("kill")
        .args(["-KILL", &engine_pid.to_string()])
        .status()
        .unwrap();
    wait_until(Duration::from_secs(30), "the engine restarted", || async {
        let nodes = admin_get(&base, "/admin/nodes").await;
        let engine = &nodes["data"][0]["heartbeat"]["engines"][0];
        engine["restarts"].as_u64() >= Some(1) && engine["state"] == "healthy"
    })
    .await;
    wait_until(
        Duration::from_secs(10),
        "chat after the restart",
        || async { post_chat(&base, &key, &chat(false)).await.0 == 200 },
    )
    .await;
    assert_ne!(
        pid_of(&format!("127.0.0.1:{engine_port}")),
        Some(engine_pid)
    );

    // SIGTERM mid-stream: the stream under way finishes, then the rig leaves and exits 0.
    let response = stream_body(&base, &key, 30).await;
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"delta\":{\"content\":\"") {
        seen.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    rig.signal("TERM");
    while let Some(chunk) = stream.next().await {
        seen.push_str(&String::from_utf8_lossy(
            &chunk.expect("stream intact during drain"),
        ));
    }
    assert!(
        seen.ends_with("data: [DONE]\n\n"),
        "drain cut the stream: {seen}"
    );
    assert_eq!(
        rig.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        rig.log()
    );
    assert_eq!(routable_rigs(&base).await, 0);
    assert!(
        pid_of(&format!("127.0.0.1:{engine_port}")).is_none(),
        "engine left running"
    );
    // The only rig serving the model left: nothing serves it right now, which is 503 (try
    // again), not 404 (no such model) while a rig may come back.
    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(
        (status, error_of(&body)["code"].as_str()),
        (503, Some("no_backend_available"))
    );
}

#[tokio::test]
async fn a_rig_dying_mid_stream_ends_that_stream_and_others_take_over() {
    let gw = gateway(rig_gateway_config()).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let token = enrollment_token(&base, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let doomed_port = free_port();
    let mut doomed = process_rig(dir.path(), &base, &token, doomed_port, 5);
    wait_routable(&base, 1).await;

    let response = stream_body(&base, &key, 50).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"delta\":{\"content\":\"") {
        seen.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    let survivor = sim_rig(rig_options(&base, "survivor", &token), 0.0).await;
    wait_routable(&base, 2).await;

    doomed.signal("KILL");
    doomed.wait_exit(Duration::from_secs(10)).await;
    // A SIGKILLed agent runs no code to stop its engine: the engine goes with it (its
    // parent-death signal), so the port and GPU memory are free for the agent's restart. The
    // rig is gone from routing because its tunnel closed.
    let engine = format!("127.0.0.1:{doomed_port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pid_of(&engine).is_some() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(orphan) = pid_of(&engine) {
        // Leave no process behind, even failing.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &orphan.to_string()])
            .status();
        panic!("the engine outlived its SIGKILLed agent");
    }
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            Err(_) => break,
        }
    }
    assert!(!seen.contains("[DONE]"), "a dead rig cannot finish: {seen}");
    let last = seen.trim_end().rsplit("\n\n").next().unwrap_or_default();
    error_of(last.trim_start_matches("data: "));

    for _ in 0..5 {
        let (status, body) = post_chat(&base, &key, &chat(false)).await;
        assert_eq!(status, 200, "{body}");
    }
    survivor.shutdown().await;
}

#[tokio::test]
async fn enrollment_is_guarded_and_identity_is_kept() {
    let gw = gateway(rig_gateway_config()).await;
    let base = gw.url();
    let enroll = |token: &str| {
        let url = format!("{base}/node/v1/enroll");
        let body = json!({"token": token, "name": "x"});
        async move {
            let response = client().post(url).json(&body).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    for bad in ["", "nonsense", "enr_x.y"] {
        let (status, body) = enroll(bad).await;
        assert_eq!(status, 401, "{bad}: {body}");
        error_of(&body);
    }
    let token = enrollment_token(&base, 1).await;
    let (id, secret) = token.split_once('.').unwrap();
    let (status, _) = enroll(&format!("{id}.wrong{secret}")).await;
    assert_eq!(status, 401);

    // First start enrolls and writes the identity; the second reuses it (the token is spent).
    let dir = tempfile::tempdir().unwrap();
    let mut options = rig_options(&base, "kept", &token);
    options.state_file = Some(dir.path().join("state.json"));
    let first = sim_rig(options, 0.0).await;
    let node_id = first.node_id().to_owned();
    first.shutdown().await;
    let (status, _) = enroll(&token).await;
    assert_eq!(status, 401, "a single-use token enrolled twice");
    let mut options = rig_options(&base, "kept", &token);
    options.state_file = Some(dir.path().join("state.json"));
    let second = sim_rig(options, 0.0).await;
    assert_eq!(second.node_id(), node_id);
    wait_routable(&base, 1).await;

    // Node endpoints refuse API keys and admin tokens: credentials are separate.
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    for token in [key.as_str(), ADMIN] {
        let response = client()
            .post(format!("{base}/node/v1/heartbeat"))
            .bearer_auth(token)
            .json(&json!({"gpus": [], "engines": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    second.shutdown().await;
}

#[tokio::test]
async fn admins_drain_resume_and_remove_rigs() {
    let gw = gateway(rig_gateway_config()).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let token = enrollment_token(&base, 2).await;
    let a = sim_rig(rig_options(&base, "a", &token), 0.0).await;
    let b = sim_rig(rig_options(&base, "b", &token), 0.0).await;
    wait_routable(&base, 2).await;
    let a_id = a.node_id().to_owned();

    let (status, info) = admin_post(&base, &format!("/admin/nodes/{a_id}/drain"), json!({})).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["drained"], true);
    assert_eq!(routable_rigs(&base).await, 1);
    for _ in 0..4 {
        assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    }
    let (status, _) = admin_post(&base, &format!("/admin/nodes/{a_id}/resume"), json!({})).await;
    assert_eq!(status, 200);
    wait_routable(&base, 2).await;

    let removed = client()
        .delete(format!("{base}/admin/nodes/{a_id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    // Refused at once: the tunnel is closed and the agent learns it is revoked.
    tokio::time::timeout(Duration::from_secs(10), a.revoked())
        .await
        .expect("the removed rig is told");
    assert_eq!(routable_rigs(&base).await, 1);
    let node = admin_get(&base, &format!("/admin/nodes/{a_id}")).await;
    assert_eq!(node["revoked"], true);
    assert_eq!(node["connected"], false);
    for _ in 0..4 {
        assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    }
    let missing = client()
        .get(format!("{base}/admin/nodes/node_nope"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn missed_heartbeats_take_a_rig_out_until_they_resume() {
    let gw = gateway(rig_gateway_config()).await;
    let base = gw.url();
    let token = enrollment_token(&base, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut options = rig_options(&base, "quiet", &token);
    options.state_file = Some(dir.path().join("state.json"));
    // One heartbeat when the tunnel opens, then silence for an hour.
    options.heartbeat_interval = Some(Duration::from_secs(3600));
    let rig = sim_rig(options, 0.0).await;
    wait_routable(&base, 1).await;
    wait_until(
        Duration::from_secs(10),
        "the silent rig leaves routing",
        || async { routable_rigs(&base).await == 0 },
    )
    .await;
    let node = admin_get(&base, "/admin/nodes").await;
    assert_eq!(
        node["data"][0]["connected"], true,
        "the tunnel itself is fine"
    );

    // A heartbeat in the rig's name brings it back.
    let identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
    let heartbeat = json!({
        "gpus": [],
        "engines": [{"name": "sim", "models": [MODEL], "state": "healthy", "restarts": 0, "stats": null}],
    });
    let ack: serde_json::Value = client()
        .post(format!("{base}/node/v1/heartbeat"))
        .bearer_auth(identity["credential"].as_str().unwrap())
        .json(&heartbeat)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ack["tunnel_connected"], true);
    assert_eq!(routable_rigs(&base).await, 1);
    rig.shutdown().await;
}

#[tokio::test]
async fn rigs_reconnect_by_themselves_after_a_gateway_restart() {
    let redis = RedisServer::start();
    let replica = |listen: std::net::SocketAddr| {
        let mut cfg = rig_gateway_config();
        cfg.listen = listen;
        cfg.store = redis.url();
        cfg.auth.key_secret = Some("s".into());
        cfg
    };
    let first = gateway(replica("127.0.0.1:0".parse().unwrap())).await;
    let addr = first.addr();
    let base = first.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let token = enrollment_token(&base, 1).await;
    let rig = sim_rig(rig_options(&base, "survivor", &token), 0.0).await;
    wait_routable(&base, 1).await;

    // The gateway goes away and comes back on the same address (a redeploy).
    assert!(first.shutdown(Duration::from_secs(5)).await);
    let second = gateway(replica(addr)).await;
    wait_until(Duration::from_secs(30), "the rig reconnected", || async {
        routable_rigs(&base).await == 1
    })
    .await;
    let (status, body) = post_chat(&base, &key, &chat(true)).await;
    assert_eq!(status, 200, "{body}");
    rig.shutdown().await;
    drop(second);
}
