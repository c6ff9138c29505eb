//! The store's events: published on one channel, heard by every replica.
//!
//! Plain (not sharded) pub/sub reaches every subscriber of the deployment: a Redis Cluster
//! forwards each `PUBLISH` to all its nodes, and a primary's replicas replay its `PUBLISH`es.
//! So each replica subscribes on one server: the server itself, any node of the cluster, or
//! the primary the sentinels name. When that subscription is lost the replica subscribes again
//! (elsewhere if need be) and announces [`StoreEvent::Resync`], since events may have been
//! missed meanwhile.
//!
//! A Sentinel switchover can leave the subscription unbroken on the old primary, which then
//! hears nothing published on the new one until it becomes its replica (and not what was
//! published before that). So on Sentinel the subscriber also asks the sentinels, every
//! [`PRIMARY_CHECK_INTERVAL`], which server is primary, and moves (with a `Resync`) when it is
//! not the one it listens to.

use std::time::Duration;

use futures::StreamExt;
use redis::aio::{MultiplexedConnection, PubSub};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError};
use tokio::sync::broadcast;

use super::super::StoreEvent;
use super::connection::{
    Address, CONNECT_TIMEOUT, SentinelConnection, address_of, bounded_config, sentinel_client,
};
use super::deployment::SentinelTarget;

pub(super) const EVENTS_CHANNEL: &str = "garage:events";

/// How often a subscriber on a Sentinel-watched primary checks that the sentinels still name
/// it. After a switchover the old primary takes writes (lost when it becomes a replica, which
/// Sentinel does only seconds later) until the store notices: short, then; one small command
/// to a sentinel each time.
const PRIMARY_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Where a replica subscribes.
pub(super) enum EventSource {
    /// The one server.
    Single(redis::Client),
    /// Any live node of a cluster: those the cluster lists now, then the seeds of the URL.
    Cluster {
        seeds: Vec<ConnectionInfo>,
        cluster: ClusterConnection,
    },
    /// The primary the sentinels name now.
    Sentinel(Box<SentinelWatch>),
}

/// What a subscriber on Sentinel keeps: how to find the primary, and how to ask whether it
/// moved.
pub(super) struct SentinelWatch {
    client: SentinelClient,
    master: String,
    /// A connection to one of the sentinels for the checks, made again when lost.
    sentinel: Option<MultiplexedConnection>,
    /// The store's own connection, told when the primary moved so that writes follow at once.
    data: SentinelConnection,
}

impl SentinelWatch {
    /// The server the sentinels name primary now (`None` if they know no such master).
    async fn named_primary(&mut self) -> Result<Option<Address>, RedisError> {
        if self.sentinel.is_none() {
            let client = self.client.async_get_sentinel_client().await?;
            let conn = client
                .get_multiplexed_async_connection_with_config(&bounded_config())
                .await?;
            self.sentinel = Some(conn);
        }
        let Some(conn) = self.sentinel.as_mut() else {
            return Ok(None);
        };
        let named = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.master)
            .query_async(conn)
            .await;
        if named.is_err() {
            self.sentinel = None;
        }
        named
    }
}

impl EventSource {
    pub(super) fn cluster(
        seeds: &[String],
        cluster: ClusterConnection,
    ) -> Result<EventSource, RedisError> {
        let seeds = seeds
            .iter()
            .map(|seed| seed.as_str().into_connection_info())
            .collect::<Result<_, _>>()?;
        Ok(EventSource::Cluster { seeds, cluster })
    }

    pub(super) fn sentinel(
        target: &SentinelTarget,
        data: SentinelConnection,
    ) -> Result<EventSource, RedisError> {
        Ok(EventSource::Sentinel(Box::new(SentinelWatch {
            client: sentinel_client(target)?,
            master: target.master.clone(),
            sentinel: None,
            data,
        })))
    }

    /// A connection subscribed to the events channel, and on Sentinel the server it is on.
    async fn subscribe(&mut self) -> Result<(PubSub, Option<Address>), RedisError> {
        match self {
            EventSource::Single(client) => Ok((subscribe_on(client.clone()).await?, None)),
            EventSource::Sentinel(watch) => {
                let client = watch.client.async_get_client().await?;
                let address = address_of(&client);
                Ok((subscribe_on(client).await?, address))
            }
            EventSource::Cluster { seeds, cluster } => {
                let mut candidates = live_nodes(cluster, &seeds[0]).await;
                candidates.extend(seeds.iter().cloned());
                let mut last_err = None;
                for node in candidates {
                    match subscribe_on(redis::Client::open(node)?).await {
                        Ok(pubsub) => return Ok((pubsub, None)),
                        Err(err) => last_err = Some(err),
                    }
                }
                Err(last_err.unwrap_or_else(|| {
                    RedisError::from((redis::ErrorKind::Io, "no cluster node to subscribe on"))
                }))
            }
        }
    }

    /// Whether the sentinels now name a server other than `subscribed` primary. The store's
    /// connection is told what they name each time. A sentinel that cannot say counts as no
    /// move.
    async fn primary_moved(&mut self, subscribed: &Address) -> bool {
        let EventSource::Sentinel(watch) = self else {
            return false;
        };
        let named = tokio::time::timeout(CONNECT_TIMEOUT, watch.named_primary()).await;
        match named {
            Ok(Ok(Some(primary))) => {
                watch.data.follow(&primary);
                if primary != *subscribed {
                    tracing::warn!(
                        from = %format!("{}:{}", subscribed.0, subscribed.1),
                        to = %format!("{}:{}", primary.0, primary.1),
                        "the sentinels moved the Redis primary; subscribing there"
                    );
                    return true;
                }
                false
            }
            Ok(Ok(None)) => false,
            Ok(Err(_)) | Err(_) => {
                watch.sentinel = None;
                false
            }
        }
    }
}

async fn subscribe_on(client: redis::Client) -> Result<PubSub, RedisError> {
    let subscribe = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(EVENTS_CHANNEL).await?;
        Ok(pubsub)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, subscribe)
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "subscribing to store events took too long",
            )))
        })
}

/// The cluster's nodes that are up now, as `CLUSTER NODES` lists them, reached with the
/// credentials of `template`; empty when the cluster cannot say (the seeds remain).
async fn live_nodes(
    cluster: &mut ClusterConnection,
    template: &ConnectionInfo,
) -> Vec<ConnectionInfo> {
    let listing: Result<String, _> = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(cluster)
        .await;
    let Ok(listing) = listing else {
        return Vec::new();
    };
    let ConnectionAddr::Tcp(..) = template.addr() else {
        // TLS nodes: the seeds carry their settings; stay with those.
        return Vec::new();
    };
    parse_live_nodes(&listing)
        .into_iter()
        .map(|(host, port)| template.clone().set_addr(ConnectionAddr::Tcp(host, port)))
        .collect()
}

/// `(host, port)` of each node of a `CLUSTER NODES` listing that is neither failing nor
/// joining. A line: `id host:port@bus[,hostname] flags master ping pong epoch link slots...`.
fn parse_live_nodes(listing: &str) -> Vec<(String, u16)> {
    listing
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            let link = fields.nth(4)?;
            let down = flags
                .split(',')
                .any(|flag| matches!(flag, "fail" | "fail?" | "handshake" | "noaddr"));
            if down || link != "connected" {
                return None;
            }
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return None;
            }
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// The longest wait between two attempts to subscribe again.
const MAX_RESUBSCRIBE_BACKOFF: Duration = Duration::from_secs(1);

/// Relays the Redis channel into the local broadcast, subscribing again after a loss. A
/// reconnect means events may have been missed, so it announces `Resync` for caches to drop
/// everything.
pub(super) async fn forward_events(mut source: EventSource, events: broadcast::Sender<StoreEvent>) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        match source.subscribe().await {
            Ok((mut pubsub, subscribed)) => {
                if !first {
                    let _ = events.send(StoreEvent::Resync);
                }
                first = false;
                backoff = Duration::from_millis(100);
                let mut messages = pubsub.on_message();
                let mut check = tokio::time::interval(PRIMARY_CHECK_INTERVAL);
                check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        message = messages.next() => {
                            let Some(message) = message else {
                                tracing::warn!("store event subscription lost; reconnecting");
                                break;
                            };
                            match serde_json::from_slice::<StoreEvent>(message.get_payload_bytes())
                            {
                                Ok(event) => {
                                    let _ = events.send(event);
                                }
                                Err(err) => tracing::warn!(error = %err, "unreadable store event"),
                            }
                        }
                        _ = check.tick(), if subscribed.is_some() => {
                            if let Some(subscribed) = &subscribed
                                && source.primary_moved(subscribed).await
                            {
                                break;
                            }
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot subscribe to store events"),
        }
        tokio::time::sleep(backoff).await;
        // Reconnect quickly at first (a restart of Redis, a failover), then back off, but not
        // past a second: while unsubscribed, caches may miss a revocation, and the design
        // wants one to reach every replica within a second of the store being back.
        backoff = (backoff * 2).min(MAX_RESUBSCRIBE_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn live_nodes_skip_failing_and_joining_ones() {
        let listing = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001,node-b master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7002@17002 master,fail - 0 1 3 disconnected 10923-16383
d4 :0@0 master,noaddr - 0 0 0 disconnected
e5 [::1]:7004@17004 slave a1 0 1 1 connected
f6 127.0.0.1:7005@17005 handshake - 0 0 0 connected
";
        assert_eq!(
            super::parse_live_nodes(listing),
            [
                ("127.0.0.1".to_owned(), 7000),
                ("127.0.0.1".to_owned(), 7001),
                ("::1".to_owned(), 7004)
            ]
        );
    }
}
