//! What every request handler shares.

use std::sync::Arc;

use crate::accounts::Accounts;
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
use crate::webhooks::Webhooks;

/// Shared state of a running gateway. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// What [`AppState`] holds: every part of a running gateway, made once by
/// `Gateway::start` (or by a test) and read, never replaced.
pub struct Parts {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub auth: KeyAuth,
    pub backends: Arc<Backends>,
    pub nodes: Arc<Nodes>,
    pub usage: Arc<Usage>,
    pub batches: Arc<Batches>,
    pub plugins: Arc<PluginHost>,
    pub policy: Policy,
    /// Accounts' money: holds at admission, settlement of charges.
    pub accounts: Arc<Accounts>,
    /// The models whose tokens the gateway counts itself.
    pub tokenizers: Arc<crate::ledger::tokens::Tokenizers>,
    pub metrics: Metrics,
    /// Webhook endpoints and the events for them (`webhooks().emit(…)`).
    pub webhooks: Arc<Webhooks>,
    /// Traces of the request path (off unless configured).
    pub telemetry: crate::telemetry::Telemetry,
    pub admin_token: String,
    /// Unix seconds when this gateway started (the `created` of models it lists).
    pub started_at: u64,
}

struct Inner {
    parts: Parts,
    /// The OpenAPI document as served at `/openapi.json`, written once the routes are built.
    openapi: std::sync::OnceLock<bytes::Bytes>,
}

impl AppState {
    pub fn new(parts: Parts) -> Self {
        AppState(Arc::new(Inner {
            parts,
            openapi: std::sync::OnceLock::new(),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.0.parts.config
    }
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.0.parts.store
    }
    pub fn auth(&self) -> &KeyAuth {
        &self.0.parts.auth
    }
    pub fn backends(&self) -> &Arc<Backends> {
        &self.0.parts.backends
    }
    pub fn nodes(&self) -> &Arc<Nodes> {
        &self.0.parts.nodes
    }
    pub fn usage(&self) -> &Arc<Usage> {
        &self.0.parts.usage
    }
    pub fn batches(&self) -> &Arc<Batches> {
        &self.0.parts.batches
    }
    pub fn plugins(&self) -> &Arc<PluginHost> {
        &self.0.parts.plugins
    }
    pub fn policy(&self) -> &Policy {
        &self.0.parts.policy
    }
    pub fn accounts(&self) -> &Arc<Accounts> {
        &self.0.parts.accounts
    }
    pub fn tokenizers(&self) -> &crate::ledger::tokens::Tokenizers {
        &self.0.parts.tokenizers
    }
    pub fn metrics(&self) -> &Metrics {
        &self.0.parts.metrics
    }
    pub fn webhooks(&self) -> &Arc<Webhooks> {
        &self.0.parts.webhooks
    }
    pub fn telemetry(&self) -> &crate::telemetry::Telemetry {
        &self.0.parts.telemetry
    }
    pub fn admin_token(&self) -> &str {
        &self.0.parts.admin_token
    }
    pub fn started_at(&self) -> u64 {
        self.0.parts.started_at
    }
    /// The OpenAPI document as served at `/openapi.json`, written once by the first router
    /// built from this state.
    pub fn openapi(&self) -> &std::sync::OnceLock<bytes::Bytes> {
        &self.0.openapi
    }
}
