//! Webhook endpoints: where events go, which kinds each takes, and its signing key.
//!
//! The store keeps no secret: an endpoint's signing key is derived from the server's key
//! secret (`auth.key_secret`, the same on every replica) and the endpoint's id, so every
//! replica signs alike and a copy of the store alone signs nothing.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::event::EventKind;
use super::signing::SigningKey;
use crate::error::ApiError;
use crate::keys::KeyHasher;

/// Longest URL an endpoint may have.
const MAX_URL_BYTES: usize = 2048;
/// Longest description.
const MAX_DESCRIPTION_CHARS: usize = 256;
/// Endpoints a gateway may have: each event is written once per endpoint subscribed to it.
pub const MAX_ENDPOINTS: usize = 50;

/// An endpoint as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointRecord {
    /// `we_…`.
    pub id: String,
    pub url: String,
    pub events: Vec<EventKind>,
    pub description: String,
    /// Unix seconds.
    pub created_at: u64,
}

impl EndpointRecord {
    pub fn takes(&self, kind: EventKind) -> bool {
        self.events.contains(&kind)
    }
}

/// `POST /admin/webhooks` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpoint {
    /// Where deliveries are POSTed: an `http://` or `https://` URL (redirects are not
    /// followed).
    pub url: String,
    /// The kinds of event it takes: `usage.recorded`, `payout.completed`,
    /// `budget.threshold`, `balance.low`.
    pub events: Vec<String>,
    /// For people: what receives these events.
    #[serde(default)]
    pub description: Option<String>,
}

impl CreateEndpoint {
    /// Checks the request: the URL, the kinds, the description.
    pub fn validate(self) -> Result<(String, Vec<EventKind>, String), ApiError> {
        let url = check_url(self.url.trim())?;
        if self.events.is_empty() {
            return Err(ApiError::bad_request(
                "events must name at least one event type.",
                Some("events"),
            ));
        }
        let mut events = Vec::new();
        for name in &self.events {
            let Some(kind) = EventKind::parse(name) else {
                let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                return Err(ApiError::bad_request(
                    format!(
                        "Unknown event type {:?}; known: {}.",
                        truncate(name, 64),
                        known.join(", ")
                    ),
                    Some("events"),
                ));
            };
            if !events.contains(&kind) {
                events.push(kind);
            }
        }
        let description = self.description.unwrap_or_default();
        if description.chars().count() > MAX_DESCRIPTION_CHARS
            || description.chars().any(char::is_control)
        {
            return Err(ApiError::bad_request(
                format!(
                    "description must be at most {MAX_DESCRIPTION_CHARS} characters, none of \
                     them control characters."
                ),
                Some("description"),
            ));
        }
        Ok((url, events, description))
    }
}

fn truncate(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

/// An endpoint URL: absolute `http` or `https` with a host, no credentials in it (the
/// signature says who sent a delivery; a password in the URL would be shown in every
/// listing), at most [`MAX_URL_BYTES`].
fn check_url(url: &str) -> Result<String, ApiError> {
    let bad = |why: &str| {
        Err(ApiError::bad_request(
            format!("url {:?} {why}", truncate(url, 200)),
            Some("url"),
        ))
    };
    if url.len() > MAX_URL_BYTES {
        return bad(&format!("is longer than {MAX_URL_BYTES} bytes."));
    }
    let Ok(uri) = url.parse::<http::Uri>() else {
        return bad("is not a URL.");
    };
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return bad("must start with http:// or https://."),
    }
    let Some(authority) = uri.authority() else {
        return bad("has no host.");
    };
    if authority.as_str().contains('@') {
        return bad("must not hold credentials (the signature authenticates deliveries).");
    }
    if authority.host().is_empty() {
        return bad("has no host.");
    }
    Ok(url.to_owned())
}

/// What the admin API shows of an endpoint: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EndpointInfo {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub description: String,
    /// Unix seconds.
    pub created_at: u64,
}

impl From<&EndpointRecord> for EndpointInfo {
    fn from(record: &EndpointRecord) -> Self {
        EndpointInfo {
            id: record.id.clone(),
            url: record.url.clone(),
            events: record
                .events
                .iter()
                .map(|k| k.as_str().to_owned())
                .collect(),
            description: record.description.clone(),
            created_at: record.created_at,
        }
    }
}

/// An endpoint just created: the only answer that holds its signing secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedEndpoint {
    /// The signing secret (`whsec_…`), for the receiver to verify deliveries with. Shown
    /// once: store it now.
    pub secret: String,
    #[serde(flatten)]
    pub info: EndpointInfo,
}

/// Derives endpoints' signing keys from the server's key secret.
pub struct KeyDeriver(KeyHasher);

impl KeyDeriver {
    pub fn new(server_secret: &[u8]) -> Self {
        KeyDeriver(KeyHasher::new(server_secret))
    }

    /// The endpoint's signing key: HMAC-SHA256 of its id under the server's key secret.
    pub fn key(&self, endpoint_id: &str) -> SigningKey {
        SigningKey::new(
            self.0
                .digest(&format!("webhook-signing-key:{endpoint_id}"))
                .to_vec(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(url: &str, events: &[&str]) -> Result<(String, Vec<EventKind>, String), ApiError> {
        CreateEndpoint {
            url: url.into(),
            events: events.iter().map(|e| e.to_string()).collect(),
            description: None,
        }
        .validate()
    }

    #[test]
    fn urls_are_http_or_https_with_a_host() {
        for good in [
            "http://127.0.0.1:9000/hooks",
            "https://billing.example.com/garage?x=1",
            "  https://example.com  ",
        ] {
            assert!(create(good, &["usage.recorded"]).is_ok(), "{good}");
        }
        for bad in [
            "",
            "example.com/hooks",
            "ftp://example.com/",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "https://user:pw@example.com/",
            "/relative",
            "http://",
            "https://exa mple.com/",
        ] {
            let err = create(bad, &["usage.recorded"]).unwrap_err();
            assert_eq!(err.status(), 400, "{bad}");
            assert_eq!(err.body().error.param.as_deref(), Some("url"), "{bad}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert!(create(&long, &["usage.recorded"]).is_err());
    }

    #[test]
    fn events_are_known_kinds_at_least_one() {
        let (_, events, _) = create(
            "https://example.com",
            &["usage.recorded", "budget.threshold", "usage.recorded"],
        )
        .unwrap();
        assert_eq!(
            events,
            [EventKind::UsageRecorded, EventKind::BudgetThreshold]
        );
        for bad in [&[][..], &["usage.everything"], &["Usage.Recorded"]] {
            let err = create("https://example.com", bad).unwrap_err();
            assert_eq!(err.body().error.param.as_deref(), Some("events"));
        }
    }

    #[test]
    fn keys_differ_per_endpoint_and_per_server_secret() {
        let a = KeyDeriver::new(b"server secret a");
        let b = KeyDeriver::new(b"server secret b");
        assert_eq!(a.key("we_1").secret(), a.key("we_1").secret());
        assert_ne!(a.key("we_1").secret(), a.key("we_2").secret());
        assert_ne!(a.key("we_1").secret(), b.key("we_1").secret());
        assert!(a.key("we_1").secret().starts_with("whsec_"));
    }
}
