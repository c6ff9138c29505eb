//! What every request handler shares.

use std::sync::Arc;

use crate::backends::Backends;
use crate::batch::Batches;
use crate::config::Config;
use crate::inference::policy::Policy;
use crate::keys::KeyAuth;
use crate::ledger::Usage;
use crate::metrics::Metrics;
use crate::nodes::Nodes;
use crate::plugins::PluginHost;
use crate::store::Store;

/// Shared state of a running gateway. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub auth: KeyAuth,
    pub backends: Arc<Backends>,
    pub nodes: Arc<Nodes>,
    pub usage: Arc<Usage>,
    pub batches: Arc<Batches>,
    pub plugins: Arc<PluginHost>,
    pub policy: Policy,
    pub metrics: Metrics,
    pub admin_token: String,
    /// Unix seconds when this gateway started (the `created` of models it lists).
    pub started_at: u64,
    /// The OpenAPI document as served at `/openapi.json`, written once the routes are built.
    pub openapi: std::sync::OnceLock<bytes::Bytes>,
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
