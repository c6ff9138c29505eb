//! Console sessions: a token pasted once at login becomes an opaque session id in an
//! `HttpOnly`, `SameSite=Strict` cookie. The token itself is never stored: an admin session
//! records that the admin token matched, an app session the id of the API key that did.
//!
//! The store keeps each session under the SHA-256 of its id (a leaked store holds no usable
//! cookie), expiring by itself after [`SESSION_TTL`]; logging out deletes it, and an app
//! session ends as soon as its key is revoked (checked on every page). Every state-changing
//! request carries the session's CSRF token (a form field or the `x-csrf-token` header),
//! compared in constant time, on top of `SameSite=Strict` and an `Origin` check.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::{Store, StoreError};

/// The cookie that carries the session id.
pub const COOKIE: &str = "garage_console";
/// How long a session lasts, from login.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// Who is logged in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Role {
    /// The operator of the gateway (the admin token).
    Admin,
    /// An app developer (an API key), by key id.
    App { key_id: String },
    /// A rig owner (an operator token), by operator id and name.
    Operator { id: String, name: String },
}

/// A session as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub role: Role,
    /// The token every state-changing request must carry.
    pub csrf: String,
    /// Unix seconds.
    pub created_at: u64,
}

impl Session {
    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, presented: &str) -> bool {
        let a = Sha256::digest(presented.as_bytes());
        let b = Sha256::digest(self.csrf.as_bytes());
        a.ct_eq(&b).into()
    }
}

/// 32 random bytes, in hex: a session id or a CSRF token.
fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// Where a session id's session lives in the store (the id's SHA-256, never the id).
fn store_key(id: &str) -> String {
    crate::store::keyspace::console_session(&hex::encode(Sha256::digest(id.as_bytes())))
}

/// Starts a session for `role`: its id, for the cookie, and the session.
pub async fn create(store: &dyn Store, role: Role) -> Result<(String, Session), StoreError> {
    let id = random_token();
    let session = Session {
        role,
        csrf: random_token(),
        created_at: crate::keys::unix_now(),
    };
    let json = serde_json::to_vec(&session)
        .map_err(|err| StoreError::Corrupt(format!("console session: {err}")))?;
    store
        .kv_set(&store_key(&id), &json, Some(SESSION_TTL))
        .await?;
    Ok((id, session))
}

/// The session of a cookie's id, if it is live. An id of the wrong shape is not looked up.
pub async fn find(store: &dyn Store, id: &str) -> Result<Option<Session>, StoreError> {
    let plausible = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    if !plausible {
        return Ok(None);
    }
    Ok(store
        .kv_get(&store_key(id))
        .await?
        .and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

/// Ends a session.
pub async fn end(store: &dyn Store, id: &str) -> Result<(), StoreError> {
    store.kv_delete(&store_key(id)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn sessions_are_kept_by_hash_and_end_at_logout() {
        let store = MemoryStore::new();
        let (id, session) = create(&store, Role::Admin).await.unwrap();
        assert_eq!(id.len(), 64);
        assert!(
            store
                .kv_get(&format!("console_session:{id}"))
                .await
                .unwrap()
                .is_none()
        );
        let found = find(&store, &id).await.unwrap().unwrap();
        assert_eq!(found.role, Role::Admin);
        assert!(found.csrf_matches(&session.csrf));
        assert!(!found.csrf_matches("forged"));
        assert!(find(&store, "not-a-session").await.unwrap().is_none());
        end(&store, &id).await.unwrap();
        assert!(find(&store, &id).await.unwrap().is_none());
    }
}
