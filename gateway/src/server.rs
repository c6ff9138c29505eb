//! Starting and stopping a gateway.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backends::Backends;
use crate::batch::Batches;
use crate::config::{Config, UpstreamConfig};
use crate::inference::policy::{PluginProcessor, Policy};
use crate::keys::{KeyAuth, KeyHasher, random_token, unix_now};
use crate::ledger::Usage;
use crate::metrics::Metrics;
use crate::nodes::Nodes;
use crate::plugins::{PluginHost, Slot};
use crate::state::{AppState, Parts};
use crate::store::{self, QueueItem, StoreError};
use crate::upstream::{http_client, unix_client};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the state store {url}: {source}")]
    Store { url: String, source: StoreError },
    /// The certificate or key files (the message says which, and why).
    #[error("cannot serve TLS: {0}")]
    ServeTls(String),
    #[error("cannot set up TLS for https upstreams: {0}")]
    Tls(#[from] crate::upstream::CaFileError),
    #[error("upstream {upstream:?}: cannot set up TLS: {source}")]
    UpstreamTls {
        upstream: String,
        source: crate::upstream::CaFileError,
    },
    #[error("cannot start the plugin host: {0}")]
    Plugins(#[from] crate::plugins::PluginError),
    #[error("admin token file {path}: {source}")]
    AdminToken {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tokenizer(#[from] crate::ledger::tokens::TokenizerError),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running gateway: its server task and background tasks, stopped together.
pub struct Gateway {
    addr: SocketAddr,
    /// `http`, or `https` when serving TLS.
    scheme: &'static str,
    state: AppState,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
    /// The usage worker, stopped in order at shutdown (see [`Usage::stop`]).
    usage_worker: JoinHandle<()>,
    /// Where the admin token is, when it came from a file or was generated into one.
    admin_token_file: Option<std::path::PathBuf>,
}

impl Gateway {
    /// Opens the store, binds the listener and starts serving.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let Assembled {
            state,
            tls,
            listener_metrics,
            admin_token_file,
            sweep_interval,
        } = assemble(config).await?;
        let config = state.config();
        let (store, auth, backends, nodes, usage, batches, plugins) = (
            state.store().clone(),
            state.auth().clone(),
            state.backends().clone(),
            state.nodes().clone(),
            state.usage().clone(),
            state.batches().clone(),
            state.plugins().clone(),
        );
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let health_interval = Duration::from_secs(config.dispatch.health_interval_secs.max(1));
        let report_interval = config.nodes.report_interval();
        let mut background = plugins.spawn_background();
        background.extend(state.webhooks().spawn_background());
        background.extend([
            auth.spawn_invalidator(),
            tokio::spawn(backends.run_health_checks(health_interval)),
            tokio::spawn(nodes.clone().watch_heartbeats()),
            tokio::spawn(nodes.clone().follow_events()),
            tokio::spawn(nodes.clone().publish_adverts()),
            tokio::spawn(nodes.clone().run_spot_checks(config.trust.clone())),
            tokio::spawn(batches.clone().watch_events()),
            tokio::spawn(batches.clone().run_sweeper(sweep_interval)),
            tokio::spawn(report_rigs(
                nodes.clone(),
                plugins.clone(),
                usage.clone(),
                store.clone(),
                report_interval,
            )),
        ]);
        let usage_worker = tokio::spawn(usage.clone().run_worker(Arc::new(PluginProcessor {
            plugins: plugins.clone(),
            store: store.clone(),
            accounts: state.accounts().clone(),
            webhooks: state.webhooks().clone(),
            budget_alert_thresholds: config.usage.budget_alert_thresholds.clone(),
        })));
        let shutdown = CancellationToken::new();
        let app = crate::http::app(state.clone());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let limits = crate::http::listener::Limits::resolve(&state.config().connections);
        tracing::debug!(?limits, "client connection limits");
        let server = tokio::spawn(crate::http::listener::serve(
            listener,
            tls,
            app,
            limits,
            listener_metrics,
            shutdown.clone(),
        ));
        tracing::info!(%addr, scheme, "gateway listening");
        Ok(Gateway {
            addr,
            scheme,
            state,
            shutdown,
            server,
            background,
            usage_worker,
            admin_token_file,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, or `https://ADDR` when serving TLS.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn admin_token(&self) -> &str {
        self.state.admin_token()
    }

    /// The file holding the admin token, when it is in one.
    pub fn admin_token_file(&self) -> Option<&std::path::Path> {
        self.admin_token_file.as_deref()
    }

    /// Stops accepting, lets in-flight requests and streams finish within `grace`, then stops.
    /// Returns false when the grace period ran out with requests still open.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.shutdown.cancel();
        // The other replicas route nothing new to our rigs (which reconnect to them once their
        // tunnels here close, below).
        self.state.nodes().announce_stop().await;
        // Rigs waiting for batch work get their (empty) answer now, not at the end of the wait.
        self.state.batches().stop();
        let finished = tokio::time::timeout(grace, self.server).await.is_ok();
        // Usage of the requests that just finished goes to the store's queue before the
        // worker stops (bounded: the store may be what is down).
        match tokio::time::timeout(Duration::from_secs(2), self.state.usage().flush()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, pending = self.state.usage().pending_len(), "usage events not queued at shutdown")
            }
            Err(_) => {
                tracing::warn!(
                    pending = self.state.usage().pending_len(),
                    "usage events not queued at shutdown (store too slow)"
                )
            }
        }
        self.state.usage().stop();
        let worker = self.usage_worker.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), self.usage_worker)
            .await
            .is_err()
        {
            // Its leased events go back to the queue when their lease runs out.
            worker.abort();
        }
        // Client requests are done (or out of time): now the rigs' tunnels can close.
        self.state.nodes().close_all();
        // Their limiter settlements, spawned as the requests ended, go through first.
        if !self
            .state
            .plugins()
            .finish_tasks(Duration::from_secs(2))
            .await
        {
            tracing::warn!("limiter settlements still running at shutdown; abandoned");
        }
        self.state.plugins().shutdown();
        // The last requests' spans go out (bounded: the collector may be what is down).
        self.state
            .telemetry()
            .shutdown(Duration::from_secs(5))
            .await;
        for task in self.background {
            task.abort();
        }
        finished
    }
}

/// Queue of rig availability reports waiting for the reward plugin: durable, so a faulting
/// plugin or a crash delays uptime rewards instead of losing them.
use crate::store::keyspace::RIG_REPORT_QUEUE as REPORT_QUEUE;

/// A gateway's parts, made and wired but not serving: no listener, no background task.
pub struct Assembled {
    pub state: AppState,
    /// The TLS configuration to serve with, when the config names a certificate.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub listener_metrics: crate::http::listener::ListenerMetrics,
    /// Where the admin token is, when it came from a file or was generated into one.
    pub admin_token_file: Option<std::path::PathBuf>,
    sweep_interval: Duration,
}

/// Opens the store and makes every part of a gateway from `config`: what
/// [`Gateway::start`] serves, and what a test drives without a socket
/// (`http::app(assembled.state).oneshot(request)`).
pub async fn assemble(config: Config) -> Result<Assembled, StartError> {
    // Before anything else: a certificate that cannot be read stops the start at once.
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(
            garage_tls::server_config(cert, key)
                .map_err(|err| StartError::ServeTls(format!("{err:#}")))?,
        )),
        _ => None,
    };
    let store = store::open(
        &config.store,
        &[(crate::ledger::LEDGER, config.usage.ledger_max_entries)],
    )
    .await
    .map_err(|source| StartError::Store {
        url: redact_url(&config.store),
        source,
    })?;
    let key_secret = match &config.auth.key_secret {
        Some(secret) => secret.clone().into_bytes(),
        // Memory store only (config validation requires a secret with Redis): keys live and
        // die with this process, so a per-process secret is enough.
        None => random_token(48).into_bytes(),
    };
    let (admin_token, admin_token_file) = admin_token(&config.auth)?;
    let auth = KeyAuth::new(
        store.clone(),
        KeyHasher::new(&key_secret),
        Duration::from_secs(config.auth.key_cache_secs),
    );
    // One client per CA file: upstreams that name the same `tls_ca_file` share one, and the
    // rest share the one trusting `dispatch.tls_ca_file` (read even with no upstream: a
    // broken file is an error).
    let http = Arc::new(http_client(
        &config.dispatch,
        config.dispatch.tls_ca_file.as_deref(),
    )?);
    let mut by_ca_file = std::collections::HashMap::new();
    let client_for = |upstream: &UpstreamConfig| -> Result<_, StartError> {
        if let Some(socket) = &upstream.unix_socket {
            return Ok(Arc::new(unix_client(&config.dispatch, socket)));
        }
        let Some(path) = &upstream.tls_ca_file else {
            return Ok(Arc::clone(&http));
        };
        if let Some(client) = by_ca_file.get(path) {
            return Ok(Arc::clone(client));
        }
        let client = http_client(&config.dispatch, Some(path)).map_err(|source| {
            StartError::UpstreamTls {
                upstream: upstream.name.clone(),
                source,
            }
        })?;
        let client = Arc::new(client);
        by_ca_file.insert(path.clone(), Arc::clone(&client));
        Ok(client)
    };
    let backends = Arc::new(Backends::from_upstreams(&config.upstreams, client_for)?);
    let nodes = Nodes::new(
        store.clone(),
        KeyHasher::new(&key_secret),
        backends.clone(),
        config.nodes.clone(),
        crate::cluster::Cluster::from_config(&config.cluster, config.dispatch.connect_timeout()),
    );
    // The embedded store lives and dies with this process: its usage queue would add cost
    // and no durability, so events go from memory straight to the worker.
    let usage = if crate::config::is_embedded(&config.store) {
        Usage::in_process(store.clone())
    } else {
        Usage::new(store.clone())
    };
    let batches = Batches::new(
        store.clone(),
        nodes.clone(),
        usage.clone(),
        config.batch.clone(),
    );
    batches
        .index_owners()
        .await
        .map_err(|source| StartError::Store {
            url: redact_url(&config.store),
            source,
        })?;
    nodes
        .load_trust()
        .await
        .map_err(|source| StartError::Store {
            url: redact_url(&config.store),
            source,
        })?;
    let sweep_interval = Duration::from_millis(config.batch.sweep_interval_ms.max(100));
    let plugins = PluginHost::new(store.clone(), config.plugins.clone()).await?;
    if config.default_plugins {
        plugins.set_defaults(DEFAULT_PLUGINS);
        install_defaults(&plugins).await?;
    }
    // Webhook endpoints' signing keys are derived from the key secret; the usage export keeps
    // on the embedded store about as many requests as its ledger.
    let webhooks = crate::webhooks::Webhooks::new(
        store.clone(),
        config.webhooks.clone(),
        &key_secret,
        crate::config::is_embedded(&config.store).then_some(config.usage.ledger_max_entries),
    )?;
    webhooks
        .reload()
        .await
        .map_err(|source| StartError::Store {
            url: redact_url(&config.store),
            source,
        })?;
    usage.observe(webhooks.clone());
    let metrics = Metrics::new();
    metrics.register_all(webhooks.collectors());
    metrics.register_all(plugins.metrics().collectors());
    metrics.register_all(batches.metrics().collectors());
    metrics.register_all(usage.collectors());
    metrics.register_all(nodes.collectors());
    let listener_metrics = crate::http::listener::ListenerMetrics::new();
    metrics.register_all(listener_metrics.collectors());
    let tokenizers = Arc::new(crate::ledger::tokens::Tokenizers::load(&config.tokenizers)?);
    // Accounts' alerts go to the webhooks that take them.
    let accounts = Arc::new(
        crate::accounts::Accounts::new(
            store.clone(),
            config.accounts.clone(),
            Arc::new(crate::accounts::SystemClock),
        )
        .emitting_to(webhooks.clone()),
    );
    let telemetry = crate::telemetry::Telemetry::start(&config.telemetry)?;
    let state = AppState::new(Parts {
        telemetry,
        tokenizers,
        config,
        store: store.clone(),
        auth: auth.clone(),
        backends: backends.clone(),
        nodes: nodes.clone(),
        usage: usage.clone(),
        batches: batches.clone(),
        plugins: plugins.clone(),
        policy: Policy::default(),
        accounts,
        metrics,
        webhooks,
        admin_token,
        started_at: unix_now(),
    });
    Ok(Assembled {
        state,
        tls,
        listener_metrics,
        admin_token_file,
        sweep_interval,
    })
}

/// A rig's availability over one report period, as queued.
#[derive(serde::Serialize, serde::Deserialize)]
struct QueuedReport {
    rig: String,
    operator: String,
    period_ms: u64,
    uptime_ms: u64,
    gpu_seconds: f64,
    at_ms: u64,
}

/// Every report interval: queues each rig's availability, then hands the queued reports to the
/// reward plugin and credits what it awards (once per report, however often it is retried).
async fn report_rigs(
    nodes: Arc<Nodes>,
    plugins: Arc<PluginHost>,
    usage: Arc<Usage>,
    store: Arc<dyn store::Store>,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    // Reports the store did not take (it was down), retried at the next tick.
    let mut unqueued: Vec<QueueItem> = Vec::new();
    loop {
        ticker.tick().await;
        let at_ms = crate::keys::unix_now() * 1000;
        for rig in nodes.take_availability() {
            let uptime_ms = rig.uptime_ms.min(interval.as_millis() as u64);
            let report = QueuedReport {
                rig: rig.node_id.clone(),
                operator: rig.operator,
                period_ms: interval.as_millis() as u64,
                uptime_ms,
                gpu_seconds: f64::from(rig.gpus) * uptime_ms as f64 / 1000.0,
                at_ms,
            };
            if let Ok(payload) = serde_json::to_vec(&report) {
                unqueued.push(QueueItem {
                    id: format!("report:{}:{at_ms}", rig.node_id),
                    payload,
                });
            }
        }
        if !unqueued.is_empty() {
            match store.queue_push(REPORT_QUEUE, &unqueued).await {
                Ok(()) => unqueued.clear(),
                Err(err) => {
                    tracing::warn!(error = %err, reports = unqueued.len(), "cannot queue rig reports; retrying");
                    continue;
                }
            }
        }
        if let Err(err) = credit_reports(&plugins, &usage, store.as_ref()).await {
            tracing::warn!(error = %err, "cannot work the rig report queue; retrying");
        }
    }
}

/// Hands queued reports to the reward plugin until the queue is empty or the plugin faults
/// (the report then goes back to the queue, for the next tick).
async fn credit_reports(
    plugins: &PluginHost,
    usage: &Usage,
    store: &dyn store::Store,
) -> Result<(), StoreError> {
    loop {
        let leased = store
            .queue_lease(REPORT_QUEUE, 64, Duration::from_secs(60))
            .await?;
        if leased.is_empty() {
            return Ok(());
        }
        let mut faulted = false;
        for item in leased {
            let Ok(queued) = serde_json::from_slice::<QueuedReport>(&item.payload) else {
                tracing::error!(id = %item.id, "unreadable rig report dropped");
                store.queue_ack(REPORT_QUEUE, &item.id).await?;
                continue;
            };
            if faulted {
                store.queue_release(REPORT_QUEUE, &item.id).await?;
                continue;
            }
            let report = crate::plugins::RigReport {
                rig: queued.rig,
                operator: queued.operator,
                period_ms: queued.period_ms,
                uptime_ms: queued.uptime_ms,
                gpu_seconds: queued.gpu_seconds,
                at_ms: queued.at_ms,
            };
            match plugins.reward_report(&report).await {
                Ok(awards) => {
                    let awards: Vec<_> = awards
                        .unwrap_or_default()
                        .into_iter()
                        .map(|a| crate::ledger::Award {
                            operator: a.operator,
                            points: a.points,
                            reason: a.reason,
                        })
                        .collect();
                    usage.award(&item.id, &awards).await?;
                    store.queue_ack(REPORT_QUEUE, &item.id).await?;
                }
                Err(fault) => {
                    tracing::warn!(node = %report.rig, error = %fault, "reward plugin failed on a rig report; kept for retry");
                    faulted = true;
                    store.queue_release(REPORT_QUEUE, &item.id).await?;
                }
            }
        }
        if faulted {
            return Ok(());
        }
    }
}

/// The default policies, compiled from `plugins/guests/` by the build.
const DEFAULT_PLUGINS: &[(Slot, &[u8])] = &[
    (Slot::Router, garage_plugins::ROUTER_LEAST_LOADED),
    (Slot::RateLimiter, garage_plugins::RATE_LIMITER),
    (Slot::Meter, garage_plugins::METER),
    (Slot::Reward, garage_plugins::REWARD),
];

/// Installs the default plugin of every slot that was never configured. A slot an operator
/// emptied on purpose (it has a history) stays empty.
async fn install_defaults(plugins: &PluginHost) -> Result<(), crate::plugins::PluginError> {
    let status = plugins.status();
    for (slot, wasm) in DEFAULT_PLUGINS {
        let untouched = status.iter().any(|s| {
            s.slot == *slot && s.active.is_none() && s.canary.is_none() && s.history.is_empty()
        });
        if untouched {
            let info = plugins.install(*slot, wasm, "{}", "defaults").await?;
            tracing::info!(plugin = %slot, sha256 = %info.sha256, "default plugin installed");
        }
    }
    Ok(())
}

/// The admin token and the file it is in (if any): `auth.admin_token`, or read from
/// `auth.admin_token_file`, or generated into that file when it does not exist, or into a new
/// file of the temporary directory. The token never goes to the log; where it is does.
fn admin_token(
    auth: &crate::config::AuthConfig,
) -> Result<(String, Option<std::path::PathBuf>), StartError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(token) = &auth.admin_token {
        return Ok((token.clone(), None));
    }
    let failed = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| StartError::AdminToken { path, source }
    };
    if let Some(path) = &auth.admin_token_file {
        match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => {
                return Ok((text.trim().to_owned(), Some(path.clone())));
            }
            Ok(_) => {
                return Err(StartError::AdminToken {
                    path: path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the file is empty",
                    ),
                });
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(failed(path)(err)),
        }
    }
    let token = random_token(32);
    let path = auth.admin_token_file.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("garage-admin-token-{}", random_token(8)))
    });
    // A new file only (no following a link planted in a shared directory), readable by its
    // owner alone.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(failed(&path))?;
    file.write_all(token.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .map_err(failed(&path))?;
    tracing::warn!(path = %path.display(), "no admin token configured; generated one into this file (mode 0600)");
    Ok((token, Some(path)))
}

/// A store URL for logs, without its password.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn store_urls_lose_their_password() {
        assert_eq!(
            super::redact_url("redis://:hunter2@db:6379/0"),
            "redis://***@db:6379/0"
        );
        assert_eq!(super::redact_url("memory"), "memory");
    }
}
