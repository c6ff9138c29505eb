//! API keys: generated here, shown once, stored only as an HMAC under the server's secret, and
//! looked up through an in-process cache that store events invalidate.

/// Key metadata: the least trust a rig needs to serve the key, `"verified"` or `"unverified"`
/// (docs/trust.md).
pub const MIN_TRUST: &str = "min_trust";

/// Whether the key takes verified rigs only (`"min_trust": "verified"` in its metadata).
pub fn wants_verified_rigs(key: &crate::store::ApiKeyRecord) -> bool {
    key.metadata.get(MIN_TRUST).and_then(|v| v.as_str()) == Some("verified")
}

/// Key metadata: `false` keeps the key's requests from being replayed on other rigs as spot
/// checks (`trust.replay_share`, docs/trust.md).
pub const REPLAY: &str = "replay";

pub mod api;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::task::JoinHandle;

use crate::error::ApiError;
use crate::store::{ApiKeyRecord, Store, StoreError, StoreEvent};

/// Every API key starts with this, so secret scanners and people recognise one.
pub const KEY_PREFIX: &str = "sk-garage-";
/// Random characters after the prefix: 40 alphanumerics carry ~238 bits.
const KEY_RANDOM_LEN: usize = 40;
/// Characters of the secret kept in clear for display (`sk-garage-AbCd`).
const DISPLAY_PREFIX_LEN: usize = KEY_PREFIX.len() + 4;

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn random_token(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// A fresh API key secret.
pub fn generate_key_secret() -> String {
    format!("{KEY_PREFIX}{}", random_token(KEY_RANDOM_LEN))
}

/// Keyed hashing of API key secrets: a leaked store does not let anyone test guesses offline
/// without the server secret too.
#[derive(Clone)]
pub struct KeyHasher {
    mac: Hmac<Sha256>,
}

impl KeyHasher {
    pub fn new(server_secret: &[u8]) -> Self {
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(server_secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        KeyHasher { mac }
    }

    /// The stored form of a secret: its HMAC, in hex.
    pub fn hash(&self, secret: &str) -> String {
        hex::encode(self.digest(secret))
    }

    /// The HMAC of a secret, as bytes (what the key cache is keyed by).
    pub fn digest(&self, secret: &str) -> KeyDigest {
        let mut mac = self.mac.clone();
        mac.update(secret.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Compares a presented admin token with the configured one in constant time. Both sides are
/// hashed first so neither the content nor the length of the real token leaks through timing.
pub fn admin_token_matches(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.ct_eq(&b).into()
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The key in an `x-api-key` header, as Anthropic's SDKs send it.
pub fn x_api_key(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("x-api-key")?.to_str().ok()?.trim();
    (!value.is_empty()).then_some(value)
}

/// An HMAC-SHA256 output.
pub type KeyDigest = [u8; 32];

struct CachedKey {
    record: Arc<ApiKeyRecord>,
    fetched: Instant,
}

/// Authenticates API keys. Cheap to clone.
#[derive(Clone)]
pub struct KeyAuth {
    store: Arc<dyn Store>,
    hasher: KeyHasher,
    /// Keyed by the raw digest: no hex string built and hashed on every request.
    /// Keyed by HMAC digests, which no client can steer: the fast hasher is safe here.
    cache: Arc<RwLock<HashMap<KeyDigest, CachedKey, foldhash::fast::RandomState>>>,
    cache_ttl: Duration,
}

impl KeyAuth {
    pub fn new(store: Arc<dyn Store>, hasher: KeyHasher, cache_ttl: Duration) -> Self {
        KeyAuth {
            store,
            hasher,
            cache: Arc::new(RwLock::new(HashMap::default())),
            cache_ttl,
        }
    }

    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// Keeps the cache honest: drops entries that the store says changed, on every replica.
    pub fn spawn_invalidator(&self) -> JoinHandle<()> {
        let mut events = self.store.subscribe();
        let cache = Arc::clone(&self.cache);
        tokio::spawn(async move {
            loop {
                let event = events.recv().await;
                let mut cache = cache.write().unwrap_or_else(|p| p.into_inner());
                match event {
                    Ok(StoreEvent::KeyChanged { hash, .. }) => {
                        let mut digest = KeyDigest::default();
                        match hex::decode_to_slice(&hash, &mut digest) {
                            Ok(()) => {
                                cache.remove(&digest);
                            }
                            // Not a hash this gateway makes: forget everything to be safe.
                            Err(_) => cache.clear(),
                        }
                    }
                    // A gap in the events (a store reconnect, or this task lagging): we no
                    // longer know what changed, so forget everything.
                    Ok(StoreEvent::Resync)
                    | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => cache.clear(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    Ok(_) => {}
                }
            }
        })
    }

    /// The key record of a request's bearer token: 401 when missing or unknown, 403 when revoked.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<ApiKeyRecord>, ApiError> {
        let secret = bearer(headers).ok_or_else(|| {
            ApiError::Unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.".into(),
            )
        })?;
        self.authenticate_secret(secret).await
    }

    /// [`KeyAuth::authenticate`] on Anthropic's routes, where the key may come as its SDKs
    /// send it, `x-api-key: <key>` (a bearer token is taken first).
    pub async fn authenticate_anthropic(
        &self,
        headers: &HeaderMap,
    ) -> Result<Arc<ApiKeyRecord>, ApiError> {
        let secret = bearer(headers)
            .or_else(|| x_api_key(headers))
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "You didn't provide an API key. Send it as `x-api-key: <key>` (or \
                 `Authorization: Bearer <key>`)."
                        .into(),
                )
            })?;
        self.authenticate_secret(secret).await
    }

    /// The key record of a key's secret (the console's login): as [`KeyAuth::authenticate`].
    pub async fn authenticate_secret(&self, secret: &str) -> Result<Arc<ApiKeyRecord>, ApiError> {
        let digest = self.hasher.digest(secret);
        let record = match self.cached(&digest) {
            Some(record) => record,
            None => {
                let record = self
                    .store
                    .key_by_hash(&hex::encode(digest))
                    .await?
                    .map(Arc::new)
                    .ok_or_else(|| {
                        ApiError::Unauthorized(format!(
                            "Incorrect API key provided: {}. Ask your gateway operator for a key.",
                            redact(secret)
                        ))
                    })?;
                self.cache
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        digest,
                        CachedKey {
                            record: Arc::clone(&record),
                            fetched: Instant::now(),
                        },
                    );
                record
            }
        };
        if record.revoked_at.is_some() {
            return Err(ApiError::Forbidden {
                message: "This API key has been revoked.".into(),
                code: "api_key_revoked",
            });
        }
        Ok(record)
    }

    fn cached(&self, digest: &KeyDigest) -> Option<Arc<ApiKeyRecord>> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        let entry = cache.get(digest)?;
        (entry.fetched.elapsed() < self.cache_ttl).then(|| Arc::clone(&entry.record))
    }

    /// Creates a key, of `account` if given (checked by the caller); returns the record and
    /// the secret, which is never stored or shown again.
    pub async fn create(
        &self,
        name: String,
        allowed_models: Option<Vec<String>>,
        metadata: serde_json::Map<String, serde_json::Value>,
        secret: Option<String>,
        account: Option<String>,
    ) -> Result<(ApiKeyRecord, String), StoreError> {
        let secret = secret.unwrap_or_else(generate_key_secret);
        let record = ApiKeyRecord {
            id: format!("key_{}", random_token(20)),
            name,
            hash: self.hasher.hash(&secret),
            prefix: secret.chars().take(DISPLAY_PREFIX_LEN).collect(),
            allowed_models,
            metadata,
            created_at: unix_now(),
            revoked_at: None,
            account,
        };
        self.store.put_key(&record).await?;
        self.store
            .publish(&StoreEvent::KeyChanged {
                id: record.id.clone(),
                hash: record.hash.clone(),
            })
            .await?;
        Ok((record, secret))
    }

    /// Revokes a key; `None` when there is no such key.
    pub async fn revoke(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let Some(mut record) = self.store.key_by_id(id).await? else {
            return Ok(None);
        };
        if record.revoked_at.is_none() {
            record.revoked_at = Some(unix_now());
            self.store.put_key(&record).await?;
        }
        self.store
            .publish(&StoreEvent::KeyChanged {
                id: record.id.clone(),
                hash: record.hash.clone(),
            })
            .await?;
        Ok(Some(record))
    }
}

/// Shows enough of a wrong key for its owner to recognise it, as OpenAI does.
fn redact(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() <= 8 {
        return "****".into();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}****{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_keyed() {
        let a = KeyHasher::new(b"one").hash("sk-garage-x");
        let b = KeyHasher::new(b"two").hash("sk-garage-x");
        assert_ne!(a, b);
        assert_eq!(a, KeyHasher::new(b"one").hash("sk-garage-x"));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn admin_token_comparison() {
        assert!(admin_token_matches("abc", "abc"));
        assert!(!admin_token_matches("abc", "abd"));
        assert!(!admin_token_matches("", "abc"));
    }

    #[test]
    fn bearer_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert("authorization", "Bearer  tok ".parse().unwrap());
        assert_eq!(bearer(&headers), Some("tok"));
        headers.insert("authorization", "Basic tok".parse().unwrap());
        assert_eq!(bearer(&headers), None);
        assert_eq!(x_api_key(&headers), None);
        headers.insert("x-api-key", " sk-a ".parse().unwrap());
        assert_eq!(x_api_key(&headers), Some("sk-a"));
        headers.insert("x-api-key", "  ".parse().unwrap());
        assert_eq!(x_api_key(&headers), None);
    }

    #[test]
    fn redaction_keeps_secret_out() {
        let secret = generate_key_secret();
        let shown = redact(&secret);
        assert!(!shown.contains(&secret[10..30]));
        assert!(shown.ends_with(&secret[secret.len() - 4..]));
    }
}
