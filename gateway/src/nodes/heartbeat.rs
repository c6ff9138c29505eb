//! Heartbeats: a rig's stats, applied to its tunnel on whichever replica holds it; silent rigs
//! leave routing and come back by themselves.

use super::*;

impl Nodes {
    pub async fn heartbeat(
        &self,
        record: &NodeRecord,
        heartbeat: Heartbeat,
    ) -> Result<HeartbeatAck, ApiError> {
        let live = LiveRecord {
            received_at: unix_now(),
            heartbeat: heartbeat.clone(),
        };
        let json = serde_json::to_vec(&live).map_err(|e| ApiError::Internal(e.to_string()))?;
        self.store
            .kv_set(&node_live(&record.id), &json, Some(LIVE_RECORD_TTL))
            .await?;
        let here = self.apply_heartbeat(&record.id, heartbeat.clone());
        if !here {
            // The tunnel may be on another replica: relay it there.
            self.store
                .publish(&StoreEvent::NodeHeartbeat {
                    id: record.id.clone(),
                    heartbeat,
                })
                .await?;
        }
        Ok(HeartbeatAck {
            drain: record.drained,
            tunnel_connected: here,
        })
    }

    /// Applies a heartbeat to the rig's tunnel if it is on this replica; false if it is not.
    pub(super) fn apply_heartbeat(&self, id: &str, heartbeat: Heartbeat) -> bool {
        let mut tunnels = self.tunnels();
        let Some(tunnel) = tunnels.get_mut(id) else {
            self.early_heartbeats()
                .insert(id.to_owned(), (Instant::now(), heartbeat));
            return false;
        };
        tunnel.last_heartbeat = Some(Instant::now());
        tunnel.gpus = heartbeat.gpus.len() as u32;
        if tunnel.silent_logged {
            tracing::info!(node = %id, "rig heartbeats resumed; back in routing");
            tunnel.silent_logged = false;
        }
        tunnel.draining = heartbeat.draining || tunnel.record.drained || tunnel.record.quarantined;
        let models = if tunnel.draining {
            Vec::new()
        } else {
            heartbeat.serving_models()
        };
        let labels: Vec<(String, String)> = heartbeat.labels.clone().into_iter().collect();
        if models != tunnel.routed_models || labels != tunnel.labels || tunnel.backend.is_none() {
            tunnel.labels = labels;
            self.route(tunnel, models);
        } else if let Some(backend) = &tunnel.backend {
            backend.set_probe(true);
        }
        if let Some(backend) = &tunnel.backend {
            backend
                .load
                .store(Arc::new(RigLoad::from_heartbeat(&heartbeat)));
        }
        if self.cluster().is_some() {
            self.advertise(tunnel, &heartbeat);
        }
        // Kept for `/metrics` (the rig's GPUs and engines), and with a cluster to advertise the
        // rig again to a replica that asks.
        tunnel.last_report = Some(heartbeat);
        true
    }

    /// Puts the rig's backend in routing with `models`, or takes it out when there are none.
    pub(super) fn route(&self, tunnel: &mut Tunnel, models: Vec<String>) {
        let id = tunnel.record.id.clone();
        if models.is_empty() {
            if tunnel.backend.take().is_some() {
                self.backends.remove(&id);
                self.withdraw(&id);
                tracing::info!(node = %id, "rig out of routing");
            }
        } else {
            let backend = Arc::new(Backend::new(
                id.clone(),
                models.clone(),
                Transport::Tunnel(tunnel.sender.clone()),
                Some(RigInfo {
                    node_id: id.clone(),
                    operator: tunnel.record.operator.clone(),
                    labels: tunnel.labels.clone(),
                }),
                self.backends.origin(),
            ));
            backend.set_trust(self.trust_of(&id));
            self.backends.upsert(Arc::clone(&backend));
            tunnel.backend = Some(backend);
            tracing::info!(node = %id, models = ?models, "rig in routing");
        }
        tunnel.routed_models = models;
    }

    /// The rig is shutting down: no new requests; in-flight ones finish over the tunnel.
    pub fn deregister(&self, id: &str) {
        if let Some(tunnel) = self.tunnels().get_mut(id) {
            tunnel.draining = true;
            self.route(tunnel, Vec::new());
        }
    }

    /// Takes silent rigs out of routing and puts them back when they speak again, forever.
    pub async fn watch_heartbeats(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        let deadline = self.config.heartbeat_deadline();
        loop {
            ticker.tick().await;
            // A second of slack: an advert takes a moment to come through the store.
            self.expire_remote(deadline + Duration::from_secs(1));
            let mut tunnels = self.tunnels();
            self.early_heartbeats()
                .retain(|_, (at, _)| at.elapsed() < EARLY_HEARTBEAT_TTL);
            for (id, tunnel) in tunnels.iter_mut() {
                let silent = tunnel
                    .last_heartbeat
                    .is_none_or(|at| at.elapsed() > deadline);
                if let Some(backend) = &tunnel.backend
                    && silent
                    && backend.is_healthy()
                {
                    backend.set_probe(false);
                }
                if tunnel.backend.as_ref().is_some_and(|b| b.is_healthy()) {
                    tunnel.routable_ms += 1000;
                }
                if silent && tunnel.last_heartbeat.is_some() && !tunnel.silent_logged {
                    tunnel.silent_logged = true;
                    tracing::warn!(node = %id, "rig missed its heartbeats; out of routing");
                }
            }
        }
    }

    /// The rigs tunnelled here, their heartbeats' age and last report, for `/metrics`.
    pub fn tunnel_samples(&self) -> Vec<crate::metrics::RigSample> {
        (self.tunnels().iter())
            .map(|(id, tunnel)| crate::metrics::RigSample {
                node: id.clone(),
                name: tunnel.record.name.clone(),
                operator: tunnel.record.operator.clone(),
                heartbeat_age: tunnel.last_heartbeat.map(|at| at.elapsed()),
                heartbeat: tunnel.last_report.clone(),
            })
            .collect()
    }

    /// Each connected rig's routable time since the last call, which starts a new period.
    pub fn take_availability(&self) -> Vec<Availability> {
        self.tunnels()
            .values_mut()
            .map(|tunnel| Availability {
                node_id: tunnel.record.id.clone(),
                operator: tunnel.record.operator.clone(),
                uptime_ms: std::mem::take(&mut tunnel.routable_ms),
                gpus: tunnel.gpus,
            })
            .collect()
    }

    /// Follows other replicas' changes: relayed heartbeats, drains and removals.
    pub async fn follow_events(self: Arc<Self>) {
        let mut events = self.store.subscribe();
        loop {
            match events.recv().await {
                Ok(StoreEvent::NodeHeartbeat { id, heartbeat }) => {
                    self.apply_heartbeat(&id, heartbeat);
                }
                Ok(StoreEvent::RigAdvertised {
                    replica,
                    url,
                    node,
                    operator,
                    models,
                    in_flight,
                    heartbeat,
                }) => self.apply_advert(remote::Advert {
                    replica,
                    url,
                    node,
                    operator,
                    models,
                    in_flight,
                    heartbeat,
                }),
                Ok(StoreEvent::RigWithdrawn { replica, node }) => {
                    self.apply_withdrawn(&replica, &node)
                }
                Ok(StoreEvent::ReplicaStopped { replica, url }) => {
                    self.apply_replica_stopped(&replica, &url)
                }
                Ok(StoreEvent::TrustChanged { node, status }) => {
                    if let Some(status) = trust::TrustStatus::parse(&status) {
                        self.note_trust(&node, status);
                    }
                }
                Ok(StoreEvent::AdvertsWanted { replica }) if self.is_other(&replica) => {
                    self.advertise_all()
                }
                Ok(StoreEvent::Resync) => self.ask_for_adverts(),
                Ok(StoreEvent::NodeChanged { id }) => {
                    if let Ok(Some(record)) = self.get::<NodeRecord>(NODE_KIND, &id).await {
                        self.apply_record(record);
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    pub(super) fn apply_record(&self, record: NodeRecord) {
        let mut tunnels = self.tunnels();
        let Some(tunnel) = tunnels.get_mut(&record.id) else {
            return;
        };
        if record.revoked_at.is_some() {
            tunnel.close.cancel();
            self.route(tunnel, Vec::new());
            return;
        }
        if (record.drained || record.quarantined) && !tunnel.draining {
            tunnel.draining = true;
            self.route(tunnel, Vec::new());
        }
        tunnel.record = record;
    }
}
