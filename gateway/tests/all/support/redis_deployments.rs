//! Redis deployments beyond one server, started from the real binaries on free ports and
//! stopped on drop: a Redis Cluster of three masters (`redis-server --cluster-enabled yes`,
//! joined by `redis-cli --cluster create`) and a primary with a replica watched by three
//! sentinels (`redis-server --sentinel`). `scripts/test.sh` installs both binaries; a test
//! that cannot start them fails, it is never skipped.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// How long a deployment may take to form (nodes meeting, sentinels finding each other).
const FORM_BOUND: Duration = Duration::from_secs(30);

/// One `redis-server` process (a node, a replica or a sentinel), logging into the deployment's
/// folder, killed on drop.
pub struct RedisProcess {
    child: Child,
    pub port: u16,
}

impl RedisProcess {
    fn spawn(dir: &Path, name: &str, port: u16, args: &[String]) -> RedisProcess {
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new("redis-server")
            .args(args)
            .current_dir(dir)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test.sh installs it)");
        let mut process = RedisProcess { child, port };
        let deadline = Instant::now() + FORM_BOUND;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            // One that exits at once was refused its arguments (an old redis-server, say).
            let exited = process.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{name} (redis-server {}) did not start ({exited:?}):\n{}",
                args.join(" "),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }

    /// Kills the process at once (SIGKILL): what it had not replicated is gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` (blocking; deployments form before a test's async part starts).
fn wait_blocking(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + FORM_BOUND;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A command's answer from the server on `port`, as `T`.
pub fn query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut conn)
}

/// `INFO`-style `field:value` lines as a map.
fn info_fields(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A Redis Cluster of masters without replicas, on free ports.
pub struct RedisCluster {
    pub nodes: Vec<RedisProcess>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// `masters` nodes (3 at least, as `redis-cli --cluster create` wants), slots spread over
    /// them; returns once every node says the cluster is ok.
    pub fn start(masters: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("temporary folder");
        let nodes: Vec<RedisProcess> = (0..masters)
            .map(|i| {
                let port = free_port();
                // The bus port is given too: the default, port + 10000, may be taken or out of
                // range for a free port picked high.
                let bus = free_port();
                let args = [
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-node-timeout",
                    "2000",
                ]
                .map(String::from);
                RedisProcess::spawn(dir.path(), &format!("node{i}"), port, &args)
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH (scripts/test.sh installs redis-tools)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        for node in &nodes {
            wait_blocking(&format!("cluster ok on node {}", node.port), || {
                query::<String>(node.port, &["CLUSTER", "INFO"]).is_ok_and(|info| {
                    let info = info_fields(&info);
                    info.get("cluster_state").map(String::as_str) == Some("ok")
                        && info.get("cluster_known_nodes") == Some(&masters.to_string())
                })
            });
        }
        RedisCluster { nodes, _dir: dir }
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }
}

/// The name the sentinels monitor the primary under.
pub const SENTINEL_MASTER: &str = "garage-primary";
/// How long a primary may be silent before a sentinel calls it down. Short, for tests; see
/// docs/operations.md for what a deployment would pick.
pub const DOWN_AFTER_MS: u64 = 1000;
/// How long one failover attempt may take (a failed one is retried after twice this).
pub const FAILOVER_TIMEOUT_MS: u64 = 5000;

/// A primary, one replica of it and three sentinels (quorum two) watching them.
pub struct RedisFailover {
    /// `None` once killed.
    pub primary: Option<RedisProcess>,
    pub replica: RedisProcess,
    pub sentinels: Vec<RedisProcess>,
    dir: tempfile::TempDir,
}

impl RedisFailover {
    /// Returns once the replica is in sync and every sentinel knows the replica and the other
    /// sentinels, with the quorum reachable: the primary can be failed over from then on.
    pub fn start() -> RedisFailover {
        let dir = tempfile::tempdir().expect("temporary folder");
        let server = |port: u16, extra: &[&str]| -> Vec<String> {
            let mut args = vec![
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        };
        let primary_port = free_port();
        let primary = RedisProcess::spawn(
            dir.path(),
            "primary",
            primary_port,
            &server(primary_port, &[]),
        );
        let replica_port = free_port();
        let replica = RedisProcess::spawn(
            dir.path(),
            "replica",
            replica_port,
            &server(
                replica_port,
                &["--replicaof", "127.0.0.1", &primary_port.to_string()],
            ),
        );
        wait_blocking("the replica in sync", || {
            query::<String>(replica_port, &["INFO", "replication"]).is_ok_and(|info| {
                info_fields(&info)
                    .get("master_link_status")
                    .map(String::as_str)
                    == Some("up")
            })
        });
        let sentinels: Vec<RedisProcess> = (0..3)
            .map(|i| {
                let port = free_port();
                // Sentinel rewrites its config file as it learns the deployment: one each.
                let config = dir.path().join(format!("sentinel{i}.conf"));
                std::fs::write(
                    &config,
                    format!(
                        "port {port}\nbind 127.0.0.1\n\
                         sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary_port} 2\n\
                         sentinel down-after-milliseconds {SENTINEL_MASTER} {DOWN_AFTER_MS}\n\
                         sentinel failover-timeout {SENTINEL_MASTER} {FAILOVER_TIMEOUT_MS}\n\
                         sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
                    ),
                )
                .expect("sentinel config written");
                let args = [config.display().to_string(), "--sentinel".to_owned()];
                RedisProcess::spawn(dir.path(), &format!("sentinel{i}"), port, &args)
            })
            .collect();
        for sentinel in &sentinels {
            wait_blocking(&format!("sentinel {} ready", sentinel.port), || {
                let master: redis::RedisResult<HashMap<String, String>> =
                    query(sentinel.port, &["SENTINEL", "MASTER", SENTINEL_MASTER]);
                let quorum: redis::RedisResult<String> =
                    query(sentinel.port, &["SENTINEL", "CKQUORUM", SENTINEL_MASTER]);
                master.is_ok_and(|m| {
                    m.get("num-slaves").map(String::as_str) == Some("1")
                        && m.get("num-other-sentinels").map(String::as_str) == Some("2")
                }) && quorum.is_ok()
            });
        }
        RedisFailover {
            primary: Some(primary),
            replica,
            sentinels,
            dir,
        }
    }

    /// `redis+sentinel://` listing every sentinel.
    pub fn url(&self) -> String {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{SENTINEL_MASTER}", sentinels.join(","))
    }

    /// Waits (blocking, up to a second) until the replica has every write the primary took so
    /// far, so that a test's state before a failover survives it.
    pub fn wait_replicated(&self) {
        let primary = self.primary.as_ref().expect("the primary is up");
        let acked: i64 = query(primary.port, &["WAIT", "1", "1000"]).expect("WAIT answers");
        assert_eq!(acked, 1, "the replica did not acknowledge the writes");
    }

    /// Kills the primary (SIGKILL); the sentinels promote the replica.
    pub fn kill_primary(&mut self) {
        self.primary.take().expect("the primary is up").kill();
    }

    /// The port of the server the sentinels name primary now.
    pub fn primary_port_by_sentinels(&self) -> Option<u16> {
        let address: Vec<String> = query(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER],
        )
        .ok()?;
        address.get(1)?.parse().ok()
    }

    /// The processes' logs, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["primary", "replica", "sentinel0", "sentinel1", "sentinel2"] {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                .unwrap_or_default();
            out.push_str(&format!("--- {name}\n{log}"));
        }
        out
    }
}
