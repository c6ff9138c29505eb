//! Moves a store written before key names were hash-tagged (layout 1) to today's names
//! (layout 2), once, when a gateway connects to it.
//!
//! Layout 1 named API keys `garage:key:<id>`, `garage:keyhash:<hash>` and `garage:keys`, and a
//! queue's keys `garage:q:<name>:<part>`; layout 2 puts each group under one hash tag (see
//! `mod.rs`). Every other name is the same in both. Only single-server and Sentinel stores can
//! hold layout 1: the gateway could not use a Redis Cluster before layout 2.
//!
//! Each key is renamed with `RENAMENX`, so replicas that start together move each key once,
//! and nothing written under a new name is overwritten. A gateway of layout 1 must not run
//! against the store afterwards (stop them all, then start the new version).

use redis::AsyncCommands;

use super::super::StoreError;
use super::connection::Connection;
use super::{KEYS_INDEX, hash_key, key_key, queue_part_key};

/// Which layout the store is in: missing means 1.
const LAYOUT_KEY: &str = "garage:layout";
/// The layout this gateway writes.
pub(super) const LAYOUT: i64 = 2;
/// Keys asked for per `SCAN` step.
const SCAN_COUNT: usize = 1000;

/// Brings the store to [`LAYOUT`] if it is older; returns how many keys moved.
pub(super) async fn to_current_layout(conn: &mut Connection) -> Result<u64, StoreError> {
    let layout: Option<i64> = conn.get(LAYOUT_KEY).await?;
    if layout.is_some_and(|layout| layout >= LAYOUT) {
        return Ok(0);
    }
    let mut moved = 0;
    for old in scan(conn, "garage:key:*").await? {
        let id = &old["garage:key:".len()..];
        moved += rename(conn, &old, &key_key(id)).await?;
    }
    for old in scan(conn, "garage:keyhash:*").await? {
        let hash = &old["garage:keyhash:".len()..];
        moved += rename(conn, &old, &hash_key(hash)).await?;
    }
    moved += move_keys_index(conn).await?;
    for old in scan(conn, "garage:q:*").await? {
        // `garage:q:<name>:<part>`; the name may hold colons (`batch:<id>:<model>`).
        let Some((name, part)) = old["garage:q:".len()..].rsplit_once(':') else {
            continue;
        };
        if matches!(part, "waiting" | "leased" | "items" | "seq") {
            moved += rename(conn, &old, &queue_part_key(name, part)).await?;
        }
    }
    let _: () = conn.set(LAYOUT_KEY, LAYOUT).await?;
    if moved > 0 {
        tracing::info!(
            moved,
            layout = LAYOUT,
            "moved the store's keys to hash-tagged names"
        );
    }
    Ok(moved)
}

/// Every key matching `pattern`, gathered before any is renamed.
async fn scan(conn: &mut Connection, pattern: &str) -> Result<Vec<String>, StoreError> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// Renames `old` to `new` unless `new` exists; 1 when this call moved it.
async fn rename(conn: &mut Connection, old: &str, new: &str) -> Result<u64, StoreError> {
    match conn.rename_nx::<_, _, bool>(old, new).await {
        Ok(true) => Ok(1),
        Ok(false) => {
            tracing::warn!(
                old,
                new,
                "both names exist; kept the new one, left the old one"
            );
            Ok(0)
        }
        // Another replica moved it first.
        Err(err) if err.to_string().contains("no such key") => Ok(0),
        Err(err) => Err(err.into()),
    }
}

/// The creation-ordered index of keys: renamed, or merged into one a new gateway already made.
async fn move_keys_index(conn: &mut Connection) -> Result<u64, StoreError> {
    const OLD: &str = "garage:keys";
    let (old_exists, new_exists): (bool, bool) = redis::pipe()
        .exists(OLD)
        .exists(KEYS_INDEX)
        .query_async(conn)
        .await?;
    if !old_exists {
        return Ok(0);
    }
    if !new_exists {
        return rename(conn, OLD, KEYS_INDEX).await;
    }
    let _: () = redis::pipe()
        .atomic()
        .cmd("ZUNIONSTORE")
        .arg(KEYS_INDEX)
        .arg(2)
        .arg(KEYS_INDEX)
        .arg(OLD)
        .arg("AGGREGATE")
        .arg("MIN")
        .ignore()
        .del(OLD)
        .ignore()
        .query_async(conn)
        .await?;
    Ok(1)
}
