//! Enrollment: tokens from the admin API, traded once for a rig's node identity and credential;
//! authenticating that credential.

use super::*;

/// Longest rig name, in characters.
const MAX_RIG_NAME: usize = 128;

impl Nodes {
    pub async fn create_enrollment_token(
        &self,
        request: CreateEnrollmentToken,
    ) -> Result<CreatedEnrollmentToken, ApiError> {
        if request.operator.trim().is_empty() {
            return Err(ApiError::bad_request(
                "operator must not be empty",
                Some("operator"),
            ));
        }
        let id = format!("enr_{}", random_token(16));
        let secret = random_token(40);
        let now = unix_now();
        let record = TokenRecord {
            id: id.clone(),
            hash: self.hasher.hash(&secret),
            operator: request.operator,
            created_at: now,
            expires_at: now
                + request
                    .expires_in_secs
                    .unwrap_or(self.config.enrollment_token_ttl_secs),
            max_uses: request.max_uses.unwrap_or(1).max(1),
        };
        self.put(TOKEN_KIND, &id, &record).await?;
        Ok(CreatedEnrollmentToken {
            token: format!("{id}.{secret}"),
            id,
            operator: record.operator,
            expires_at: record.expires_at,
            max_uses: record.max_uses,
        })
    }

    /// Trades an enrollment token for a node identity.
    pub async fn enroll(&self, request: EnrollRequest) -> Result<EnrollResponse, ApiError> {
        // A name is shown on pages and in logs: bounded, and printable. Checked before the
        // token is spent on it.
        if request.name.chars().count() > MAX_RIG_NAME || request.name.chars().any(char::is_control)
        {
            return Err(ApiError::bad_request(
                format!(
                    "name must be at most {MAX_RIG_NAME} characters, without control characters"
                ),
                Some("name"),
            ));
        }
        // Checked before the token is spent on it.
        let receipt_key = match &request.public_key {
            Some(key) => Some(
                garage_node_protocol::receipt::PublicKey::parse(key)
                    .map_err(|err| {
                        ApiError::bad_request(format!("public_key: {err}"), Some("public_key"))
                    })?
                    .to_base64(),
            ),
            None => None,
        };
        let refused = || ApiError::Unauthorized("Invalid or expired enrollment token.".into());
        let (token_id, secret) = split_credential(&request.token).ok_or_else(refused)?;
        let token: TokenRecord = self.get(TOKEN_KIND, token_id).await?.ok_or_else(refused)?;
        if !hashes_match(&token.hash, &self.hasher.hash(secret)) || token.expires_at <= unix_now() {
            return Err(refused());
        }
        // Counted in the store so that uses add up across replicas.
        let ttl = Duration::from_secs(token.expires_at.saturating_sub(unix_now()).max(1));
        let uses = self
            .store
            .kv_incr(&enrollment_uses(token_id), 1, Some(ttl))
            .await?;
        if uses > i64::from(token.max_uses) {
            return Err(ApiError::Unauthorized(
                "This enrollment token has been used up.".into(),
            ));
        }
        let id = format!("node_{}", random_token(16));
        let secret = random_token(40);
        let name = if request.name.trim().is_empty() {
            id.clone()
        } else {
            request.name
        };
        let record = NodeRecord {
            id: id.clone(),
            name,
            operator: token.operator.clone(),
            credential_hash: self.hasher.hash(&secret),
            enrolled_at: unix_now(),
            revoked_at: None,
            drained: false,
            quarantined: false,
            reference: false,
            version: request.version,
            receipt_key,
        };
        self.put(NODE_KIND, &id, &record).await?;
        tracing::info!(node = %id, name = %record.name, operator = %record.operator, receipts = record.receipt_key.is_some(), "rig enrolled");
        Ok(EnrollResponse {
            node_id: id.clone(),
            credential: format!("{id}.{secret}"),
            operator: token.operator,
            heartbeat_interval_secs: self.config.heartbeat_interval().as_secs(),
        })
    }

    /// The rig behind a request's node credential: 401 when unknown, 403 when revoked.
    pub async fn authenticate(&self, headers: &http::HeaderMap) -> Result<NodeRecord, ApiError> {
        let refused = || ApiError::Unauthorized("Invalid node credential.".into());
        let credential = bearer(headers).ok_or_else(refused)?;
        let (id, secret) = split_credential(credential).ok_or_else(refused)?;
        let record: NodeRecord = self.get(NODE_KIND, id).await?.ok_or_else(refused)?;
        if !hashes_match(&record.credential_hash, &self.hasher.hash(secret)) {
            return Err(refused());
        }
        if record.revoked_at.is_some() {
            return Err(ApiError::Forbidden {
                message: "This rig has been removed by the gateway's admin.".into(),
                code: "node_revoked",
            });
        }
        Ok(record)
    }
}
