//! `deploy/nginx/nginx.conf` as documented: three replicas behind nginx, apps and rigs on one
//! address. Rigs' tunnels (HTTP/1.1 upgrades) pass through nginx and spread over the replicas;
//! requests through nginx reach every rig; the internal channel is not reachable through it; a
//! replica that stops loses its rigs to the others through the same address.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;
use serde_json::json;

const SECRET: &str = "a-cluster-secret-for-the-tests-0123456789";

/// nginx on the repository's config, its replicas' and its own ports swapped in; killed on
/// drop.
struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    fn start(replica_ports: &[u16]) -> Nginx {
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect(
                "nginx is not installed: scripts/test.sh installs it (apt-get install nginx-light)",
            );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut conf = include_str!("../../../deploy/nginx/nginx.conf").to_owned();
        for (i, replica) in replica_ports.iter().enumerate() {
            let documented = format!("127.0.0.1:{}", 8081 + i);
            assert!(conf.contains(&documented), "the example lost {documented}");
            conf = conf.replace(&documented, &format!("127.0.0.1:{replica}"));
        }
        assert!(conf.contains("listen 8080;"));
        conf = conf.replace("listen 8080;", &format!("listen 127.0.0.1:{port};"));
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        Nginx {
            child,
            _dir: dir,
            port,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn three_replicas_behind_the_documented_nginx() {
    let redis = RedisServer::start();
    let mut replicas = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let mut cfg = config(vec![]);
        cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
        cfg.store = redis.url();
        cfg.auth.key_secret = Some("shared-replica-secret".into());
        cfg.nodes.heartbeat_interval_secs = 1;
        cfg.nodes.missed_heartbeats = 2;
        // Behind a load balancer every client shares its address.
        cfg.connections.max_per_ip = 0;
        cfg.cluster.advertise_url = Some(format!("http://127.0.0.1:{port}"));
        cfg.cluster.secret = Some(SECRET.into());
        replicas.push(Some(gateway(cfg).await));
        ports.push(port);
    }
    let nginx = Nginx::start(&ports);
    let base = nginx.url();
    wait_until(Duration::from_secs(10), "nginx to answer", || async {
        (client().get(format!("{base}/health")).send().await).is_ok_and(|r| r.status() == 200)
    })
    .await;

    let (_, key) = create_key(&base, json!({"name": "behind-nginx"})).await;
    let token = enrollment_token(&base, 6).await;
    let mut rigs = Vec::new();
    for i in 0..6 {
        rigs.push(sim_rig(rig_options(&base, &format!("rig-{i}"), &token), 0.0).await);
    }
    wait_until(Duration::from_secs(15), "every rig routable", || async {
        routable_rigs(&base).await == 6
    })
    .await;
    // The tunnels went through nginx and spread over the replicas.
    let nodes = admin_get(&base, "/admin/nodes").await;
    let holders: std::collections::HashSet<&str> = nodes["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["replica"].as_str())
        .collect();
    assert!(
        holders.len() >= 2,
        "the rigs all went to one replica: {nodes}"
    );
    for i in 0..12 {
        let (status, body) = post_chat(&base, &key, &chat(i % 2 == 0)).await;
        assert_eq!(status, 200, "{body}");
    }
    // The internal channel is not reachable through the public address, secret or not.
    let response = client()
        .post(format!(
            "{base}/internal/rigs/{}/v1/chat/completions",
            rigs[0].node_id()
        ))
        .header("garage-cluster-secret", SECRET)
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    error_of(&response.text().await.unwrap());

    // A replica stops: its rigs come back through nginx on the others; requests go on.
    let stopped = replicas[0].take().unwrap();
    assert!(stopped.shutdown(Duration::from_secs(5)).await);
    wait_until(
        Duration::from_secs(10),
        "every rig routable again",
        || async { routable_rigs(&base).await == 6 },
    )
    .await;
    for i in 0..6 {
        let (status, body) = post_chat(&base, &key, &chat(i % 2 == 0)).await;
        assert_eq!(status, 200, "{body}");
    }
}
