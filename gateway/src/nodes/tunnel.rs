//! Tunnels: the connection a rig opens to us, upgraded to HTTP/2 with the roles reversed, pinged,
//! and the backend it becomes.

use super::*;

impl Nodes {
    /// Takes over an upgraded connection as the rig's tunnel: HTTP/2 with us as the client.
    pub fn spawn_tunnel(self: &Arc<Self>, record: NodeRecord, on_upgrade: OnUpgrade) {
        let nodes = Arc::clone(self);
        let close = self.shutdown.child_token();
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Owned through `close`, a child of the registry's shutdown token.
        tokio::spawn({
            let close = close.clone();
            async move {
                let upgraded = match on_upgrade.await {
                    Ok(upgraded) => upgraded,
                    Err(err) => {
                        tracing::warn!(node = %record.id, error = %err, "tunnel upgrade failed");
                        return;
                    }
                };
                let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(TUNNEL_PING_INTERVAL)
                    .keep_alive_timeout(TUNNEL_PING_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .handshake(upgraded)
                    .await;
                let (sender, connection) = match handshake {
                    Ok(pair) => pair,
                    Err(err) => {
                        tracing::warn!(node = %record.id, error = %err, "tunnel handshake failed");
                        return;
                    }
                };
                let id = record.id.clone();
                nodes.attach(record, sender, generation, close.clone());
                tokio::select! {
                    result = connection => {
                        if let Err(err) = result {
                            tracing::info!(node = %id, error = %err, "tunnel closed");
                        } else {
                            tracing::info!(node = %id, "tunnel closed");
                        }
                    }
                    _ = close.cancelled() => tracing::info!(node = %id, "tunnel closed by the gateway"),
                }
                nodes.detach(&id, generation);
            }
        });
    }

    pub(super) fn attach(
        &self,
        record: NodeRecord,
        sender: hyper::client::conn::http2::SendRequest<RequestBody>,
        generation: u64,
        close: CancellationToken,
    ) {
        let id = record.id.clone();
        let drained = record.drained;
        let mut tunnels = self.tunnels();
        let previous = tunnels.insert(
            id.clone(),
            Tunnel {
                generation,
                record,
                sender,
                close,
                last_heartbeat: None,
                last_report: None,
                routed_models: Vec::new(),
                labels: Vec::new(),
                draining: drained,
                backend: None,
                silent_logged: false,
                routable_ms: 0,
                gpus: 0,
            },
        );
        // Taken under the tunnels' lock, as heartbeats are stashed: none falls in between.
        let early = self
            .early_heartbeats()
            .remove(&id)
            .filter(|(at, _)| at.elapsed() < EARLY_HEARTBEAT_TTL);
        // Routed here from now on: no longer through the replica it was on.
        let was_remote = self.forget_remote(&id);
        drop(tunnels);
        if let Some(previous) = previous {
            // The rig reconnected before we noticed its old connection die.
            previous.close.cancel();
            self.backends.remove(&id);
        } else if was_remote {
            self.backends.remove(&id);
        }
        tracing::info!(node = %id, "rig connected");
        if let Some((_, heartbeat)) = early {
            self.apply_heartbeat(&id, heartbeat);
        }
    }

    pub(super) fn detach(&self, id: &str, generation: u64) {
        let mut tunnels = self.tunnels();
        if tunnels.get(id).is_some_and(|t| t.generation == generation) {
            tunnels.remove(id);
            drop(tunnels);
            self.backends.remove(id);
            self.withdraw(id);
            tracing::info!(node = %id, "rig disconnected; out of routing");
        }
    }

    /// Closes every tunnel (gateway shutdown, after in-flight requests finished).
    pub fn close_all(&self) {
        self.shutdown.cancel();
    }
}
