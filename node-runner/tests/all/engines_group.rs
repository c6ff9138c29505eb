//! Engine groups with the process driver and stand-ins: `sh` scripts that log the command line
//! they were given and stay up in place of `ray start`, and the real `sim-engine` behind a
//! script that logs vLLM's flags. No Ray and no GPU here, so what is tested is node-runner's
//! orchestration: the commands, a member going down taking the group's engine down, the group
//! restarted together, and the gateway seeing one backend whose heartbeat lists the members.
//!
//! Needs `cargo build -p garage-sim-engine --bin sim-engine` first.

use std::path::Path;
use std::time::Duration;

use garage_node_protocol::EngineState;
use garage_node_runner::config::{
    Driver, EngineConfig, EngineGroup, GroupMemberConfig, NodeConfig, ProcessDriver,
};
use garage_node_runner::engines::EngineSet;
use garage_node_runner::engines::group::{MEMBER_PATH, Member};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::support::{self, ADMIN, Replica, gateway_config, wait_until};

const BOUND: Duration = Duration::from_secs(30);
const SECRET: &str = "a-group-secret-of-32-characters!";
const MODEL: &str = "big-model";

/// A stand-in for `ray`: logs its arguments to `log`, then stays up until stopped.
fn ray_stand_in(log: &Path) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("echo \"$*\" >> '{}'; exec sleep 100000", log.display()),
        "ray".into(),
    ]
}

/// A stand-in for `vllm serve`: logs the flags node-runner added, then serves as sim-engine.
fn vllm_stand_in(log: &Path) -> Vec<String> {
    let sim = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("sim-engine")))
        .filter(|path| path.exists())
        .expect("target/debug/sim-engine: run `cargo build -p garage-sim-engine --bin sim-engine`");
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "echo \"$*\" >> '{}'; exec '{}' --listen 127.0.0.1:{{port}} --model {MODEL}",
            log.display(),
            sim.display()
        ),
        "vllm".into(),
    ]
}

fn read(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn head_engine(dir: &Path, members: Vec<String>, secret: &str) -> EngineConfig {
    EngineConfig {
        name: "big".into(),
        models: vec![MODEL.into()],
        gpus: vec![0, 1],
        port: support::free_port(),
        driver: Driver::Process(ProcessDriver {
            command: vllm_stand_in(&dir.join("vllm.log")),
            env: Default::default(),
            workdir: None,
            group: Some(EngineGroup {
                address: "127.0.0.1".into(),
                ray_port: support::free_port(),
                members,
                secret: secret.into(),
                ray_command: ray_stand_in(&dir.join("ray-head.log")),
            }),
        }),
        health_timeout_secs: 30,
    }
}

async fn member(dir: &Path) -> Member {
    Member::start(GroupMemberConfig {
        group: "big".into(),
        head: "127.0.0.1:6379".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        secret: SECRET.into(),
        gpus: vec![0, 1],
        ray_command: ray_stand_in(&dir.join("ray-worker.log")),
    })
    .await
    .expect("the member listens")
}

#[tokio::test]
async fn a_group_starts_ray_then_vllm_goes_down_with_a_member_and_restarts_together() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (head_dir, member_dir) = (dir.path().join("head"), dir.path().join("member"));
    std::fs::create_dir_all(&head_dir).unwrap();
    std::fs::create_dir_all(&member_dir).unwrap();
    let member = member(&member_dir).await;
    let gateway = Replica::start(gateway_config("memory")).await;
    let token = support::enrollment_token(&gateway.url, 1).await;
    let config = head_engine(&head_dir, vec![member.addr().to_string()], SECRET);
    let ray_port = match &config.driver {
        Driver::Process(p) => p.group.as_ref().unwrap().ray_port,
        _ => unreachable!(),
    };
    let engines = EngineSet::start(vec![config]).await;
    let agent = garage_node_runner::agent::Agent::start(
        support::rig_options(&gateway.url, &token),
        engines,
    )
    .await
    .expect("the head rig joins");
    let engines = agent.engines();
    assert!(engines.wait_healthy(BOUND).await, "{engines:?}");

    // The commands: Ray's head on this rig, the member's worker (started at its own start and
    // again by the head), vLLM with the parallelism spelled out.
    let head_log = read(&head_dir.join("ray-head.log"));
    assert_eq!(
        head_log,
        [format!(
            "start --head --block --port={ray_port} --node-ip-address=127.0.0.1 --num-gpus=2"
        )]
    );
    let worker_log = read(&member_dir.join("ray-worker.log"));
    assert_eq!(worker_log.len(), 2, "{worker_log:?}");
    assert!(worker_log.iter().all(|line| line
        == "start --block --address=127.0.0.1:6379 --node-ip-address=127.0.0.1 --num-gpus=2"));
    assert_eq!(member.generation().await, 2);
    assert_eq!(
        read(&head_dir.join("vllm.log")),
        ["--pipeline-parallel-size 2 --tensor-parallel-size 2 --distributed-executor-backend ray"]
    );

    // One backend at the gateway: the head rig serves the model, its heartbeat lists the member.
    let node_id = agent.node_id().to_owned();
    let address = member.addr().to_string();
    wait_until(BOUND, "the heartbeat lists the member", || {
        let (url, node_id, address) = (gateway.url.clone(), node_id.clone(), address.clone());
        async move {
            let nodes: Value = support::client()
                .get(format!("{url}/admin/nodes"))
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
                .cloned();
            node.is_some_and(|node| {
                node["routable"] == true
                    && node["models"] == serde_json::json!([MODEL])
                    && node["heartbeat"]["engines"][0]["members"]
                        == serde_json::json!([{"address": address, "up": true, "generation": 2}])
            })
        }
    })
    .await;
    let key = support::api_key(&gateway.url).await;
    let answer = support::client()
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&key)
        .json(&serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 5,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{:?}", answer.text().await);

    // The member's Ray worker dies: the group's engine is down, then the whole group restarts:
    // a new Ray head, the member's worker again, vLLM again.
    let worker = member.worker_pid().await.expect("the worker runs");
    kill(Pid::from_raw(worker as i32), Signal::SIGKILL).unwrap();
    assert!(
        engines
            .wait_for_state("big", EngineState::Restarting, 1, BOUND)
            .await,
        "{engines:?}"
    );
    assert!(
        engines
            .wait_for_state("big", EngineState::Healthy, 1, BOUND)
            .await,
        "{engines:?}"
    );
    assert_eq!(read(&head_dir.join("ray-head.log")).len(), 2);
    assert_eq!(read(&head_dir.join("vllm.log")).len(), 2);
    assert_eq!(member.generation().await, 3);
    assert!(engines.statuses()[0].members.iter().all(|m| m.up));

    agent.shutdown().await;
    member.stop().await;
}

#[tokio::test]
async fn a_group_does_not_start_without_its_members() {
    let dir = tempfile::tempdir().unwrap();
    let member = member(dir.path()).await;
    // One member that is not there, and one whose secret differs.
    for (members, secret) in [
        (vec![format!("127.0.0.1:{}", support::free_port())], SECRET),
        (
            vec![member.addr().to_string()],
            "another-secret-of-32-characters!",
        ),
    ] {
        let engines = EngineSet::start(vec![head_engine(dir.path(), members, secret)]).await;
        assert!(
            engines
                .wait_for_state("big", EngineState::Restarting, 1, BOUND)
                .await,
            "{engines:?}"
        );
        assert!(!engines.serves_any());
        engines.shutdown(Duration::from_secs(1)).await;
    }
    // Neither Ray nor vLLM was started for a group that could not form.
    assert!(read(&dir.path().join("ray-head.log")).is_empty());
    assert!(read(&dir.path().join("vllm.log")).is_empty());
    // doctor on the head rig: the member that answers, the one that is not there, the secret.
    let text = |member: &str, secret: &str| {
        format!(
            "gateway_url = \"http://127.0.0.1:{}\"\n[[engines]]\nname = \"big\"\nmodels = \
             [\"m\"]\nport = {}\ndriver = \"process\"\ncommand = [\"vllm\"]\n[engines.group]\n\
             address = \"127.0.0.1\"\nmembers = [\"{member}\"]\nsecret = \"{secret}\"\n",
            support::free_port(),
            support::free_port()
        )
    };
    let absent = format!("127.0.0.1:{}", support::free_port());
    for (member, secret, expected) in [
        (
            member.addr().to_string(),
            SECRET,
            "ok   group \"big\": member 127.0.0.1:",
        ),
        (
            absent.clone(),
            SECRET,
            &format!("FAIL group \"big\": member {absent} no answer"),
        ),
        (
            member.addr().to_string(),
            "another-secret-of-32-characters!",
            "answered 401 Unauthorized — start node-runner on that rig",
        ),
    ] {
        let config = dir.path().join("head.toml");
        std::fs::write(&config, text(&member, secret)).unwrap();
        let checks =
            garage_node_runner::doctor::doctor(&garage_node_runner::doctor::DoctorOptions {
                config,
                env: Vec::new(),
                gpus: None,
            })
            .await;
        let lines: Vec<String> = checks.iter().map(ToString::to_string).collect();
        assert!(
            lines.iter().any(|l| l.contains(expected)),
            "{expected:?} in {lines:#?}"
        );
    }
    // The member refuses anyone without the secret.
    let response = support::client()
        .get(format!("http://{}{MEMBER_PATH}", member.addr()))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(member.generation().await, 1);
    member.stop().await;
}

#[test]
fn group_configs_parse_and_bad_ones_are_refused() {
    let head = |group: &str| {
        format!(
            "gateway_url = \"http://127.0.0.1:8080\"\n[[engines]]\nname = \"big\"\nmodels = \
             [\"m\"]\ngpus = [0, 1]\nport = 8001\ndriver = \"process\"\ncommand = [\"vllm\", \
             \"serve\", \"m\"]\n[engines.group]\n{group}"
        )
    };
    let good = head(&format!(
        "address = \"192.168.1.10\"\nmembers = [\"192.168.1.11:7401\"]\nsecret = \"{SECRET}\"\n"
    ));
    let config = NodeConfig::load(&good, std::iter::empty()).unwrap();
    let Driver::Process(process) = &config.engines[0].driver else {
        panic!("process expected")
    };
    let group = process.group.as_ref().unwrap();
    assert_eq!(group.ray_port, 6379);
    assert_eq!(group.ray_command, ["ray"]);

    let member = format!(
        "gateway_url = \"http://127.0.0.1:8080\"\n[group_member]\ngroup = \"big\"\nhead = \
         \"192.168.1.10:6379\"\nlisten = \"192.168.1.11:7401\"\nsecret = \"{SECRET}\"\ngpus = [0, 1]\n"
    );
    let config = NodeConfig::load(&member, std::iter::empty()).unwrap();
    assert!(config.engines.is_empty());
    assert_eq!(config.group_member.unwrap().gpus, [0, 1]);

    for (text, expected) in [
        (
            head("address = \"192.168.1.10\"\nmembers = []\nsecret = \"0123456789abcdef\"\n"),
            "group has no members",
        ),
        (
            head(
                "address = \"192.168.1.10\"\nmembers = [\"192.168.1.11\"]\nsecret = \"0123456789abcdef\"\n",
            ),
            "group member \"192.168.1.11\" must be host:port",
        ),
        (
            head("address = \"192.168.1.10\"\nmembers = [\"h:1\"]\nsecret = \"short\"\n"),
            "secret must be at least 16 characters",
        ),
        (
            head(
                "address = \"192.168.1.10\"\nmembers = [\"h:1\"]\nsecret = \"0123456789abcdef\"\nhosts = 2\n",
            ),
            "unknown field `hosts`",
        ),
        (
            member.replace("head = \"192.168.1.10:6379\"", "head = \"192.168.1.10\""),
            "group_member: head \"192.168.1.10\" must be the head's Ray address",
        ),
        (
            format!(
                "{member}[[engines]]\nname = \"own\"\nmodels = [\"m\"]\ngpus = [1]\nport = \
                 8001\ndriver = \"process\"\ncommand = [\"x\"]\n"
            ),
            "GPU 1 is pinned to engine \"own\" and lent to group_member",
        ),
    ] {
        let error = NodeConfig::load(&text, std::iter::empty())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains(expected), "{expected:?}: {error}");
    }
    // A group needs the process driver.
    let docker = good
        .replace("driver = \"process\"", "driver = \"docker\"")
        .replace("command = [\"vllm\", \"serve\", \"m\"]\n", "");
    let error = NodeConfig::load(&docker, std::iter::empty())
        .unwrap_err()
        .to_string();
    assert!(error.contains("unknown field `group`"), "{error}");
}
