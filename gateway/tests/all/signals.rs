//! The gateway binary: SIGTERM stops it with exit code 0, even while it starts, on either of
//! the runtimes `worker_threads` picks.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// `gateway demo` answers on its port before all its rigs are in routing; a SIGTERM in that
/// window used to kill the process (its signal handler came after the start), exit code -15.
#[tokio::test]
async fn sigterm_while_the_demo_is_starting_exits_cleanly() {
    let port = free_port();
    // Many rigs: the demo waits for every one of them, long after the gateway answers.
    let mut gateway = Command::new(workspace_binary("gateway"))
        .args([
            "demo",
            "--nodes",
            "60",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = gateway.stdout.take().unwrap();
    wait_until(Duration::from_secs(30), "the gateway to answer", || async {
        client()
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    terminate(gateway).await;
    // It stopped while starting: the banner (printed once every rig is ready) never came.
    let mut banner = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut banner).unwrap();
    assert!(
        !banner.contains("curl"),
        "the demo had finished starting: {banner}"
    );
}

/// Sends SIGTERM and expects exit code 0 within 20 s.
async fn terminate(mut gateway: Child) {
    let pid = gateway.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let exited = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || gateway.wait()),
    )
    .await;
    let Ok(status) = exited else {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        panic!("the gateway did not exit within 20 s of SIGTERM");
    };
    let status = status.unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
}

/// `worker_threads` picks the runtime before anything starts: 1 (here by flag) is tokio's
/// single-threaded scheduler, 3 (by environment) a pool of three. Each serves chat, plain and
/// streamed, reports its workers in `/metrics`, and stops cleanly on SIGTERM.
#[tokio::test]
async fn worker_threads_picks_the_runtime_the_gateway_serves_on() {
    let engine = fast_sim().await;
    let upstreams = format!(
        r#"[{{ name = "sim", base_url = "{}", models = ["{MODEL}"] }}]"#,
        engine.base_url()
    );
    for (flag, env, workers) in [(Some("1"), None, 1), (None, Some("3"), 3)] {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut command = Command::new(workspace_binary("gateway"));
        command
            .arg("serve")
            .env("RUST_LOG", "warn")
            .env("GARAGE_LISTEN", format!("127.0.0.1:{port}"))
            .env("GARAGE_AUTH_ADMIN_TOKEN", ADMIN)
            .env("GARAGE_DEFAULT_PLUGINS", "false")
            .env("GARAGE_UPSTREAMS", &upstreams)
            .env_remove("GARAGE_WORKER_THREADS")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(threads) = flag {
            command.args(["--worker-threads", threads]);
        }
        if let Some(threads) = env {
            command.env("GARAGE_WORKER_THREADS", threads);
        }
        let gateway = command.spawn().unwrap();
        wait_until(Duration::from_secs(30), "the gateway to answer", || async {
            (client().get(format!("{base}/health")).send().await).is_ok_and(|r| r.status() == 200)
        })
        .await;
        let (_, key) = create_key(&base, serde_json::json!({"name": "threads"})).await;
        wait_until(
            Duration::from_secs(10),
            "the model to be served",
            || async { model_ids(&base, &key).await == [MODEL] },
        )
        .await;
        let (status, body) = post_chat(&base, &key, &chat(false)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"completion_tokens\":5"), "{body}");
        let (status, body) = post_chat(&base, &key, &chat(true)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        assert!(body.matches("data: ").count() > 3, "{body}");
        let metrics = metrics_text(&base).await;
        assert!(
            metrics.contains(&format!("\ngarage_runtime_workers {workers}\n")),
            "{metrics}"
        );
        terminate(gateway).await;
    }
}
