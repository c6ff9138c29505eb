//! Rigs tunnelled to other replicas (see [`crate::cluster`]): what this replica advertises of
//! its own rigs, and the backends it keeps for the others' rigs, reached through them.

use super::*;

use crate::cluster::Cluster;
use crate::store::keyspace::node_tunnel;

/// A rig on another replica, as this one routes to it.
pub(super) struct Remote {
    replica: String,
    url: String,
    operator: String,
    models: Vec<String>,
    labels: Vec<(String, String)>,
    backend: Arc<Backend>,
    refreshed: Instant,
}

/// One rig as its replica advertises it.
pub(super) struct Advert {
    pub replica: String,
    pub url: String,
    pub node: String,
    pub operator: String,
    pub models: Vec<String>,
    pub in_flight: u32,
    pub heartbeat: Heartbeat,
}

impl Nodes {
    fn remote(&self) -> std::sync::MutexGuard<'_, HashMap<String, Remote>> {
        self.remote.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event for the publisher (in order; nothing waits on the store here).
    fn announce(&self, event: StoreEvent) {
        if let Some(outbox) = &self.outbox {
            let _ = outbox.send(event);
        }
    }

    /// Tells the other replicas how this replica routes a rig of its own, after a heartbeat.
    pub(super) fn advertise(&self, tunnel: &Tunnel, heartbeat: &Heartbeat) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let Some(backend) = &tunnel.backend else {
            return;
        };
        self.announce(StoreEvent::RigAdvertised {
            replica: cluster.replica().to_owned(),
            url: cluster.advertise_url().to_owned(),
            node: tunnel.record.id.clone(),
            operator: tunnel.record.operator.clone(),
            models: tunnel.routed_models.clone(),
            in_flight: backend.local_in_flight(),
            heartbeat: heartbeat.clone(),
        });
    }

    /// Advertises every rig of ours again: a replica started, or missed events.
    pub(super) fn advertise_all(&self) {
        let tunnels = self.tunnels();
        for tunnel in tunnels.values() {
            if let Some(heartbeat) = &tunnel.last_report {
                self.advertise(tunnel, heartbeat);
            }
        }
    }

    /// Asks the other replicas to advertise their rigs now (this one just started, or its
    /// event stream had a gap), instead of waiting for their next heartbeats.
    pub(super) fn ask_for_adverts(&self) {
        if let Some(cluster) = &self.cluster {
            self.announce(StoreEvent::AdvertsWanted {
                replica: cluster.replica().to_owned(),
            });
        }
    }

    /// Whether `replica` is another replica than this one.
    pub(super) fn is_other(&self, replica: &str) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.replica() != replica)
    }

    /// Tells the other replicas a rig of ours left routing here.
    pub(super) fn withdraw(&self, node: &str) {
        if let Some(cluster) = &self.cluster {
            self.announce(StoreEvent::RigWithdrawn {
                replica: cluster.replica().to_owned(),
                node: node.to_owned(),
            });
        }
    }

    /// Publishes what [`Self::advertise`] and [`Self::withdraw`] queued, forever, and keeps
    /// the store's record of which replica holds each tunnel.
    pub async fn publish_adverts(self: Arc<Self>) {
        let Some(mut outbox) = self
            .outbox_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let ttl = self.config.heartbeat_deadline();
        self.ask_for_adverts();
        while let Some(event) = outbox.recv().await {
            if let StoreEvent::RigAdvertised {
                replica, url, node, ..
            } = &event
            {
                let holder = format!("{replica} {url}");
                if let Err(err) = self
                    .store
                    .kv_set(&node_tunnel(node), holder.as_bytes(), Some(ttl))
                    .await
                {
                    tracing::warn!(error = %err, node = %node, "cannot record the rig's replica");
                }
            }
            if let Err(err) = self.store.publish(&event).await {
                // The next heartbeat advertises the rig again.
                tracing::warn!(error = %err, "cannot advertise a rig to the other replicas");
            }
        }
    }

    /// Tells the other replicas this one is stopping, so they drop its rigs at once instead
    /// of at the heartbeat deadline.
    pub async fn announce_stop(&self) {
        if let Some(cluster) = &self.cluster {
            let event = StoreEvent::ReplicaStopped {
                replica: cluster.replica().to_owned(),
                url: cluster.advertise_url().to_owned(),
            };
            if let Err(err) = self.store.publish(&event).await {
                tracing::warn!(error = %err, "cannot tell the other replicas this one stops");
            }
        }
    }

    /// Routes to a rig another replica advertised, through that replica.
    pub(super) fn apply_advert(&self, advert: Advert) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        if advert.replica == cluster.replica() {
            return;
        }
        // Under the tunnels' lock: a rig that attaches here meanwhile is not overwritten.
        let tunnels = self.tunnels();
        if tunnels.contains_key(&advert.node) {
            // Its tunnel here is the newer (the other replica has not noticed the old one
            // died yet), or the older (ours dies by its pings); either way ours routes.
            return;
        }
        let mut remote = self.remote();
        if advert.models.is_empty() {
            if remote
                .get(&advert.node)
                .is_some_and(|r| r.replica == advert.replica)
            {
                remote.remove(&advert.node);
                self.backends.remove(&advert.node);
            }
            return;
        }
        let labels: Vec<(String, String)> = advert.heartbeat.labels.clone().into_iter().collect();
        let load = Arc::new(RigLoad::from_heartbeat(&advert.heartbeat));
        if let Some(known) = remote.get_mut(&advert.node)
            && known.replica == advert.replica
            && known.url == advert.url
            && known.models == advert.models
            && known.labels == labels
            && known.operator == advert.operator
        {
            known.refreshed = Instant::now();
            known.backend.load.store(load);
            known.backend.set_elsewhere_in_flight(advert.in_flight);
            known.backend.set_probe(true);
            return;
        }
        let backend = Arc::new(Backend::new(
            advert.node.clone(),
            advert.models.clone(),
            Transport::Peer {
                peer: cluster.peer(&advert.url),
                node: advert.node.clone(),
            },
            Some(RigInfo {
                node_id: advert.node.clone(),
                operator: advert.operator.clone(),
                labels: labels.clone(),
            }),
            self.backends.origin(),
        ));
        backend.load.store(load);
        backend.set_elsewhere_in_flight(advert.in_flight);
        backend.set_trust(self.trust_of(&advert.node));
        self.backends.upsert(Arc::clone(&backend));
        tracing::info!(node = %advert.node, replica = %advert.replica, models = ?advert.models, "rig on another replica in routing");
        remote.insert(
            advert.node,
            Remote {
                replica: advert.replica,
                url: advert.url,
                operator: advert.operator,
                models: advert.models,
                labels,
                backend,
                refreshed: Instant::now(),
            },
        );
        drop(tunnels);
    }

    /// A rig left routing on the replica that advertised it.
    pub(super) fn apply_withdrawn(&self, replica: &str, node: &str) {
        let _tunnels = self.tunnels();
        let mut remote = self.remote();
        if remote.get(node).is_some_and(|r| r.replica == replica) {
            remote.remove(node);
            self.backends.remove(node);
            tracing::info!(node = %node, replica = %replica, "rig on another replica out of routing");
        }
    }

    /// A replica stopped: its rigs leave routing here until they reconnect elsewhere.
    pub(super) fn apply_replica_stopped(&self, replica: &str, url: &str) {
        let _tunnels = self.tunnels();
        let mut remote = self.remote();
        remote.retain(|node, r| {
            let keep = r.replica != replica;
            if !keep {
                self.backends.remove(node);
            }
            keep
        });
        drop(remote);
        if let Some(cluster) = &self.cluster {
            cluster.forget(url);
        }
        tracing::info!(replica = %replica, "replica stopped; its rigs left routing here");
    }

    /// Drops the rigs of replicas that stopped advertising them (a replica that died).
    pub(super) fn expire_remote(&self, deadline: Duration) {
        let _tunnels = self.tunnels();
        let mut remote = self.remote();
        remote.retain(|node, r| {
            let keep = r.refreshed.elapsed() <= deadline;
            if !keep {
                self.backends.remove(node);
                tracing::warn!(node = %node, replica = %r.replica, "no word of a rig on another replica; out of routing");
            }
            keep
        });
    }

    /// Forgets a rig on another replica, now that it has a tunnel here (under the tunnels'
    /// lock). True when there was one.
    pub(super) fn forget_remote(&self, node: &str) -> bool {
        self.remote().remove(node).is_some()
    }

    /// The replica holding the rig's tunnel, as this one knows it, and whether this replica
    /// routes to it there.
    pub(super) fn remote_holder(&self, node: &str) -> Option<(String, bool)> {
        self.remote()
            .get(node)
            .map(|r| (r.replica.clone(), r.backend.is_healthy()))
    }

    /// The backend of a rig tunnelled here, for a request another replica forwards to it.
    pub fn local_backend(&self, node: &str) -> Option<Arc<Backend>> {
        self.tunnels().get(node).and_then(|t| t.backend.clone())
    }

    /// This replica's cluster, if one is configured.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }
}
