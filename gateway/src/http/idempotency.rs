//! `Idempotency-Key`: a client that retries a request that creates something (a file, a batch)
//! with the same key gets the first request's answer, and nothing is created twice.
//!
//! The key is scoped to the API key and the route. The first request with it takes a short
//! lock (a second one meanwhile gets 409, retry shortly), and its successful answer is kept for
//! [`KEPT`] with a fingerprint of the request (a SHA-256 of what it asked for). A retry with the
//! same fingerprint gets that answer again, with `Idempotent-Replayed: true`; the same key
//! with another request is refused (400 `idempotency_key_reused`). A failed request keeps
//! nothing, so its retry runs anew. As Stripe's API and the IETF's `Idempotency-Key` draft do.

use std::time::Duration;

use axum::http::HeaderMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::store::Store;

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// The response header of a replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";
/// How long an answer is kept for retries.
pub const KEPT: Duration = Duration::from_secs(24 * 3600);
/// How long the first request holds its key (a crashed replica's lock runs out).
const LOCK: Duration = Duration::from_secs(60);
/// Longest key accepted.
const MAX_LEN: usize = 255;

#[derive(Serialize, Deserialize)]
struct Kept {
    fingerprint: String,
    answer: serde_json::Value,
}

/// What to do with a request.
pub enum Idempotency<T> {
    /// No `Idempotency-Key`: as usual.
    None,
    /// The first request with its key: run it, then [`Guard::keep`] its answer (or
    /// [`Guard::release`] on failure).
    First(Guard),
    /// A retry: this is the first request's answer.
    Replay(T),
}

/// The hold of the first request on its key.
pub struct Guard {
    kept: String,
    lock: String,
    fingerprint: String,
}

/// Where a key's answer and lock live, scoped to the API key and the route.
fn names(scope: &str, route: &str, key: &str) -> (String, String) {
    let id = hex::encode(Sha256::digest(key.as_bytes()));
    (
        crate::store::keyspace::idempotency(scope, route, &id),
        crate::store::keyspace::idempotency_lock(scope, route, &id),
    )
}

/// Reads the request's `Idempotency-Key`, if any, and says whether to run the request or
/// answer a retry. `fingerprint` is what the request asks for (hashed here).
pub async fn begin<T: DeserializeOwned>(
    store: &dyn Store,
    headers: &HeaderMap,
    scope: &str,
    route: &str,
    fingerprint: &[u8],
) -> Result<Idempotency<T>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(Idempotency::None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_LEN && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::bad_request(
                format!("Idempotency-Key must be 1 to {MAX_LEN} visible ASCII characters."),
                Some("Idempotency-Key"),
            )
        })?;
    let (kept, lock) = names(scope, route, key);
    let fingerprint = hex::encode(Sha256::digest(fingerprint));
    if let Some(bytes) = store.kv_get(&kept).await? {
        let stored: Kept = serde_json::from_slice(&bytes)
            .map_err(|err| ApiError::Internal(format!("a kept answer is unreadable: {err}")))?;
        if stored.fingerprint != fingerprint {
            return Err(ApiError::bad_request_code(
                "This Idempotency-Key was used with another request; use a new key for a new request.",
                Some("Idempotency-Key"),
                "idempotency_key_reused",
            ));
        }
        let answer = serde_json::from_value(stored.answer)
            .map_err(|err| ApiError::Internal(format!("a kept answer is unreadable: {err}")))?;
        return Ok(Idempotency::Replay(answer));
    }
    if store.kv_incr(&lock, 1, Some(LOCK)).await? > 1 {
        return Err(ApiError::Conflict(
            "A request with this Idempotency-Key is in progress; retry shortly.".into(),
        ));
    }
    Ok(Idempotency::First(Guard {
        kept,
        lock,
        fingerprint,
    }))
}

impl Guard {
    /// Keeps the answer for retries and lets go of the key.
    pub async fn keep<T: Serialize>(self, store: &dyn Store, answer: &T) -> Result<(), ApiError> {
        let kept = Kept {
            fingerprint: self.fingerprint,
            answer: serde_json::to_value(answer)
                .map_err(|err| ApiError::Internal(format!("cannot keep an answer: {err}")))?,
        };
        let json = serde_json::to_vec(&kept)
            .map_err(|err| ApiError::Internal(format!("cannot keep an answer: {err}")))?;
        store.kv_set(&self.kept, &json, Some(KEPT)).await?;
        store.kv_delete(&self.lock).await?;
        Ok(())
    }

    /// The request failed: nothing kept, the key free for a retry.
    pub async fn release(self, store: &dyn Store) {
        if let Err(err) = store.kv_delete(&self.lock).await {
            tracing::warn!(error = %err, "cannot release an idempotency key; it runs out in a minute");
        }
    }
}

/// Runs `create` once per `Idempotency-Key`: the first time for real, a retry with the kept
/// answer. The bool says whether the answer is a replay.
pub async fn once<T, F>(
    store: &dyn Store,
    headers: &HeaderMap,
    scope: &str,
    route: &str,
    fingerprint: &[u8],
    create: F,
) -> Result<(T, bool), ApiError>
where
    T: Serialize + DeserializeOwned,
    F: std::future::Future<Output = Result<T, ApiError>>,
{
    match begin::<T>(store, headers, scope, route, fingerprint).await? {
        Idempotency::None => Ok((create.await?, false)),
        Idempotency::Replay(answer) => Ok((answer, true)),
        Idempotency::First(guard) => match create.await {
            Ok(answer) => {
                guard.keep(store, &answer).await?;
                Ok((answer, false))
            }
            Err(err) => {
                guard.release(store).await;
                Err(err)
            }
        },
    }
}
