//! The gateway binary and signals: SIGTERM stops it with exit code 0, even while it starts.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// `gateway demo` answers on its port before all its rigs are in routing; a SIGTERM in that
/// window used to kill the process (its signal handler came after the start), exit code -15.
#[tokio::test]
async fn sigterm_while_the_demo_is_starting_exits_cleanly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = client()
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway did not come up");
        assert!(gateway.try_wait().unwrap().is_none(), "the gateway exited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Command::new("kill")
        .args(["-TERM", &gateway.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = gateway.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = gateway.kill();
            panic!("the gateway did not exit within 20 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "{status}");
    // It stopped while starting: the banner (printed once every rig is ready) never came.
    let mut banner = String::new();
    std::io::Read::read_to_string(&mut gateway.stdout.take().unwrap(), &mut banner).unwrap();
    assert!(
        !banner.contains("curl"),
        "the demo had finished starting: {banner}"
    );
}
