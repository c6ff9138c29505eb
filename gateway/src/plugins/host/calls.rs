//! Calls into the slots: which version takes a call (canary or active), the call itself,
//! its fallback and fault accounting, and the rate limiter's reservations.

use super::*;
use crate::plugins::host::unlimited;
use crate::plugins::replay::{Input, Outcome};

impl PluginHost {
    /// Orders the candidates of `input` by preference: indices, best first. `None` means use
    /// the built-in round robin: no router installed, no candidates, or the router faulted (a
    /// trap, its deadline, an error, an empty list, an index out of range or repeated).
    /// `input.infos` says who the candidates are, index for index, for a router that asks
    /// (`candidates.describe`). The input is shared with the replay recorder, not copied.
    pub async fn route(&self, input: Arc<RouteInput>) -> Option<Vec<u32>> {
        debug_assert_eq!(input.candidates.len(), input.infos.len());
        if input.candidates.is_empty() {
            return None;
        }
        let pick = Pick::Random;
        let (plugin, answer) = self.call(Slot::Router, pick, Call::Route(&input)).await?;
        let checked = match answer {
            Ok(Answer::Route(Ok(order))) => check_route(order, input.candidates.len()),
            Ok(Answer::Route(Err(message))) => Err((FaultKind::PluginError, message)),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        let order = self.settle_answer(&plugin, checked).ok();
        self.observe(
            Slot::Router,
            || self.is_canary(&plugin),
            || Input::Route(input),
            Outcome::Route(order.as_ref().and_then(|order| order.first().copied())),
        );
        order
    }

    /// Asks the rate limiter whether a request may go now. `None` only when no limiter is
    /// installed. When the limiter faults, the answer is the configured fallback
    /// (`rate_limiter_fail_open`): an allow, or a refusal with a one-second retry.
    pub async fn admit(&self, admission: &Admission) -> Option<Decision> {
        self.admit_reserving(admission)
            .await
            .map(|admitted| admitted.decision)
    }

    /// [`admit`](Self::admit), with the version of the limiter that allowed the request: its
    /// settlement goes to that version ([`settle_with`](Self::settle_with)), whatever was
    /// promoted or rolled back meanwhile. No reservation when the fallback decided.
    ///
    /// A limiter of `garage:policy@0.7.0` may promise that it does not limit a key's requests
    /// for a model: while the promise holds, such a request is allowed here without a call
    /// (counted in `garage_plugin_admissions_promised_total`).
    pub async fn admit_reserving(&self, admission: &Admission) -> Option<LimiterAnswer> {
        let pick = Pick::Hash(&admission.request_id);
        let (plugin, role) = self.pick(Slot::RateLimiter, pick)?;
        if plugin.unlimited.covers(admission, Instant::now()) {
            self.metrics.count_promised(role);
            let answer = LimiterAnswer {
                decision: unlimited::promised_decision(),
                reservation: None,
                by_fallback: false,
            };
            self.observe(
                Slot::RateLimiter,
                || self.is_canary(&plugin),
                || Input::Admit(admission.clone()),
                Outcome::Admit(Some(true)),
            );
            return Some(answer);
        }
        let answer = self.call_on(&plugin, role, Call::Admit(admission)).await;
        let checked = match answer {
            Ok(Answer::Admit {
                decision,
                settle,
                unlimited_ms,
            }) => Ok((check_decision(decision), settle, unlimited_ms)),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        let answer = match self.settle_answer(&plugin, checked) {
            // A limiter of 0.3.0 may say that the request reserved nothing to settle; one of
            // 0.7.0 that it does not limit the key's requests for the model at all.
            Ok((decision, settle, unlimited_ms)) => {
                plugin.unlimited.remember(
                    admission,
                    &decision,
                    settle,
                    unlimited_ms,
                    Instant::now(),
                );
                LimiterAnswer {
                    reservation: (decision.allow && settle).then(|| Reservation(plugin.clone())),
                    decision,
                    by_fallback: false,
                }
            }
            Err(_) => LimiterAnswer {
                decision: self.fallback_decision(),
                reservation: None,
                by_fallback: true,
            },
        };
        self.observe(
            Slot::RateLimiter,
            || self.is_canary(&plugin),
            || Input::Admit(admission.clone()),
            Outcome::Admit((!answer.by_fallback).then_some(answer.decision.allow)),
        );
        Some(answer)
    }

    /// Tells the limiter version that admitted a request what the request really used.
    pub async fn settle_with(&self, reservation: &Reservation, settlement: &Settlement) {
        let answer = self
            .call_on(&reservation.0, "active", Call::Settle(settlement))
            .await;
        self.observe(
            Slot::RateLimiter,
            || self.is_canary(&reservation.0),
            || Input::Settle(settlement.clone()),
            Outcome::Settled,
        );
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
            headers: no_headers(),
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
            self.observe(
                Slot::RateLimiter,
                || self.is_canary(&plugin),
                || Input::Settle(settlement.clone()),
                Outcome::Settled,
            );
            let checked = match answer {
                Ok(Answer::Settle) => Ok(()),
                Ok(other) => Err(unexpected(&other)),
                Err(fault) => Err(fault),
            };
            let _ = self.settle_answer(&plugin, checked);
        }
    }

    /// The meter's price for `model` now, quoted at a request's admission: what the request is
    /// charged. `None` when no meter is installed, the meter is of a version before 0.5.0 (it
    /// quotes nothing), or it faulted or declined (its `charge` then decides alone).
    ///
    /// The version asked is the one that will charge the request (picked by its id, as the
    /// charge is), and its answer for a model is kept for [`QUOTE_KEPT`]: a meter is asked a
    /// few times a second per model, not once per request. `market` describes the model's
    /// supply and demand; it is only built when the meter is asked.
    pub async fn quote(
        &self,
        request_id: &str,
        model: &str,
        batch: bool,
        market: impl FnOnce() -> Market,
    ) -> Option<Price> {
        let bundle = self.cell(Slot::Meter).bundle.load_full();
        let (plugin, role) = match &bundle.canary {
            Some((canary, percent)) if Pick::Hash(request_id).draw() < *percent => {
                (canary.clone(), "canary")
            }
            _ => (bundle.active.clone()?, "active"),
        };
        drop(bundle);
        if !plugin.quotes() {
            return None;
        }
        let now = Instant::now();
        if let Some(kept) = plugin.quotes.get(model, batch, now) {
            return kept;
        }
        let request = QuoteRequest {
            model: model.to_owned(),
            batch,
        };
        let market = market();
        let checked = match self
            .call_on(&plugin, role, Call::Quote(&request, &market))
            .await
        {
            Ok(Answer::Quote(None)) => return None,
            Ok(Answer::Quote(Some(Ok(Some(price))))) => check_price(price).map(Some),
            Ok(Answer::Quote(Some(Ok(None)))) => Ok(None),
            Ok(Answer::Quote(Some(Err(message)))) => Err((FaultKind::PluginError, message)),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        let price = self.settle_answer(&plugin, checked).ok().flatten();
        plugin.quotes.put(model, batch, now, price);
        price
    }

    /// Prices a completed request. `Ok(None)`: no meter installed. An error (a fault, or the
    /// meter's own error) means the event stays queued and is retried.
    pub async fn charge(&self, event: &UsageEvent) -> Result<Option<Charge>, PluginFault> {
        let Some(mut charges) = self.charge_many(std::slice::from_ref(event)).await else {
            return Ok(None);
        };
        charges
            .pop()
            .unwrap_or_else(|| Err(self.missing_answer(Slot::Meter)))
            .map(Some)
    }

    /// Prices completed requests: one answer per event, in order. `None`: no meter installed.
    /// A meter of 0.3.0 gets them in as few calls as the canary split allows; one of 0.2.0 one
    /// call per event, up to [`EVENTS_IN_FLIGHT`] at once.
    pub async fn charge_many(
        &self,
        events: &[UsageEvent],
    ) -> Option<Vec<Result<Charge, PluginFault>>> {
        self.per_event(
            Slot::Meter,
            events,
            ListExport::Charge,
            |answer| match answer {
                Answer::Charge(answers) => Ok(answers
                    .into_iter()
                    .map(|answer| match answer {
                        Ok(charge) => check_charge(charge),
                        Err(message) => Err((FaultKind::PluginError, message)),
                    })
                    .collect()),
                other => Err(Box::new(other)),
            },
            |charge| Outcome::Charge(charge.as_ref().ok().map(|charge| charge.credits)),
        )
        .await
    }

    /// Points for the operator of the rig that served a request. `Ok(None)`: no reward plugin.
    pub async fn reward_usage(
        &self,
        event: &UsageEvent,
    ) -> Result<Option<Vec<Award>>, PluginFault> {
        let Some(mut awards) = self.reward_usage_many(std::slice::from_ref(event)).await else {
            return Ok(None);
        };
        awards
            .pop()
            .unwrap_or_else(|| Err(self.missing_answer(Slot::Reward)))
            .map(Some)
    }

    /// Points for the requests rigs served: one answer per event, in order. `None`: no reward
    /// plugin. Called like [`charge_many`](Self::charge_many).
    pub async fn reward_usage_many(
        &self,
        events: &[UsageEvent],
    ) -> Option<Vec<Result<Vec<Award>, PluginFault>>> {
        self.per_event(
            Slot::Reward,
            events,
            ListExport::OnUsage,
            |answer| match answer {
                Answer::OnUsage(answers) => Ok(answers
                    .into_iter()
                    .map(|answer| match answer {
                        Ok(awards) => check_awards(awards),
                        Err(message) => Err((FaultKind::PluginError, message)),
                    })
                    .collect()),
                other => Err(Box::new(other)),
            },
            |awards| {
                Outcome::Awards(awards.as_ref().ok().map(|awards| {
                    awards
                        .iter()
                        .map(|award| (award.operator.clone(), award.points))
                        .collect()
                }))
            },
        )
        .await
    }

    /// Calls `slot` for each of `events`, each event going to the version its request id picks
    /// (canary or active): one call per run of events for a version that takes lists, one call
    /// per event (up to [`EVENTS_IN_FLIGHT`] at once) for one that does not. A fault of a call
    /// is every one of its events' answer.
    async fn per_event<T>(
        &self,
        slot: Slot,
        events: &[UsageEvent],
        export: ListExport,
        unpack: Unpack<T>,
        decided: fn(&Result<T, PluginFault>) -> Outcome,
    ) -> Option<Vec<Result<T, PluginFault>>> {
        use futures::StreamExt;
        let bundle = self.cell(slot).bundle.load_full();
        let active = bundle.active.clone();
        let canary = bundle.canary.clone();
        drop(bundle);
        if active.is_none() && canary.is_none() {
            return None;
        }
        // Which version each event goes to: the canary by its request id's draw, else active.
        let mut groups: Vec<(Arc<LoadedPlugin>, &'static str, Vec<usize>)> = Vec::new();
        let mut unserved = Vec::new();
        let mut by_canary = vec![false; events.len()];
        for (i, event) in events.iter().enumerate() {
            let (plugin, role) = match (&canary, &active) {
                (Some((canary, percent)), _) if Pick::Hash(&event.request_id).draw() < *percent => {
                    by_canary[i] = true;
                    (canary, "canary")
                }
                (_, Some(active)) => (active, "active"),
                (_, None) => {
                    unserved.push(i);
                    continue;
                }
            };
            match groups.iter_mut().find(|(p, _, _)| Arc::ptr_eq(p, plugin)) {
                Some((_, _, indices)) => indices.push(i),
                None => groups.push((Arc::clone(plugin), role, vec![i])),
            }
        }
        let mut answers: Vec<Option<Result<T, PluginFault>>> =
            std::iter::repeat_with(|| None).take(events.len()).collect();
        for (plugin, role, indices) in &groups {
            let runs: Vec<Vec<usize>> = if plugin.takes_lists() {
                runs_of(indices)
            } else {
                indices.iter().map(|&i| vec![i]).collect()
            };
            let calls: Vec<_> = runs
                .into_iter()
                .map(|run| self.call_run(plugin, role, events, run, export, unpack))
                .collect();
            let done: Vec<_> = futures::stream::iter(calls)
                .buffer_unordered(EVENTS_IN_FLIGHT)
                .collect()
                .await;
            for (run, results) in done {
                for (i, result) in run.into_iter().zip(results) {
                    answers[i] = Some(result);
                }
            }
        }
        for i in unserved {
            answers[i] = Some(Err(self.missing_answer(slot)));
        }
        let answers: Vec<Result<T, PluginFault>> = answers
            .into_iter()
            .map(|answer| answer.unwrap_or_else(|| Err(self.missing_answer(slot))))
            .collect();
        for ((event, answer), by_canary) in events.iter().zip(&answers).zip(by_canary) {
            self.observe(
                slot,
                || by_canary,
                || Input::Usage(event.clone()),
                decided(answer),
            );
        }
        Some(answers)
    }

    /// One call of [`per_event`](Self::per_event): the events of `run` (consecutive indices).
    async fn call_run<T>(
        &self,
        plugin: &Arc<LoadedPlugin>,
        role: &'static str,
        events: &[UsageEvent],
        run: Vec<usize>,
        export: ListExport,
        unpack: Unpack<T>,
    ) -> (Vec<usize>, Vec<Result<T, PluginFault>>) {
        let (first, last) = (run[0], run[run.len() - 1]);
        let slice = &events[first..=last];
        let call = match export {
            ListExport::Charge => Call::Charge(slice),
            ListExport::OnUsage => Call::OnUsage(slice),
        };
        let per_event = match self.call_on(plugin, role, call).await {
            Ok(answer) => match unpack(answer) {
                Ok(list) if list.len() == slice.len() => Ok(list),
                Ok(list) => Err((
                    FaultKind::BadOutput,
                    format!("{} answers for {} events", list.len(), slice.len()),
                )),
                Err(other) => Err(unexpected(&other)),
            },
            Err(fault) => Err(fault),
        };
        let results = match per_event {
            Ok(list) => list
                .into_iter()
                .map(|checked| self.settle_answer(plugin, checked))
                .collect(),
            Err(fault) => {
                let fault = self.fault(plugin, fault);
                slice.iter().map(|_| Err(fault.clone())).collect()
            }
        };
        (run, results)
    }

    /// Counts and reports `fault` of `plugin` (see [`settle_answer`](Self::settle_answer)).
    fn fault(&self, plugin: &Arc<LoadedPlugin>, fault: (FaultKind, String)) -> PluginFault {
        match self.settle_answer::<std::convert::Infallible>(plugin, Err(fault)) {
            Err(fault) => fault,
            Ok(never) => match never {},
        }
    }

    /// The fault of an event no call answered (which the code above never leaves).
    fn missing_answer(&self, slot: Slot) -> PluginFault {
        PluginFault {
            slot,
            version: String::new(),
            kind: FaultKind::Host,
            message: "internal: no answer for the event".to_owned(),
        }
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
        let (plugin, role) = self.pick(slot, pick)?;
        let answer = self.call_on(&plugin, role, call).await;
        Some((plugin, answer))
    }

    /// The version of `slot` a call goes to (canary or active), and its role. `None`: the
    /// slot is empty for this call.
    fn pick(&self, slot: Slot, pick: Pick<'_>) -> Option<(Arc<LoadedPlugin>, &'static str)> {
        let bundle = self.cell(slot).bundle.load();
        match &bundle.canary {
            Some((canary, percent)) if pick.draw() < *percent => Some((canary.clone(), "canary")),
            _ => Some((bundle.active.clone()?, "active")),
        }
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
        self.metrics.count_call(slot, role);
        let started = Instant::now();
        let mut answer = plugin.invoke(&self.engine, call).await;
        // The pool is full, maybe of idle instances of other slots (each version keeps a few
        // warm): give theirs back and try once more.
        if answer.as_ref().is_err_and(loaded::is_pool_full) && self.trim_idle() {
            answer = plugin.invoke(&self.engine, call).await;
        }
        self.metrics
            .observe_call(slot, started.elapsed().as_secs_f64());
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

/// The exports that take usage events.
#[derive(Clone, Copy)]
enum ListExport {
    Charge,
    OnUsage,
}

/// Checks an answer of a [`ListExport`]: one checked result per event, or the answer when it
/// is of another export.
type Unpack<T> = fn(Answer) -> Result<Vec<Result<T, (FaultKind, String)>>, Box<Answer>>;

/// Calls of a 0.2.0 meter or reward plugin in flight at once for one batch of events.
const EVENTS_IN_FLIGHT: usize = 16;

/// Most events in one call of a 0.3.0 meter or reward plugin: a batch the usage worker takes
/// is split into calls of this many, each within the slot's deadline, made at once (up to
/// [`EVENTS_IN_FLIGHT`]) on instances of their own. A meter's store operations are round trips
/// on Redis, made one after another within a call: a leased batch of 128 events in two calls
/// of 64 took ~100 ms each on a loaded box, and the meter fell behind a saturated gateway
/// (a quarter of its events metered). A batch at full speed on the embedded store (~30
/// events) is two calls instead of one.
const MAX_EVENTS_PER_CALL: usize = 16;

/// `indices` (ascending) as runs of consecutive indices, each at most [`MAX_EVENTS_PER_CALL`]
/// long.
fn runs_of(indices: &[usize]) -> Vec<Vec<usize>> {
    let mut runs: Vec<Vec<usize>> = Vec::new();
    for &i in indices {
        match runs.last_mut() {
            Some(run) if run.last() == Some(&(i - 1)) && run.len() < MAX_EVENTS_PER_CALL => {
                run.push(i)
            }
            _ => runs.push(vec![i]),
        }
    }
    runs
}

/// How long a meter's quote for a model is used before the meter is asked again.
pub const QUOTE_KEPT: Duration = Duration::from_secs(1);
/// Most quotes a version keeps (models, batch or not); past it its cache starts over.
const MAX_QUOTES: usize = 4096;

/// A quote kept: when it was made, and the price (`None`: the meter quoted nothing).
type Kept = (Instant, Option<Price>);

/// A meter version's recent quotes, by model: for a request, and for a batch line. Looked up
/// by the borrowed model name, so a request's hit allocates nothing.
#[derive(Default)]
pub(crate) struct QuoteCache(Mutex<HashMap<String, [Option<Kept>; 2]>>);

impl QuoteCache {
    fn get(&self, model: &str, batch: bool, now: Instant) -> Option<Option<Price>> {
        let kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (at, price) = kept.get(model)?[usize::from(batch)]?;
        (now.saturating_duration_since(at) < QUOTE_KEPT).then_some(price)
    }

    fn put(&self, model: &str, batch: bool, now: Instant, price: Option<Price>) {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() >= MAX_QUOTES && !kept.contains_key(model) {
            kept.clear();
        }
        kept.entry(model.to_owned()).or_default()[usize::from(batch)] = Some((now, price));
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

/// The rate limiter's answer about one request ([`PluginHost::admit_reserving`]).
pub struct LimiterAnswer {
    pub decision: Decision,
    /// The version that allowed it, for its settlement; none when nothing is to be settled.
    pub reservation: Option<Reservation>,
    /// The limiter faulted and `rate_limiter_fail_open` decided: a refusal then is the
    /// plugin's failure, not the key's limit.
    pub by_fallback: bool,
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
