//! Replay and shadow on the host's side: recording calls as they are made, replaying the
//! recorded window through a candidate and the active version, and a shadow candidate fed live
//! calls. See [`crate::plugins::replay`] for what is recorded and how it is compared.
//!
//! Both run candidates on a thread of their own (a single-threaded runtime), never on the
//! gateway's async workers: a candidate that loops until its deadline on every call costs that
//! thread its time, not a request its latency. Each version gets an empty scratch key-value
//! store, so a replayed or shadow limiter or meter never touches the live counters and ledgers.

use std::future::Future;

use arc_swap::ArcSwapOption;
use tokio::sync::oneshot;

use super::*;
use crate::plugins::bindings::{Live, Prepared};
use crate::plugins::replay::{
    DiffTally, Input, MAX_RECORDED, Outcome, Recorded, Recorder, ReplayReport, ShadowState,
};

/// Candidate faults (traps, deadlines, memory cap, nonsense) after which a replay stops: the
/// report then says the candidate is broken, without spending its deadline a thousand times.
const MAX_REPLAY_FAULTS: u64 = 16;
/// Live calls waiting for the shadow; past it they are dropped (and counted), never waited on.
const SHADOW_QUEUE: usize = 1024;
/// Faults in a row after which a shadow stops taking calls: a candidate that only loops or
/// traps would otherwise burn a core on every live call.
const SHADOW_MAX_FAULTS_IN_A_ROW: u32 = 16;

/// What a slot keeps for replay and shadow.
pub(super) struct Observed {
    pub recorder: Recorder,
    pub shadow: ArcSwapOption<Shadow>,
}

impl Observed {
    pub fn new(capacity: usize, every: u32) -> Self {
        Observed {
            recorder: Recorder::new(capacity, every),
            shadow: ArcSwapOption::empty(),
        }
    }
}

/// A shadow candidate of a slot: fed live calls through a bounded queue, on its own thread.
pub(crate) struct Shadow {
    sha256: String,
    config: serde_json::Value,
    started_at_ms: u64,
    /// Percent of live calls given to the shadow.
    share: u8,
    queue: mpsc::Sender<Recorded>,
    tally: Arc<Mutex<DiffTally>>,
    stopped: Arc<Mutex<Option<String>>>,
    dropped: AtomicU64,
    stop: CancellationToken,
}

impl Shadow {
    /// Whether this live call is one of the shadow's share.
    fn draws(&self) -> bool {
        self.share >= 100 || rand::random_range(0..100u8) < self.share
    }

    /// Hands a live call to the shadow, or drops it when the queue is full.
    fn offer(&self, recorded: Recorded) {
        if self.stop.is_cancelled() {
            return;
        }
        if self.queue.try_send(recorded).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn report(&self, slot: Slot) -> ReplayReport {
        let state = ShadowState {
            started_at_ms: self.started_at_ms,
            share: self.share,
            dropped: self.dropped.load(Ordering::Relaxed),
            stopped: lock(&self.stopped).clone(),
            config: self.config.clone(),
        };
        let mut report =
            lock(&self.tally).report(slot, "live".to_owned(), self.sha256.clone(), Some(state));
        if let Some(stopped) = lock(&self.stopped).as_ref() {
            report
                .summary
                .push(format!("the shadow stopped: {stopped}"));
        }
        report
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What running a version on scratch state needs.
struct ScratchSpec {
    slot: Slot,
    sha256: String,
    config_json: String,
    prepared: Arc<Prepared>,
    deadline: Duration,
    memory_bytes: usize,
}

/// A version running on scratch state: one instance reused call after call (a new one after a
/// fault), an empty key-value store of its own, and, in a replay, the recorded clock.
struct Scratch {
    engine: Arc<PluginEngine>,
    spec: ScratchSpec,
    ctx: Arc<PluginContext>,
    /// Unix ms the plugin's clock reads (a replay); `None`: the real clock (a shadow).
    clock: Option<Arc<AtomicU64>>,
    instance: Option<(wasmtime::Store<super::super::state::HostState>, Live)>,
}

impl Scratch {
    async fn new(
        engine: Arc<PluginEngine>,
        spec: ScratchSpec,
        recorded_clock: bool,
    ) -> Result<Self, PluginError> {
        let scratch = crate::store::open("memory", &[]).await?;
        let clock = recorded_clock.then(|| Arc::new(AtomicU64::new(0)));
        let mut ctx =
            PluginContext::new(spec.slot, &spec.sha256, spec.config_json.clone(), scratch);
        if let Some(clock) = &clock {
            ctx = ctx.with_clock(clock.clone());
        }
        Ok(Scratch {
            engine,
            spec,
            ctx: Arc::new(ctx),
            clock,
            instance: None,
        })
    }

    /// Calls the version with `input` at `at_ms`: its decision, and the kind of its fault.
    async fn decide(&mut self, at_ms: u64, input: &Input) -> (Outcome, Option<FaultKind>) {
        let slot = self.spec.slot;
        // A replayed meter charges by its own table: the price the active meter quoted at
        // admission depends on the market of that moment, which is not recorded.
        let unpriced;
        let call = match input {
            Input::Route(input) => Call::Route(input),
            Input::Admit(admission) => Call::Admit(admission),
            Input::Settle(settlement) => Call::Settle(settlement),
            Input::Usage(event) if slot == Slot::Meter => {
                unpriced = UsageEvent {
                    price: None,
                    ..event.clone()
                };
                Call::Charge(std::slice::from_ref(&unpriced))
            }
            Input::Usage(event) => Call::OnUsage(std::slice::from_ref(event)),
        };
        let answer = self.call(at_ms, call).await;
        outcome_of(slot, input, answer)
    }

    async fn call(&mut self, at_ms: u64, call: Call<'_>) -> Result<Answer, (FaultKind, String)> {
        if let Some(clock) = &self.clock {
            clock.store(at_ms, Ordering::Relaxed);
        }
        let _ticking = self.engine.ticking();
        let (mut store, live) = match self.instance.take() {
            Some(instance) => instance,
            None => {
                let mut store = self
                    .engine
                    .new_store(self.ctx.clone(), self.spec.memory_bytes);
                store.data_mut().begin_call(self.spec.deadline);
                store.set_epoch_deadline(1);
                match self.spec.prepared.instantiate(&mut store).await {
                    Ok(live) => (store, live),
                    Err(err) => return Err(loaded::classify(&err, store.data(), true)),
                }
            }
        };
        store.data_mut().begin_call(self.spec.deadline);
        store.set_epoch_deadline(1);
        match live.call(&mut store, call).await {
            Ok(answer) => {
                self.instance = Some((store, live));
                Ok(answer)
            }
            // A faulted instance is never reused, as on the request path.
            Err(err) => Err(loaded::classify(&err, store.data(), false)),
        }
    }
}

/// A version's decision for `input` from its answer, checked as the request path checks it.
fn outcome_of(
    slot: Slot,
    input: &Input,
    answer: Result<Answer, (FaultKind, String)>,
) -> (Outcome, Option<FaultKind>) {
    let fault = |kind| (faulted(slot, input), Some(kind));
    match answer {
        Err((kind, _)) => fault(kind),
        Ok(Answer::Route(Ok(order))) => {
            let Input::Route(input) = input else {
                return fault(FaultKind::BadOutput);
            };
            match check_route(order, input.candidates.len()) {
                Ok(order) => (Outcome::Route(order.first().copied()), None),
                Err((kind, _)) => fault(kind),
            }
        }
        Ok(Answer::Admit { decision, .. }) => (Outcome::Admit(Some(decision.allow)), None),
        Ok(Answer::Settle) => (Outcome::Settled, None),
        Ok(Answer::Charge(mut charges)) if charges.len() == 1 => match charges.pop() {
            Some(Ok(charge)) => match check_charge(charge) {
                Ok(charge) => (Outcome::Charge(Some(charge.credits)), None),
                Err((kind, _)) => fault(kind),
            },
            Some(Err(_)) => fault(FaultKind::PluginError),
            None => fault(FaultKind::BadOutput),
        },
        Ok(Answer::OnUsage(mut awards)) if awards.len() == 1 => match awards.pop() {
            Some(Ok(awards)) => match check_awards(awards) {
                Ok(awards) => (Outcome::Awards(Some(by_operator(&awards))), None),
                Err((kind, _)) => fault(kind),
            },
            Some(Err(_)) => fault(FaultKind::PluginError),
            None => fault(FaultKind::BadOutput),
        },
        Ok(Answer::Route(Err(_))) => fault(FaultKind::PluginError),
        Ok(_) => fault(FaultKind::BadOutput),
    }
}

/// The decision a faulted call of `input`'s export stands for.
fn faulted(slot: Slot, input: &Input) -> Outcome {
    match input {
        Input::Route(_) => Outcome::Route(None),
        Input::Admit(_) => Outcome::Admit(None),
        Input::Settle(_) => Outcome::Settled,
        Input::Usage(_) if slot == Slot::Meter => Outcome::Charge(None),
        Input::Usage(_) => Outcome::Awards(None),
    }
}

fn by_operator(awards: &[Award]) -> Vec<(String, f64)> {
    awards
        .iter()
        .map(|award| (award.operator.clone(), award.points))
        .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `work` on a thread of its own, on a single-threaded runtime; its result arrives on
/// the receiver (which errs when the thread could not start or died).
fn off_path<F, Fut, T>(name: &str, work: F) -> Result<oneshot::Receiver<T>, PluginError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let (done, result) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    let _ = done.send(runtime.block_on(work()));
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot start a runtime for a plugin replay")
                }
            }
        })
        .map_err(|err| PluginError::Engine(format!("cannot start a replay thread: {err}")))?;
    Ok(result)
}

impl PluginHost {
    /// Records a call that was just made (one in `record_every`, while the ring is free) and
    /// hands it to the slot's shadow (unless a canary made it). Costs an atomic increment and
    /// a load when neither wants it.
    pub(super) fn observe(
        &self,
        slot: Slot,
        by_canary: impl FnOnce() -> bool,
        input: impl FnOnce() -> Input,
        live: Outcome,
    ) {
        let observed = &self.cell(slot).observed;
        let record = observed.recorder.wants();
        let shadow = observed.shadow.load();
        let shadow = shadow
            .as_ref()
            .filter(|shadow| shadow.draws() && !by_canary());
        if !record && shadow.is_none() {
            return;
        }
        let recorded = Recorded {
            at_ms: unix_ms(),
            input: Arc::new(input()),
            live,
        };
        if let Some(shadow) = shadow {
            shadow.offer(recorded.clone());
        }
        if record {
            observed.recorder.push(recorded);
        }
    }

    /// Whether `plugin` is its slot's canary.
    pub(super) fn is_canary(&self, plugin: &Arc<LoadedPlugin>) -> bool {
        self.cell(plugin.slot)
            .bundle
            .load()
            .canary
            .as_ref()
            .is_some_and(|(canary, _)| Arc::ptr_eq(canary, plugin))
    }

    /// Compiles a candidate for `slot` and checks it as an upload is checked (its world, its
    /// imports, a trial call with its configuration), without storing it.
    async fn candidate(
        &self,
        slot: Slot,
        wasm: &[u8],
        config_json: &str,
    ) -> Result<ScratchSpec, PluginError> {
        if wasm.len() > self.config.max_component_bytes {
            return Err(PluginError::TooLarge {
                size: wasm.len(),
                limit: self.config.max_component_bytes,
            });
        }
        serde_json::from_str::<serde_json::Value>(config_json)
            .map_err(|err| PluginError::InvalidConfig(err.to_string()))?;
        let sha256 = hex::encode(Sha256::digest(wasm));
        let component = self
            .engine
            .compile(&sha256, Arc::new(wasm.to_vec()))
            .await?;
        let prepared = self.engine.prepare(slot, &component)?;
        if self.config.trial_at_upload {
            self.check_config(slot, &sha256, &prepared, config_json)
                .await?;
        }
        Ok(ScratchSpec {
            slot,
            sha256,
            config_json: config_json.to_owned(),
            prepared: Arc::new(prepared),
            deadline: self.config.deadline(slot),
            memory_bytes: self.config.limits(slot).memory_bytes(),
        })
    }

    /// Replays the `limit` most recent recorded calls of `slot` through a candidate and through
    /// the active version, each from an empty scratch store with the clock at each call's
    /// recorded time, and compares their decisions. Both start from nothing, so the diff
    /// compares like with like: a limiter's or meter's live decisions were made on live state
    /// that a replay cannot reproduce. Nothing recorded: a report of zero calls.
    pub async fn replay(
        &self,
        slot: Slot,
        wasm: &[u8],
        config_json: &str,
        limit: usize,
    ) -> Result<ReplayReport, PluginError> {
        let candidate = self.candidate(slot, wasm, config_json).await?;
        let active = self
            .cell(slot)
            .bundle
            .load()
            .active
            .clone()
            .ok_or(PluginError::NoActive(slot))?;
        let Ok(_one_at_a_time) = self.replaying.try_lock() else {
            return Err(PluginError::ReplayBusy);
        };
        let records = self
            .cell(slot)
            .observed
            .recorder
            .recent(limit.min(MAX_RECORDED));
        let active_spec = ScratchSpec {
            slot,
            sha256: active.info.sha256.clone(),
            config_json: active.info.config.to_string(),
            prepared: active.prepared().clone(),
            deadline: candidate.deadline,
            memory_bytes: candidate.memory_bytes,
        };
        let (active_sha, candidate_sha) = (active_spec.sha256.clone(), candidate.sha256.clone());
        let engine = Arc::clone(&self.engine);
        let fail_open = self.config.rate_limiter_fail_open;
        let started = Instant::now();
        let done = off_path("plugin-replay", move || {
            replay_records(engine, records, active_spec, candidate, fail_open)
        })?;
        let (tally, stopped) = done
            .await
            .map_err(|_| PluginError::Engine("the replay thread died".into()))??;
        let mut report = tally.report(slot, active_sha, candidate_sha, None);
        if let Some(stopped) = stopped {
            report.summary.push(stopped);
        }
        tracing::info!(
            plugin = %slot,
            replayed = report.replayed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "plugin replay done"
        );
        Ok(report)
    }

    /// Starts a shadow of `slot` (replacing any): a candidate called after the active version
    /// with the same live inputs, off the request path, whose decisions are tallied and never
    /// acted on. On this replica only. `share_percent` of live calls (1 to 100) go to it: its
    /// work on the CPU is that share of the slot's.
    pub async fn start_shadow(
        &self,
        slot: Slot,
        wasm: &[u8],
        config_json: &str,
        share_percent: u8,
    ) -> Result<ReplayReport, PluginError> {
        let spec = self.candidate(slot, wasm, config_json).await?;
        let config = serde_json::from_str(config_json)
            .map_err(|err| PluginError::InvalidConfig(err.to_string()))?;
        let (queue, calls) = mpsc::channel(SHADOW_QUEUE);
        let shadow = Arc::new(Shadow {
            sha256: spec.sha256.clone(),
            config,
            started_at_ms: unix_ms(),
            share: share_percent.clamp(1, 100),
            queue,
            tally: Arc::new(Mutex::new(DiffTally::new(
                self.config.rate_limiter_fail_open,
            ))),
            stopped: Arc::new(Mutex::new(None)),
            dropped: AtomicU64::new(0),
            stop: self.shutdown.child_token(),
        });
        let engine = Arc::clone(&self.engine);
        let (tally, stopped, stop) = (
            shadow.tally.clone(),
            shadow.stopped.clone(),
            shadow.stop.clone(),
        );
        // The thread ends when the shadow is replaced, deleted or the host shuts down.
        drop(off_path("plugin-shadow", move || {
            run_shadow(engine, spec, calls, tally, stopped, stop)
        })?);
        let report = shadow.report(slot);
        self.cell(slot).observed.shadow.store(Some(shadow));
        tracing::info!(plugin = %slot, candidate = short(&report.candidate), "plugin shadow started");
        Ok(report)
    }

    /// The shadow's diff so far.
    pub fn shadow_report(&self, slot: Slot) -> Result<ReplayReport, PluginError> {
        let shadow = self.cell(slot).observed.shadow.load_full();
        Ok(shadow.ok_or(PluginError::NoShadow(slot))?.report(slot))
    }

    /// Stops the shadow; its final diff.
    pub fn stop_shadow(&self, slot: Slot) -> Result<ReplayReport, PluginError> {
        let shadow = self.cell(slot).observed.shadow.swap(None);
        let shadow = shadow.ok_or(PluginError::NoShadow(slot))?;
        shadow.stop.cancel();
        tracing::info!(plugin = %slot, candidate = short(&shadow.sha256), "plugin shadow stopped");
        Ok(shadow.report(slot))
    }
}

/// The replay itself, on its own thread: both versions over the records, in recorded order.
async fn replay_records(
    engine: Arc<PluginEngine>,
    records: Vec<Recorded>,
    active: ScratchSpec,
    candidate: ScratchSpec,
    fail_open: bool,
) -> Result<(DiffTally, Option<String>), PluginError> {
    let mut active = Scratch::new(engine.clone(), active, true).await?;
    let mut candidate = Scratch::new(engine, candidate, true).await?;
    let mut tally = DiffTally::new(fail_open);
    let mut faults = 0;
    for record in &records {
        let (then, _) = active.decide(record.at_ms, &record.input).await;
        let (now, fault) = candidate.decide(record.at_ms, &record.input).await;
        tally.add(record.at_ms, &record.input, &then, &now);
        if fault.is_some_and(FaultKind::counts_towards_rollback) {
            faults += 1;
            if faults >= MAX_REPLAY_FAULTS {
                return Ok((
                    tally,
                    Some(format!(
                        "the replay stopped after {} of {} calls: the candidate faulted \
                         {faults} times (trap, deadline, memory cap or a nonsensical answer)",
                        tally_len(&records, record),
                        records.len()
                    )),
                ));
            }
        }
    }
    Ok((tally, None))
}

/// How many records up to and including `record` were replayed.
fn tally_len(records: &[Recorded], record: &Recorded) -> usize {
    records
        .iter()
        .position(|r| std::ptr::eq(r, record))
        .map_or(records.len(), |i| i + 1)
}

/// The shadow's loop, on its own thread: one live call at a time, until stopped.
async fn run_shadow(
    engine: Arc<PluginEngine>,
    spec: ScratchSpec,
    mut calls: mpsc::Receiver<Recorded>,
    tally: Arc<Mutex<DiffTally>>,
    stopped: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
) {
    let slot = spec.slot;
    let mut scratch = match Scratch::new(engine, spec, false).await {
        Ok(scratch) => scratch,
        Err(err) => {
            *lock(&stopped) = Some(format!("cannot start: {err}"));
            stop.cancel();
            return;
        }
    };
    let mut in_a_row = 0;
    loop {
        let record = tokio::select! {
            _ = stop.cancelled() => return,
            record = calls.recv() => match record {
                Some(record) => record,
                None => return,
            },
        };
        let (decision, fault) = scratch.decide(record.at_ms, &record.input).await;
        lock(&tally).add(record.at_ms, &record.input, &record.live, &decision);
        if fault.is_some_and(FaultKind::counts_towards_rollback) {
            in_a_row += 1;
            if in_a_row >= SHADOW_MAX_FAULTS_IN_A_ROW {
                tracing::warn!(plugin = %slot, "plugin shadow stopped: {in_a_row} faults in a row");
                *lock(&stopped) = Some(format!(
                    "the candidate faulted on {in_a_row} calls in a row"
                ));
                stop.cancel();
                return;
            }
        } else {
            in_a_row = 0;
        }
    }
}
