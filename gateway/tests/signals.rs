//! The gateway binary and signals: SIGTERM stops it with exit code 0, even while it starts.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// `gateway demo` answers on its port before all its rigs are in routing; a SIGTERM in that
/// window used to kill the process (its signal handler came after the start), exit code -15.
#[tokio::test]
async fn sigterm_while_the_demo_is_starting_exits_cleanly() {
    let port = free_port();
    // Many rigs: the demo waits for every one of them, long after the gateway answers.
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_gateway"))
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
    let pid = gateway.id().to_string();
    let mut stdout = gateway.stdout.take().unwrap();
    wait_until(Duration::from_secs(30), "the gateway to answer", || async {
        client()
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
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
    // It stopped while starting: the banner (printed once every rig is ready) never came.
    let mut banner = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut banner).unwrap();
    assert!(
        !banner.contains("curl"),
        "the demo had finished starting: {banner}"
    );
}
