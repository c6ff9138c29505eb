//! Several replicas on one Redis acting as one gateway.
//!
//! A rig's tunnel lives on the replica it connected to. That replica is the authority on the
//! rig: on every heartbeat it applies (and every change of its routing) it publishes a
//! [`StoreEvent::RigAdvertised`](crate::store::StoreEvent::RigAdvertised) through the store's events, and writes which replica holds the tunnel under
//! [`keyspace::node_tunnel`](crate::store::keyspace::node_tunnel). Every other replica keeps
//! the rig in its own routing as a backend reached through the holding replica: a request
//! routed to it is forwarded over HTTP/2 to `/internal/rigs/{node}/v1/...` on that replica,
//! authenticated with the cluster secret, which passes it through the tunnel and streams the
//! answer back. The forwarding replica does everything else (limits, routing, billing, usage),
//! as for a rig of its own; the holding replica is a pipe.
//!
//! An advert not refreshed within the heartbeat deadline is dropped, so a replica that died
//! takes its rigs out of every other replica's routing by then (at once when it stops
//! cleanly); its rigs reconnect to a surviving replica, which advertises them anew.

pub mod api;
mod peer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use subtle::ConstantTimeEq;

pub use peer::Peer;

use crate::config::ClusterConfig;

/// The header that carries the cluster secret on a forwarded request.
pub const SECRET_HEADER: http::HeaderName = http::HeaderName::from_static("garage-cluster-secret");

/// Set on the answers the internal endpoint gives itself (the rig never saw the request), so
/// the forwarding replica tries another backend instead of passing them to its client.
/// Removed from a rig's answers, so that a rig cannot pass its own for ours.
pub const REFUSED_HEADER: http::HeaderName =
    http::HeaderName::from_static("garage-cluster-refused");

/// The forwarding replica's request id on a forwarded request: the holding replica gives every
/// request an id of its own (`x-request-id`), but the rig must be sent the id that keys the
/// request's ledger entry, which its receipt names. Believed only with the cluster secret.
pub const REQUEST_ID_HEADER: http::HeaderName =
    http::HeaderName::from_static("garage-cluster-request-id");

/// Where a replica takes requests forwarded to its rigs: `{FORWARD_PREFIX}{node}/v1/...`.
pub const FORWARD_PREFIX: &str = "/internal/rigs/";

/// This replica's place in the cluster.
pub struct Cluster {
    replica: String,
    advertise_url: String,
    secret: String,
    secret_header: http::HeaderValue,
    connect_timeout: Duration,
    /// Connections to the other replicas, by their advertised URL.
    peers: Mutex<HashMap<String, Arc<Peer>>>,
}

impl Cluster {
    /// The cluster of a config, if it sets one up (validated already: both fields, an
    /// `http://host:port` URL).
    pub fn from_config(config: &ClusterConfig, connect_timeout: Duration) -> Option<Arc<Self>> {
        let (url, secret) = (config.advertise_url.as_ref()?, config.secret.as_ref()?);
        let mut secret_header = http::HeaderValue::from_str(secret).ok()?;
        secret_header.set_sensitive(true);
        Some(Arc::new(Cluster {
            // A new identity per process: a restarted replica's rigs connect to it anew.
            replica: format!("replica-{}", crate::keys::random_token(8)),
            advertise_url: url.trim_end_matches('/').to_owned(),
            secret: secret.clone(),
            secret_header,
            connect_timeout,
            peers: Mutex::new(HashMap::new()),
        }))
    }

    /// This replica's id (new at every start).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Where the other replicas reach this one.
    pub fn advertise_url(&self) -> &str {
        &self.advertise_url
    }

    /// The connection to the replica at `url`, made on first use.
    pub fn peer(&self, url: &str) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(peers.entry(url.to_owned()).or_insert_with(|| {
            Arc::new(Peer::new(
                url,
                self.secret_header.clone(),
                self.connect_timeout,
            ))
        }))
    }

    /// Drops the connection to a replica that went away.
    pub fn forget(&self, url: &str) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(url);
    }

    /// Whether a request carries this cluster's secret (compared in constant time).
    pub fn authenticates(&self, headers: &http::HeaderMap) -> bool {
        headers
            .get(&SECRET_HEADER)
            .is_some_and(|value| value.as_bytes().ct_eq(self.secret.as_bytes()).into())
    }
}
