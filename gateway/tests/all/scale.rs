//! Scale: 200 rigs (node-runner agents with simulated engines, in this process) enroll, open
//! their tunnels and heartbeat; requests spread across all of them. The gateway's own memory
//! and CPU at this size are measured by `bench/rigs.sh`, out of process.

use std::time::{Duration, Instant};

use crate::support::*;
use futures::StreamExt;
use garage_node_runner::agent::{Agent, AgentOptions};
use garage_node_runner::cli::simulated_engine;
use garage_node_runner::engines::EngineSet;
use serde_json::json;

const RIGS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_rigs_join_and_share_the_traffic() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let token = enrollment_token(&base, RIGS as u32).await;
    let http = garage_node_runner::agent::http_client();

    let started = Instant::now();
    let rigs: Vec<Agent> = futures::stream::iter(0..RIGS)
        .map(|i| {
            let (base, token, http) = (base.clone(), token.clone(), http.clone());
            async move {
                let engines =
                    EngineSet::start(vec![simulated_engine("sim", &[MODEL.to_owned()], 0, 0.0)])
                        .await;
                Agent::start(
                    AgentOptions {
                        gateway_url: base,
                        name: format!("rig-{i}"),
                        enrollment_token: Some(token),
                        state_file: None,
                        heartbeat_interval: None,
                        drain_timeout: Duration::from_secs(5),
                        http: Some(http),
                        probe_gpus: false,
                        // 200 idle long polls would only add noise to the numbers.
                        batch: garage_node_runner::batch::BatchOptions {
                            enabled: false,
                            ..Default::default()
                        },
                        labels: Default::default(),
                    },
                    engines,
                )
                .await
                .expect("rig joins")
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let backends = gw.state().backends().clone();
    wait_until(Duration::from_secs(60), "every rig in routing", || {
        let backends = backends.clone();
        async move { backends.snapshot().healthy_count() == RIGS }
    })
    .await;
    eprintln!(
        "{RIGS} rigs enrolled, connected and routed in {:?}",
        started.elapsed()
    );

    // Three requests per rig, sixteen at a time.
    let requests = RIGS * 3;
    let statuses: Vec<u16> = futures::stream::iter(0..requests)
        .map(|_| {
            let (base, key) = (base.clone(), key.clone());
            async move { post_chat(&base, &key, &chat(false)).await.0 }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200), "failures: {statuses:?}");

    // Every rig's engine served some of them: round robin reached all 200.
    let mut idle = 0;
    for rig in &rigs {
        let port = rig.engines().port("sim").expect("engine port");
        let metrics = metrics_text(&format!("http://127.0.0.1:{port}")).await;
        let served: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("vllm:request_success_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if served == 0.0 {
            idle += 1;
        }
    }
    assert_eq!(idle, 0, "{idle} rigs got no request");

    let nodes = admin_get(&base, "/admin/nodes").await;
    assert_eq!(nodes["data"].as_array().unwrap().len(), RIGS);

    futures::stream::iter(rigs)
        .for_each_concurrent(32, Agent::shutdown)
        .await;
    assert_eq!(backends.snapshot().healthy_count(), 0);
}
