//! What every request handler shares.

use std::sync::Arc;

use crate::auth::KeyAuth;
use crate::backends::Backends;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;

/// Shared state of a running gateway. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub auth: KeyAuth,
    pub backends: Arc<Backends>,
    /// Connection pool to backends; outside anything swappable so connections survive swaps.
    pub http: reqwest::Client,
    pub metrics: Metrics,
    pub admin_token: String,
    /// Unix seconds when this gateway started (the `created` of models it lists).
    pub started_at: u64,
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        AppState(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The HTTP client for backends: TCP_NODELAY (a proxy that writes a response in two pieces
/// otherwise waits for the peer's delayed ACK, ~40 ms), pooled keep-alive connections, a connect
/// timeout, and no overall timeout (streams last as long as generation does).
pub fn backend_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(config.dispatch.connect_timeout())
        // Idle connections to a rig are cheap to keep and expensive to re-open over a tunnel.
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .tls_backend_preconfigured(tls_config())
        .build()
}

fn tls_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| unreachable!("ring supports the default TLS versions: {e}"))
        .with_root_certificates(roots)
        .with_no_client_auth()
}
