//! Standard Webhooks signatures (<https://www.standardwebhooks.com>): the receiver checks
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`
//! with the endpoint's secret (`whsec_` + base64 of the key), and refuses a timestamp too far
//! from its clock, so a captured delivery cannot be replayed later.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The prefix of a signing secret as shown to the operator.
pub const SECRET_PREFIX: &str = "whsec_";

/// How far a delivery's timestamp may be from the receiver's clock (Standard Webhooks' advice).
pub const TOLERANCE_SECS: u64 = 5 * 60;

/// An endpoint's signing key.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(…)")
    }
}

impl SigningKey {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        SigningKey(bytes.into())
    }

    /// A secret as shown to the operator (`whsec_…`); `None` when it is not one.
    pub fn parse(secret: &str) -> Option<Self> {
        let encoded = secret.strip_prefix(SECRET_PREFIX)?;
        let bytes = BASE64.decode(encoded).ok()?;
        (!bytes.is_empty()).then_some(SigningKey(bytes))
    }

    /// The secret as shown to the operator, once, when the endpoint is created.
    pub fn secret(&self) -> String {
        format!("{SECRET_PREFIX}{}", BASE64.encode(&self.0))
    }

    fn mac(&self, id: &str, timestamp: u64, body: &[u8]) -> [u8; 32] {
        // HMAC takes keys of any length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// The `webhook-signature` header of a delivery.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        format!("v1,{}", BASE64.encode(self.mac(id, timestamp, body)))
    }

    /// What a receiver does with a delivery's headers and body: the signature header may hold
    /// several space-separated signatures (during a secret rotation), any `v1` one that
    /// matches (compared in constant time) will do, and the timestamp must be within
    /// [`TOLERANCE_SECS`] of `now` (Unix seconds).
    pub fn verify(
        &self,
        id: &str,
        timestamp: &str,
        signatures: &str,
        body: &[u8],
        now: u64,
    ) -> Result<(), VerifyError> {
        let timestamp: u64 = timestamp.parse().map_err(|_| VerifyError::Timestamp)?;
        if now.abs_diff(timestamp) > TOLERANCE_SECS {
            return Err(VerifyError::Stale);
        }
        let expected = self.mac(id, timestamp, body);
        let matched = signatures
            .split(' ')
            .filter_map(|signature| signature.strip_prefix("v1,"))
            .filter_map(|encoded| BASE64.decode(encoded).ok())
            .any(|given| bool::from(given.ct_eq(&expected)));
        if matched {
            Ok(())
        } else {
            Err(VerifyError::Mismatch)
        }
    }
}

/// Why a delivery does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("webhook-timestamp is not a number of seconds")]
    Timestamp,
    #[error("webhook-timestamp is too far from now (a replay?)")]
    Stale,
    #[error("no signature matches")]
    Mismatch,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification and its reference libraries.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: u64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_as_the_specification_example() {
        let key = SigningKey::parse(SECRET).unwrap();
        assert_eq!(key.sign(ID, TIMESTAMP, BODY), SIGNATURE);
        assert_eq!(key.secret(), SECRET);
        let ts = TIMESTAMP.to_string();
        assert_eq!(key.verify(ID, &ts, SIGNATURE, BODY, TIMESTAMP + 10), Ok(()));
        // One of several (a rotation), whichever place it has.
        let several = format!("v1,bm9wZQ== {SIGNATURE}");
        assert_eq!(key.verify(ID, &ts, &several, BODY, TIMESTAMP), Ok(()));
    }

    #[test]
    fn a_tampered_stale_or_foreign_delivery_does_not_verify() {
        let key = SigningKey::parse(SECRET).unwrap();
        let ts = TIMESTAMP.to_string();
        let verify =
            |id: &str, ts: &str, sig: &str, body: &[u8], now| key.verify(id, ts, sig, body, now);
        assert_eq!(
            verify(ID, &ts, SIGNATURE, br#"{"test": 2432232315}"#, TIMESTAMP),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify("msg_other", &ts, SIGNATURE, BODY, TIMESTAMP),
            Err(VerifyError::Mismatch)
        );
        // The same signature with another timestamp: the timestamp is signed.
        let later = (TIMESTAMP + 1).to_string();
        assert_eq!(
            verify(ID, &later, SIGNATURE, BODY, TIMESTAMP),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(ID, &ts, SIGNATURE, BODY, TIMESTAMP + TOLERANCE_SECS + 1),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            verify(ID, &ts, SIGNATURE, BODY, TIMESTAMP - TOLERANCE_SECS - 1),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            verify(ID, "soon", SIGNATURE, BODY, TIMESTAMP),
            Err(VerifyError::Timestamp)
        );
        for bad in [
            "",
            "v1,",
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "v1,***",
        ] {
            assert_eq!(
                verify(ID, &ts, bad, BODY, TIMESTAMP),
                Err(VerifyError::Mismatch),
                "{bad:?}"
            );
        }
        let other = SigningKey::new(b"another key".to_vec());
        assert_eq!(
            other.verify(ID, &ts, SIGNATURE, BODY, TIMESTAMP),
            Err(VerifyError::Mismatch)
        );
        assert!(SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_none());
        assert!(SigningKey::parse("whsec_not base64!").is_none());
        assert!(SigningKey::parse("whsec_").is_none());
    }
}
