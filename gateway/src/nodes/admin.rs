//! What the admin API does to rigs: list, inspect, drain, resume, remove.

use super::*;

impl Nodes {
    pub async fn list(&self) -> Result<Vec<NodeInfo>, ApiError> {
        let mut records: Vec<NodeRecord> = self
            .store
            .record_list(NODE_KIND)
            .await?
            .iter()
            .map(|bytes| serde_json::from_slice(bytes).map_err(corrupt))
            .collect::<Result<_, _>>()?;
        records.sort_by(|a, b| (a.enrolled_at, &a.id).cmp(&(b.enrolled_at, &b.id)));
        let mut infos = Vec::with_capacity(records.len());
        for record in records {
            infos.push(self.info(record).await?);
        }
        judge_hardware(&mut infos);
        Ok(infos)
    }

    /// One rig, its reported hardware judged against the rigs that serve its models.
    pub async fn get_info(&self, id: &str) -> Result<NodeInfo, ApiError> {
        self.require(id).await?;
        self.list()
            .await?
            .into_iter()
            .find(|info| info.id == id)
            .ok_or_else(|| ApiError::NotFound(format!("No rig with id `{id}`.")))
    }

    pub(super) async fn info(&self, record: NodeRecord) -> Result<NodeInfo, ApiError> {
        let live: Option<LiveRecord> = match self.store.kv_get(&node_live(&record.id)).await? {
            Some(bytes) => serde_json::from_slice(&bytes).ok(),
            None => None,
        };
        let here = self.cluster().map(|c| c.replica().to_owned());
        let (connected, routable, replica) = match self.tunnels().get(&record.id) {
            Some(tunnel) => (
                true,
                tunnel.backend.as_ref().is_some_and(|b| b.is_healthy()),
                here,
            ),
            None => match self.remote_holder(&record.id) {
                Some((replica, routable)) => (false, routable, Some(replica)),
                None => (false, false, None),
            },
        };
        let trust = self.trust(&record.id).await?;
        let reported_gpus: Vec<String> = live
            .as_ref()
            .map(|l| l.heartbeat.gpus.iter().map(|g| g.name.clone()).collect())
            .unwrap_or_default();
        let reported_bandwidth_gbps = match reported_gpus.is_empty() {
            true => None,
            false => reported_gpus
                .iter()
                .map(|name| hardware::bandwidth_gbps(name))
                .sum::<Option<f64>>(),
        };
        let measured = self
            .backends
            .snapshot()
            .all()
            .iter()
            .find(|b| b.id == record.id)
            .map(|b| b.measured());
        let known = |x: f32| (x.is_finite() && x > 0.0).then_some(x);
        let hardware = hardware::Hardware {
            reported_gpus,
            reported_bandwidth_gbps,
            measured_ttft_ms: measured.and_then(|(ttft, _)| known(ttft)),
            measured_tokens_per_second: measured.and_then(|(_, speed)| known(speed)),
            ..Default::default()
        };
        Ok(NodeInfo {
            trust,
            hardware,
            models: live
                .as_ref()
                .map(|l| l.heartbeat.serving_models())
                .unwrap_or_default(),
            last_heartbeat_at: live.as_ref().map(|l| l.received_at),
            heartbeat: live.map(|l| l.heartbeat),
            id: record.id,
            name: record.name,
            operator: record.operator,
            enrolled_at: record.enrolled_at,
            revoked: record.revoked_at.is_some(),
            drained: record.drained,
            reference: record.reference,
            connected,
            routable,
            replica,
            version: record.version,
        })
    }

    /// Models the rig serves right now by its own last heartbeat, if that came within the
    /// heartbeat deadline (on any replica: the live record is in the store) and the rig is not
    /// draining. Empty for a rig that never heartbeated, went silent or is draining.
    pub async fn serving_now(&self, id: &str) -> Result<Vec<String>, ApiError> {
        let Some(bytes) = self.store.kv_get(&node_live(id)).await? else {
            return Ok(Vec::new());
        };
        let Ok(live) = serde_json::from_slice::<LiveRecord>(&bytes) else {
            return Ok(Vec::new());
        };
        let fresh = live.received_at + self.config.heartbeat_deadline().as_secs() >= unix_now();
        if !fresh || live.heartbeat.draining {
            return Ok(Vec::new());
        }
        Ok(live.heartbeat.serving_models())
    }

    /// Whether the rig's last heartbeat says it signs its batch lines.
    pub async fn signs_batch_lines(&self, id: &str) -> Result<bool, ApiError> {
        let Some(bytes) = self.store.kv_get(&node_live(id)).await? else {
            return Ok(false);
        };
        Ok(serde_json::from_slice::<LiveRecord>(&bytes)
            .is_ok_and(|live| live.heartbeat.signs_batch_lines))
    }

    pub(super) async fn require(&self, id: &str) -> Result<NodeRecord, ApiError> {
        self.get(NODE_KIND, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("No rig with id `{id}`.")))
    }

    /// Drains (or resumes) a rig: out of routing until resumed; the rig is told to drain.
    pub async fn set_drained(&self, id: &str, drained: bool) -> Result<NodeInfo, ApiError> {
        let mut record = self.require(id).await?;
        record.drained = drained;
        self.put(NODE_KIND, id, &record).await?;
        self.store
            .publish(&StoreEvent::NodeChanged { id: id.to_owned() })
            .await?;
        if let Some(tunnel) = self.tunnels().get_mut(id) {
            tunnel.record.drained = drained;
            tunnel.draining = drained || tunnel.record.quarantined;
            if drained {
                self.route(tunnel, Vec::new());
            }
            // Resuming puts it back in routing with its next heartbeat.
        }
        tracing::info!(node = %id, drained, "rig drain changed by admin");
        self.get_info(id).await
    }

    /// Removes a rig: its credential is refused from now on and its tunnel closed.
    pub async fn revoke(&self, id: &str) -> Result<NodeInfo, ApiError> {
        let mut record = self.require(id).await?;
        if record.revoked_at.is_none() {
            record.revoked_at = Some(unix_now());
            self.put(NODE_KIND, id, &record).await?;
        }
        self.store
            .publish(&StoreEvent::NodeChanged { id: id.to_owned() })
            .await?;
        self.apply_record(record);
        tracing::info!(node = %id, "rig removed by admin");
        self.get_info(id).await
    }
}

/// Gives each rig its hardware verdict, against the others.
fn judge_hardware(infos: &mut [NodeInfo]) {
    let verdicts: Vec<_> = {
        let observed: Vec<hardware::Observed<'_>> = infos
            .iter()
            .map(|info| hardware::Observed {
                models: &info.models,
                hardware: &info.hardware,
            })
            .collect();
        (0..observed.len())
            .map(|i| hardware::judge(&observed, i))
            .collect()
    };
    for (info, (verdict, detail)) in infos.iter_mut().zip(verdicts) {
        info.hardware.verdict = verdict;
        info.hardware.detail = detail;
    }
}
