//! Every name the gateway gives its state in the store, in one place: what a Redis deployment
//! holds, which module owns each name, and what is in it. A module reads and writes only the
//! names listed for it here.
//!
//! The store has four shapes (see [`Store`](super::Store)): API keys (their own methods),
//! **records** (a kind, then records by id), **kv** (values and counters, optionally expiring)
//! and **queues** (items leased and acknowledged). On Redis each is prefixed (`garage:`) by the
//! Redis store itself, which also adds the hash tags a Redis Cluster needs: a queue's keys share
//! the tag `{q:<name>}` and API keys the tag `{keys}`, while a kv name or a record kind is one
//! Redis key used alone, untagged (see `store/redis/mod.rs` and docs/redis.md). The names here
//! may hold any characters, braces included.

// ---- keys ---------------------------------------------------------------------------------
// API keys: by HMAC and by id, through `Store::put_key` and friends (owner: `keys`).

// ---- nodes (owner: `nodes`) ----------------------------------------------------------------

/// Records: a rig's identity and state, by node id.
pub const NODES: &str = "node";
/// Records: a rig's trust (what the gateway's checks found), by node id.
pub const NODE_TRUST: &str = "node_trust";
/// Records: operators (who rigs belong to), by operator id (their token's secret stored
/// hashed; `nodes::operators`).
pub const OPERATORS: &str = "operator";
/// Records: enrollment tokens, by token id (their secret is stored hashed).
pub const ENROLLMENT_TOKENS: &str = "enrollment_token";

/// Kv counter: uses of an enrollment token (expires with the token).
pub fn enrollment_uses(token_id: &str) -> String {
    format!("enroll_uses:{token_id}")
}

/// Kv: a rig's last heartbeat, when it came (kept an hour after it went silent).
pub fn node_live(node_id: &str) -> String {
    format!("node_live:{node_id}")
}

/// Kv (expires with the heartbeat deadline, refreshed by each heartbeat): the replica that
/// holds a rig's tunnel and its URL, `{replica} {url}` (owner: `nodes`, on a Redis store with
/// a cluster configured).
pub fn node_tunnel(node_id: &str) -> String {
    format!("node_tunnel:{node_id}")
}

/// Records: a rig's statement (each request it served: what was billed, its receipt and what
/// its check found), by request id; one kind per rig and UTC day of the request id (owner:
/// `nodes::receipts`).
pub fn node_statement(node_id: &str, day: &str) -> String {
    format!("node_statement:{node_id}:{day}")
}

/// Records: the days a rig's statement has entries for, by day.
pub fn node_statement_days(node_id: &str) -> String {
    format!("node_statement_days:{node_id}")
}

// ---- idempotency keys (owner: `http::idempotency`) -----------------------------------------

/// Kv (kept a day): the answer to the first request with an `Idempotency-Key`, by API key,
/// route and the key's SHA-256 (hex).
pub fn idempotency(scope: &str, route: &str, key_sha256: &str) -> String {
    format!("idempotency:{scope}:{route}:{key_sha256}")
}

/// Kv counter (expires in a minute): held while the first request with a key runs.
pub fn idempotency_lock(scope: &str, route: &str, key_sha256: &str) -> String {
    format!("idempotency_lock:{scope}:{route}:{key_sha256}")
}

// ---- the console (owner: `console::session`) ---------------------------------------------

/// Kv (expires with the session): a console session, by the SHA-256 (hex) of its id.
pub fn console_session(id_sha256: &str) -> String {
    format!("console_session:{id_sha256}")
}

// ---- the request path (owner: `inference::policy`) ---------------------------------------

/// Kv: set once a key's budget is spent (the meter said so): its requests get 429.
pub fn budget_exhausted(key_id: &str) -> String {
    format!("budget_exhausted:{key_id}")
}

// ---- accounts and prepaid credits (owner: `accounts`) --------------------------------------
// An account's money (balance, holds, settlements, period spend, credit ledger) is kept
// through `Store::account_*`, atomic per step; on Redis under the hash tag `{acct:<id>}` (see
// `store/redis/accounts.rs`). The period counters are named by `accounts::Window::name`
// (`day:2026-12-07`, `week:2026-12-07`, `month:2026-12`).

/// Records: accounts (name, metadata, budgets per period, alert thresholds, closed or not),
/// by account id.
pub const ACCOUNTS: &str = "account";

/// Records: the alerts an account's thresholds raised (a period budget's share spent, the
/// balance falling below an amount), by alert id.
pub fn account_alerts(account: &str) -> String {
    format!("account_alerts:{account}")
}

/// Kv counter (kept until a day after the period ends): how often a threshold was found
/// crossed in a period; the alert is raised by whoever made it 1.
pub fn account_alert_crossed(account: &str, period: &str, percent: u32) -> String {
    format!("account_alert:{account}:{period}:{percent}")
}

// ---- the ledger (owner: `ledger`) -----------------------------------------------------------

/// Queue: usage events waiting for metering and rewards (Redis deployments).
pub const USAGE_QUEUE: &str = "usage_queue";
/// Records: a request's ledger entry (event, charge, awards), by request id.
pub const USAGE_LEDGER: &str = "usage_ledger";
/// Records: the (key, model, day) slots that have counters, for listing usage.
pub const USAGE_DAILY_INDEX: &str = "usage_daily_index";
/// Records: operators that were ever awarded points, for the leaderboard.
pub const REWARD_OPERATOR_INDEX: &str = "reward_operator_index";

/// Kv (in the meter slot's namespace, see [`plugin_namespace`]; the meter sets it for an
/// hour): the mark the default meter (`plugins/guests/meter`) keeps of a request it charged,
/// `charged:<request id>`, so that an event that reaches it again is charged once. The ledger
/// drops it on the embedded store once the request's entry is written. Written into `buf`.
pub fn meter_charged_into(buf: &mut String, request_id: &str) {
    buf.push_str(PLUGIN_KV);
    buf.push_str("meter:charged:");
    buf.push_str(request_id);
}

/// Kv counter: one total (`requests`, `prompt`, `completion`, `credits_micro`) of a
/// `key|model|day` slot.
pub fn usage_counter(slot: &str, name: &str) -> String {
    format!("usage:{slot}:{name}")
}

/// Kv counter: an operator's points, in millionths.
pub fn operator_points(operator: &str) -> String {
    format!("points_micro:{operator}")
}

/// Kv counter: points a rig's operator was awarded for its requests since the rig last passed
/// a spot check, in millionths (withheld if it is quarantined; `nodes::trust`).
pub fn unconfirmed_points(rig: &str) -> String {
    format!("unconfirmed_points_micro:{rig}")
}

/// Kv counter: the points an operator was awarded on one UTC day (`YYYY-MM-DD`), in
/// millionths, before any withholding (the operators' console's earnings per day).
pub fn operator_points_day(operator: &str, day: &str) -> String {
    format!("points_day_micro:{operator}:{day}")
}

/// Kv counter: the points payout runs paid an operator, in millionths (`ledger::payouts`).
pub fn operator_points_paid(operator: &str) -> String {
    format!("points_paid_micro:{operator}")
}

/// Records: payout runs, by payout id (`ledger::payouts`).
pub const PAYOUTS: &str = "payout";

/// Kv counter (expires in two minutes): held while a payout run runs.
pub const PAYOUT_LOCK: &str = "payout_lock";

/// Kv counter: an operator's points withheld from quarantined rigs, in millionths.
pub fn withheld_points(operator: &str) -> String {
    format!("withheld_points_micro:{operator}")
}

/// Records: points withheld when a rig was quarantined, by `{rig}:{unix ms}`.
pub const WITHHELD: &str = "withheld";

/// Kv: set once the awards of a rig report are credited (credited once however often it is
/// retried).
pub fn awarded(report_id: &str) -> String {
    format!("awarded:{report_id}")
}

/// Queue: rigs' availability reports waiting for the reward plugin (owner: `server`).
pub const RIG_REPORT_QUEUE: &str = "rig_report_queue";

// ---- the Batch API (owner: `batch`) ---------------------------------------------------------

/// Records: File objects with their owner, by file id.
pub const FILES: &str = "files";
/// Records: file contents, by file id.
pub const FILE_CONTENT: &str = "file_content";
/// Records: Batch objects with their owner and models, by batch id.
pub const BATCHES: &str = "batches";
/// Records: the queues that hold lines, one per (batch, model).
pub const BATCH_QUEUES: &str = "batch_queues";
/// Kv: set once the per-owner indexes hold every file and batch.
pub const BATCH_OWNER_INDEX_DONE: &str = "batch_owner_index_v1";

/// Records: a key's File objects, by file id (listing reads the key's own).
pub fn files_of(owner: &str) -> String {
    format!("files_of:{owner}")
}

/// Records: a key's batch ids.
pub fn batches_of(owner: &str) -> String {
    format!("batches_of:{owner}")
}

/// Kv counters: a key's uploaded files and their bytes (its quotas).
pub fn file_quota_count(owner: &str) -> String {
    format!("file_quota_count:{owner}")
}

/// See [`file_quota_count`].
pub fn file_quota_bytes(owner: &str) -> String {
    format!("file_quota_bytes:{owner}")
}

/// Records: a batch's answers, by line number, until it is finalized.
pub fn batch_results(batch_id: &str) -> String {
    format!("batch_results:{batch_id}")
}

/// Queue: a batch's lines for one model.
pub fn batch_queue(batch_id: &str, model: &str) -> String {
    format!("batch:{batch_id}:{model}")
}

/// Kv (expires with the lease): which rig holds a line, and what its request allows.
pub fn batch_holder(batch_id: &str, model: &str, line: u64) -> String {
    format!("batch_holder:{batch_id}:{model}:{line}")
}

/// Kv counter: a batch's `completed` or `failed` lines.
pub fn batch_count(batch_id: &str, name: &str) -> String {
    format!("batch_count:{batch_id}:{name}")
}

/// Kv (expiring): the replica finalizing a batch.
pub fn batch_finalize_lock(batch_id: &str) -> String {
    format!("batch_finalize:{batch_id}")
}

// ---- webhooks and the usage export (owner: `webhooks`) -------------------------------------

/// Records: webhook endpoints, by endpoint id (no secret: signing keys are derived).
pub const WEBHOOK_ENDPOINTS: &str = "webhook_endpoint";

/// Records: an endpoint's recent deliveries (attempts, last status, next attempt), by event
/// id; the first write of an event id wins, so an event emitted twice is delivered once.
pub fn webhook_deliveries(endpoint_id: &str) -> String {
    format!("webhook_deliveries:{endpoint_id}")
}

/// Queue: deliveries waiting for an attempt, by `{endpoint id}:{event id}`; a failed attempt
/// keeps its item leased until the next is due.
pub const WEBHOOK_QUEUE: &str = "webhook_queue";

/// Records: a copy of the usage ledger's entries of one UTC hour (hours since the Unix epoch,
/// by the request's end), by request id: what `GET /admin/usage/events` reads.
pub fn usage_export_hour(hour: u64) -> String {
    format!("usage_export:{hour}")
}

/// Records: the hours [`usage_export_hour`] has, by hour (dropped after the retention).
pub const USAGE_EXPORT_HOURS: &str = "usage_export_hours";

// ---- plugins (owner: `plugins`) -------------------------------------------------------------

/// Records: uploaded components, by sha256.
pub const PLUGIN_COMPONENTS: &str = "plugin_component";
/// Records: each slot's active version, canary and history, by slot.
pub const PLUGIN_SLOTS: &str = "plugin_slot";
/// Records: every version uploaded, by `slot:sha256`.
pub const PLUGIN_VERSIONS: &str = "plugin_version";

/// Kv prefix of a slot's plugin state (what its `kv` interface sees), shared by its versions.
pub fn plugin_namespace(slot: &str) -> String {
    format!("{PLUGIN_KV}{slot}:")
}

/// What every slot's kv namespace starts with.
const PLUGIN_KV: &str = "plugin:";
