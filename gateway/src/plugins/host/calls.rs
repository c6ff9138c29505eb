//! Calls into the slots: which version takes a call (canary or active), the call itself,
//! its fallback and fault accounting, and the rate limiter's reservations.

use super::*;

impl PluginHost {
    /// Orders `candidates` by preference: indices, best first. `None` means use the built-in
    /// round robin: no router installed, no candidates, or the router faulted (a trap, its
    /// deadline, an error, an empty list, an index out of range or repeated). `infos` says who
    /// the candidates are, index for index, for a router that asks (`candidates.describe`).
    pub async fn route(
        &self,
        request: &RouteRequest,
        candidates: &[Candidate],
        infos: &[Arc<CandidateInfo>],
    ) -> Option<Vec<u32>> {
        debug_assert_eq!(candidates.len(), infos.len());
        if candidates.is_empty() {
            return None;
        }
        let pick = Pick::Random;
        let (plugin, answer) = self
            .call(Slot::Router, pick, Call::Route(request, candidates, infos))
            .await?;
        let checked = match answer {
            Ok(Answer::Route(Ok(order))) => check_route(order, candidates.len()),
            Ok(Answer::Route(Err(message))) => Err((FaultKind::PluginError, message)),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        self.settle_answer(&plugin, checked).ok()
    }

    /// Asks the rate limiter whether a request may go now. `None` only when no limiter is
    /// installed. When the limiter faults, the answer is the configured fallback
    /// (`rate_limiter_fail_open`): an allow, or a refusal with a one-second retry.
    pub async fn admit(&self, admission: &Admission) -> Option<Decision> {
        self.admit_reserving(admission)
            .await
            .map(|(decision, _)| decision)
    }

    /// [`admit`](Self::admit), with the version of the limiter that allowed the request: its
    /// settlement goes to that version ([`settle_with`](Self::settle_with)), whatever was
    /// promoted or rolled back meanwhile. No reservation when the fallback decided.
    pub async fn admit_reserving(
        &self,
        admission: &Admission,
    ) -> Option<(Decision, Option<Reservation>)> {
        let pick = Pick::Hash(&admission.request_id);
        let (plugin, answer) = self
            .call(Slot::RateLimiter, pick, Call::Admit(admission))
            .await?;
        let checked = match answer {
            Ok(Answer::Admit(decision)) => Ok(check_decision(decision)),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        Some(match self.settle_answer(&plugin, checked) {
            Ok(decision) => {
                let reservation = decision.allow.then(|| Reservation(plugin));
                (decision, reservation)
            }
            Err(_) => (self.fallback_decision(), None),
        })
    }

    /// Tells the limiter version that admitted a request what the request really used.
    pub async fn settle_with(&self, reservation: &Reservation, settlement: &Settlement) {
        let answer = self
            .call_on(&reservation.0, "active", Call::Settle(settlement))
            .await;
        let checked = match answer {
            Ok(Answer::Settle) => Ok(()),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        let _ = self.settle_answer(&reservation.0, checked);
    }

    pub(super) fn fallback_decision(&self) -> Decision {
        let allow = self.config.rate_limiter_fail_open;
        Decision {
            allow,
            retry_after_ms: if allow { 0 } else { FAIL_CLOSED_RETRY_MS },
            reason: if allow {
                String::new()
            } else {
                "The rate limiter is unavailable; retry shortly.".to_owned()
            },
            headers: RateLimitHeaders {
                limit_requests: None,
                remaining_requests: None,
                reset_requests_ms: None,
                limit_tokens: None,
                remaining_tokens: None,
                reset_tokens_ms: None,
            },
        }
    }

    /// Tells the rate limiter what a request really used. Goes to the same version `admit`
    /// picked for the same request id (while the canary share is unchanged).
    pub async fn settle(&self, settlement: &Settlement) {
        let pick = Pick::Hash(&settlement.request_id);
        if let Some((plugin, answer)) = self
            .call(Slot::RateLimiter, pick, Call::Settle(settlement))
            .await
        {
            let checked = match answer {
                Ok(Answer::Settle) => Ok(()),
                Ok(other) => Err(unexpected(&other)),
                Err(fault) => Err(fault),
            };
            let _ = self.settle_answer(&plugin, checked);
        }
    }

    /// Prices a completed request. `Ok(None)`: no meter installed. An error (a fault, or the
    /// meter's own error) means the event stays queued and is retried.
    pub async fn charge(&self, event: &UsageEvent) -> Result<Option<Charge>, PluginFault> {
        let pick = Pick::Hash(&event.request_id);
        let Some((plugin, answer)) = self.call(Slot::Meter, pick, Call::Charge(event)).await else {
            return Ok(None);
        };
        let checked = match answer {
            Ok(Answer::Charge(Ok(charge))) => check_charge(charge),
            Ok(Answer::Charge(Err(message))) => Err((FaultKind::PluginError, message)),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        self.settle_answer(&plugin, checked).map(Some)
    }

    /// Points for the operator of the rig that served a request. `Ok(None)`: no reward plugin.
    pub async fn reward_usage(
        &self,
        event: &UsageEvent,
    ) -> Result<Option<Vec<Award>>, PluginFault> {
        let pick = Pick::Hash(&event.request_id);
        self.awards(pick, Call::OnUsage(event)).await
    }

    /// Points for a rig's periodic report. `Ok(None)`: no reward plugin.
    pub async fn reward_report(
        &self,
        report: &RigReport,
    ) -> Result<Option<Vec<Award>>, PluginFault> {
        let pick = Pick::Hash(&report.rig);
        self.awards(pick, Call::OnReport(report)).await
    }

    pub(super) async fn awards(
        &self,
        pick: Pick<'_>,
        call: Call<'_>,
    ) -> Result<Option<Vec<Award>>, PluginFault> {
        let Some((plugin, answer)) = self.call(Slot::Reward, pick, call).await else {
            return Ok(None);
        };
        let checked = match answer {
            Ok(Answer::Awards(Ok(awards))) => check_awards(awards),
            Ok(Answer::Awards(Err(message))) => Err((FaultKind::PluginError, message)),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        self.settle_answer(&plugin, checked).map(Some)
    }

    /// Picks the version for this call (canary or active) and calls it. `None`: the slot is
    /// empty for this call.
    pub(super) async fn call(
        &self,
        slot: Slot,
        pick: Pick<'_>,
        call: Call<'_>,
    ) -> Option<(Arc<LoadedPlugin>, Result<Answer, (FaultKind, String)>)> {
        let cell = self.cell(slot);
        let bundle = cell.bundle.load_full();
        let (plugin, role) = match &bundle.canary {
            Some((canary, percent)) if pick.draw() < *percent => (canary.clone(), "canary"),
            _ => (bundle.active.clone()?, "active"),
        };
        drop(bundle);
        let answer = self.call_on(&plugin, role, call).await;
        Some((plugin, answer))
    }

    /// Calls `plugin`, a version of its slot, as `role` (`active` or `canary`, for metrics).
    pub(super) async fn call_on(
        &self,
        plugin: &Arc<LoadedPlugin>,
        role: &'static str,
        call: Call<'_>,
    ) -> Result<Answer, (FaultKind, String)> {
        let slot = plugin.slot;
        self.cell(slot).calls.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .calls
            .with_label_values(&[slot.as_str(), role])
            .inc();
        let started = Instant::now();
        let mut answer = plugin.invoke(&self.engine, call).await;
        // The pool is full, maybe of idle instances of other slots (each version keeps a few
        // warm): give theirs back and try once more.
        if answer.as_ref().is_err_and(loaded::is_pool_full) && self.trim_idle() {
            answer = plugin.invoke(&self.engine, call).await;
        }
        self.metrics
            .call_duration
            .with_label_values(&[slot.as_str()])
            .observe(started.elapsed().as_secs_f64());
        if plugin.wants_refill() {
            // The next calls' instances are made off this request's path.
            let (next, engine) = (Arc::clone(plugin), Arc::clone(&self.engine));
            self.tasks.spawn(async move { next.refill(&engine).await });
        }
        answer
    }

    /// Tears down the idle instances of every loaded version; true when there were some.
    fn trim_idle(&self) -> bool {
        let mut trimmed = false;
        for slot in Slot::ALL {
            let bundle = self.cell(slot).bundle.load();
            for plugin in bundle
                .active
                .iter()
                .chain(bundle.canary.iter().map(|(plugin, _)| plugin))
            {
                trimmed |= plugin.trim();
            }
        }
        trimmed
    }

    /// Turns a checked answer into the caller's result, counting and logging a fault and asking
    /// for a rollback when the version faults too often.
    pub(super) fn settle_answer<T>(
        &self,
        plugin: &Arc<LoadedPlugin>,
        checked: Result<T, (FaultKind, String)>,
    ) -> Result<T, PluginFault> {
        let (kind, message) = match checked {
            Ok(value) => return Ok(value),
            Err(fault) => fault,
        };
        let slot = plugin.slot;
        self.metrics
            .faults
            .with_label_values(&[slot.as_str(), kind.as_str()])
            .inc();
        self.cell(slot)
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(kind, 1);
        if plugin.should_log_fault() {
            tracing::warn!(
                plugin = %slot,
                version = short(&plugin.info.sha256),
                kind = kind.as_str(),
                "plugin call fell back: {}",
                cut(&message, 500)
            );
        }
        if kind.counts_towards_rollback()
            && plugin.note_fault(self.config.fault_window(), self.config.fault_threshold)
        {
            let is_canary = self
                .cell(slot)
                .bundle
                .load()
                .canary
                .as_ref()
                .is_some_and(|(canary, _)| Arc::ptr_eq(canary, plugin));
            let request = AutoRollback {
                slot,
                sha256: plugin.info.sha256.clone(),
                canary: is_canary,
            };
            if self.rollbacks.try_send(request).is_err() {
                plugin.clear_rollback_request();
            }
        }
        Err(PluginFault {
            slot,
            version: plugin.info.sha256.clone(),
            kind,
            message,
        })
    }

    /// Rolls a slot back after repeated faults of `request.sha256`, if it is still the version
    /// in place (another replica may have rolled it back already).
    pub(super) async fn auto_rollback(&self, request: AutoRollback) {
        let AutoRollback {
            slot,
            sha256,
            canary,
        } = request;
        let threshold = self.config.fault_threshold;
        let window = self.config.fault_window_secs;
        let sha = sha256.clone();
        let result = self
            .change(slot, move |record, _| {
                if canary {
                    if record
                        .canary
                        .as_ref()
                        .is_some_and(|c| c.version.sha256 == sha)
                    {
                        record.canary = None;
                    }
                } else if record.active.as_ref().is_some_and(|a| a.sha256 == sha) {
                    let previous = record.history.pop().ok_or(PluginError::NoPrevious(slot))?;
                    record.active = Some(VersionInfo {
                        activated_at: unix_secs(),
                        activated_by: "auto-rollback".to_owned(),
                        ..previous
                    });
                }
                Ok(record.active.clone())
            })
            .await;
        match result {
            Ok(now_active) => {
                self.metrics
                    .rollbacks
                    .with_label_values(&[slot.as_str()])
                    .inc();
                tracing::error!(
                    plugin = %slot,
                    faulty = short(&sha256),
                    canary,
                    active = now_active.as_ref().map(|v| short(&v.sha256)),
                    "plugin rolled back: {threshold} faults within {window} s"
                );
            }
            Err(PluginError::NoPrevious(_)) => tracing::error!(
                plugin = %slot,
                faulty = short(&sha256),
                "plugin keeps faulting ({threshold} faults within {window} s) and there is no \
                 previous version to roll back to; calls keep falling back"
            ),
            Err(err) => {
                tracing::error!(plugin = %slot, error = %err, "automatic rollback failed");
                // Let the next burst of faults ask again.
                let bundle = self.cell(slot).bundle.load();
                for plugin in bundle
                    .active
                    .iter()
                    .chain(bundle.canary.iter().map(|(p, _)| p))
                {
                    if plugin.info.sha256 == sha256 {
                        plugin.clear_rollback_request();
                    }
                }
            }
        }
    }
}

/// How a call picks between canary and active.
#[derive(Clone, Copy)]
pub(super) enum Pick<'a> {
    /// By a hash of an id: the same request (admit, then settle) lands on the same version.
    Hash(&'a str),
    Random,
}

impl Pick<'_> {
    /// A number in 0..100.
    pub(super) fn draw(self) -> u8 {
        match self {
            Pick::Hash(id) => {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                id.hash(&mut hasher);
                (hasher.finish() % 100) as u8
            }
            Pick::Random => rand::random_range(0..100),
        }
    }
}

/// The rate limiter version that admitted a request (see [`PluginHost::admit_reserving`]).
#[derive(Clone)]
pub struct Reservation(Arc<LoadedPlugin>);

impl Reservation {
    /// The version (component and configuration) that admitted the request.
    pub fn version(&self) -> &VersionInfo {
        &self.0.info
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({})", short(&self.0.info.sha256))
    }
}
