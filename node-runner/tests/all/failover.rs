//! A rig given several gateway replicas: it skips one that is down, keeps its identity whatever
//! the list's order, and when the replica holding its tunnel is killed it is serving through a
//! surviving one within 5 seconds. Real gateways on loopback, the real agent.

use std::time::{Duration, Instant};

use garage_node_runner::agent::NodeIdentity;

use crate::support::*;

/// Both replicas share one `redis-server`, so the rig's credential is good at each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rig_moves_to_a_surviving_replica_within_5s_when_its_replica_is_killed() {
    init_tracing();
    let redis = RedisServer::start();
    let mut replicas = [
        Replica::start(gateway_config(&redis.url())).await,
        Replica::start(gateway_config(&redis.url())).await,
    ];
    let key = api_key(&replicas[0].url).await;
    let token = enrollment_token(&replicas[1].url, 1).await;
    let list = format!("{},{}", replicas[0].url, replicas[1].url);
    let rig = sim_rig(rig_options(&list, &token)).await;
    let node = rig.node_id().to_owned();

    wait_until(
        Duration::from_secs(20),
        "the rig routable on a replica",
        || async { routable_on(&replicas, &node).await.is_some() },
    )
    .await;
    let on = routable_on(&replicas, &node).await.expect("routable");
    let survivor = 1 - on;
    assert_eq!(rig.gateways().tunnel_url(), replicas[on].url);
    assert_eq!(
        rig_state(&replicas[survivor].url, &node).await,
        Some((false, false))
    );
    let (status, body) = chat(&replicas[on].url, &key).await;
    assert_eq!(status, 200, "{body}");

    replicas[on].kill();
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "the rig routable on the surviving replica",
        || async { rig_state(&replicas[survivor].url, &node).await == Some((true, true)) },
    )
    .await;
    let back_after = killed.elapsed();
    println!("tunnelled and routable on the surviving replica {back_after:?} after the kill");
    assert_eq!(rig.gateways().tunnel_url(), replicas[survivor].url);
    let (status, body) = chat(&replicas[survivor].url, &key).await;
    assert_eq!(status, 200, "{body}");

    // Heartbeats go to the survivor and none waits on the dead replica: the rig stays in
    // routing past two missed heartbeat intervals.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            rig_state(&replicas[survivor].url, &node).await,
            Some((true, true)),
            "left routing {:?} after moving",
            watched.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Deregistration reaches the survivor: it takes the rig out of routing at once.
    let stopped = tokio::spawn(rig.shutdown());
    wait_until(Duration::from_secs(5), "the rig out of routing", || async {
        rig_state(&replicas[survivor].url, &node)
            .await
            .is_some_and(|(_, routable)| !routable)
    })
    .await;
    stopped.await.expect("the rig stops");
}

/// Which replica routes to the rig, if one does.
async fn routable_on(replicas: &[Replica], node: &str) -> Option<usize> {
    for (i, replica) in replicas.iter().enumerate() {
        if rig_state(&replica.url, node).await == Some((true, true)) {
            return Some(i);
        }
    }
    None
}

/// A URL with nothing behind it, the first of the list or not (the rig's own order decides),
/// is skipped; the state file belongs to the set of URLs, so a list in another order, with a
/// replica added, or down to one of its URLs, keeps the identity. The enrollment token has one
/// use: a second enrollment would be refused.
#[tokio::test]
async fn a_dead_gateway_url_is_skipped_and_the_identity_kept_whatever_the_list_order() {
    init_tracing();
    let gateway = Replica::start(gateway_config("memory")).await;
    let live = gateway.url.clone();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let key = api_key(&live).await;
    let token = enrollment_token(&live, 1).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let state = dir.path().join("state.json");

    let mut node = None;
    let added = format!("http://127.0.0.1:{}", free_port());
    for list in [
        format!("{dead},{live}"),
        format!("{live},{dead}"),
        format!("{added},{live}/"),
        live.clone(),
    ] {
        let mut options = rig_options(&list, &token);
        options.state_file = Some(state.clone());
        let rig = sim_rig(options).await;
        let id = rig.node_id().to_owned();
        assert_eq!(node.get_or_insert_with(|| id.clone()), &id, "{list}");
        wait_until(
            Duration::from_secs(20),
            &format!("the rig routable through {list}"),
            || async { rig_state(&live, &id).await == Some((true, true)) },
        )
        .await;
        assert_eq!(rig.gateways().tunnel_url(), live);
        let (status, body) = chat(&live, &key).await;
        assert_eq!(status, 200, "{body}");
        rig.shutdown().await;

        let identity: NodeIdentity =
            serde_json::from_slice(&std::fs::read(&state).expect("the state file"))
                .expect("an identity");
        assert_eq!(identity.gateway_url, live, "enrolled at the live one");
        let mut expected: Vec<String> = list
            .split(',')
            .map(|url| url.trim_end_matches('/').to_owned())
            .collect();
        expected.sort();
        assert_eq!(identity.gateway_urls, expected, "the set it belongs to now");
    }
}

/// A replica whose host lost power sends nothing, not even a reset: the rig's own HTTP/2 pings
/// notice, within their interval and timeout (5 s + 5 s) after the replica last spoke, and the
/// rig moves on. Two silenceable proxies in front of one gateway stand for two replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rig_leaves_a_replica_gone_silent_within_the_ping_bound() {
    init_tracing();
    let gateway = Replica::start(gateway_config("memory")).await;
    let proxies = [
        SilentProxy::start(gateway.addr).await,
        SilentProxy::start(gateway.addr).await,
    ];
    let key = api_key(&gateway.url).await;
    let token = enrollment_token(&gateway.url, 1).await;
    let list = format!("{},{}", proxies[0].url, proxies[1].url);
    let rig = sim_rig(rig_options(&list, &token)).await;
    let node = rig.node_id().to_owned();
    wait_until(Duration::from_secs(20), "the rig routable", || async {
        rig_state(&gateway.url, &node).await == Some((true, true))
    })
    .await;
    let on = proxies
        .iter()
        .position(|proxy| proxy.url == rig.gateways().tunnel_url())
        .expect("the tunnel goes through a proxy");
    let other = &proxies[1 - on].url;

    proxies[on].silence();
    let silenced = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "the tunnel on the other replica",
        || async { rig.gateways().tunnel_url() == other },
    )
    .await;
    let moved_after = silenced.elapsed();
    println!("left the silent replica {moved_after:?} after it went silent");
    assert!(
        moved_after < Duration::from_secs(12),
        "took {moved_after:?}: pings notice within 10 s, then the rig reconnects at once"
    );
    // The gateway takes the new tunnel in place of the silent one and routes through it.
    wait_until(
        Duration::from_secs(15),
        "a chat through the new tunnel",
        || async { chat(&gateway.url, &key).await.0 == 200 },
    )
    .await;
}
