//! Operators: the people whose rigs serve the network and earn its rewards. An admin creates
//! one and hands them a token, shown once; with it the operator makes their own enrollment
//! tokens and sees only their own rigs, earnings and statements (`/operator/v1/...`, and the
//! console). An operator token is a credential of its own, apart from the admin token, API
//! keys and rigs' node credentials: `{id}.{secret}`, the secret stored as an HMAC and compared
//! in constant time, as enrollment tokens are.

use super::*;
use crate::store::keyspace::OPERATORS as OPERATOR_KIND;

/// An operator as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OperatorRecord {
    id: String,
    /// The name their rigs' enrollment tokens, rewards and statements carry.
    name: String,
    hash: String,
    created_at: u64,
    revoked_at: Option<u64>,
}

/// An operator as the admin API shows it: never the secret or its hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OperatorInfo {
    pub id: String,
    pub name: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds, when revoked.
    pub revoked_at: Option<u64>,
}

impl From<OperatorRecord> for OperatorInfo {
    fn from(r: OperatorRecord) -> Self {
        OperatorInfo {
            id: r.id,
            name: r.name,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
        }
    }
}

/// `POST /admin/operators` body.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOperator {
    /// The operator's name: what their rigs' rewards and statements are under.
    pub name: String,
}

/// An operator just created: the token is in this response only.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct CreatedOperator {
    /// Give this to the operator: their console login and `/operator/v1` credential.
    pub token: String,
    #[serde(flatten)]
    pub info: OperatorInfo,
}

/// Longest operator name.
const MAX_NAME: usize = 128;

impl Nodes {
    async fn operator_records(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        self.store
            .record_list(OPERATOR_KIND)
            .await?
            .iter()
            .map(|bytes| serde_json::from_slice(bytes).map_err(corrupt))
            .collect()
    }

    /// Creates an operator; its token is shown once. A name in use by a live operator is a
    /// conflict (409): two tokens for one name would be two people earning as one.
    pub async fn create_operator(
        &self,
        request: CreateOperator,
    ) -> Result<CreatedOperator, ApiError> {
        let name = request.name.trim().to_owned();
        if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                format!("name must be 1 to {MAX_NAME} characters, without control characters"),
                Some("name"),
            ));
        }
        let existing = self.operator_records().await?;
        if existing
            .iter()
            .any(|o| o.name == name && o.revoked_at.is_none())
        {
            return Err(ApiError::Conflict(format!(
                "An operator named `{name}` exists; revoke it first to issue a new token."
            )));
        }
        let id = format!("opr_{}", random_token(16));
        let secret = random_token(40);
        let record = OperatorRecord {
            id: id.clone(),
            name,
            hash: self.hasher.hash(&secret),
            created_at: unix_now(),
            revoked_at: None,
        };
        self.put(OPERATOR_KIND, &id, &record).await?;
        tracing::info!(operator = %record.name, id = %id, "operator created");
        Ok(CreatedOperator {
            token: format!("{id}.{secret}"),
            info: record.into(),
        })
    }

    pub async fn list_operators(&self) -> Result<Vec<OperatorInfo>, ApiError> {
        let mut records = self.operator_records().await?;
        records.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(records.into_iter().map(OperatorInfo::from).collect())
    }

    /// Revokes an operator's token: refused from now on, on every replica (it is read from the
    /// store on each use). Their rigs keep serving; their rewards keep accruing.
    pub async fn revoke_operator(&self, id: &str) -> Result<OperatorInfo, ApiError> {
        let mut record: OperatorRecord = self
            .get(OPERATOR_KIND, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("No operator with id `{id}`.")))?;
        if record.revoked_at.is_none() {
            record.revoked_at = Some(unix_now());
            self.put(OPERATOR_KIND, id, &record).await?;
            tracing::info!(operator = %record.name, id, "operator token revoked");
        }
        Ok(record.into())
    }

    /// The operator an operator token belongs to: 401 when it is not one, 403 when revoked.
    pub async fn authenticate_operator(&self, token: &str) -> Result<OperatorInfo, ApiError> {
        let refused = || ApiError::Unauthorized("Invalid operator token.".into());
        let (id, secret) = split_credential(token).ok_or_else(refused)?;
        if !id.starts_with("opr_") {
            return Err(refused());
        }
        let record: OperatorRecord = self.get(OPERATOR_KIND, id).await?.ok_or_else(refused)?;
        if !hashes_match(&record.hash, &self.hasher.hash(secret)) {
            return Err(refused());
        }
        if record.revoked_at.is_some() {
            return Err(ApiError::Forbidden {
                message: "This operator token has been revoked.".into(),
                code: "operator_revoked",
            });
        }
        Ok(record.into())
    }

    /// A live operator by id (`None` when unknown or revoked): a console session's check.
    pub async fn live_operator(&self, id: &str) -> Result<Option<OperatorInfo>, StoreError> {
        let record: Option<OperatorRecord> = self.get(OPERATOR_KIND, id).await?;
        Ok(record
            .filter(|r| r.revoked_at.is_none())
            .map(OperatorInfo::from))
    }

    /// The operator of a request's bearer token.
    pub async fn operator_of(&self, headers: &http::HeaderMap) -> Result<OperatorInfo, ApiError> {
        let token = crate::keys::bearer(headers).ok_or_else(|| {
            ApiError::Unauthorized(
                "The operator API needs `Authorization: Bearer <operator token>`.".into(),
            )
        })?;
        self.authenticate_operator(token).await
    }

    /// The operator's own rigs.
    pub async fn rigs_of(&self, operator: &str) -> Result<Vec<NodeInfo>, ApiError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|n| n.operator == operator)
            .collect())
    }

    /// One of the operator's rigs: 404 for another's, as for one that does not exist.
    pub async fn rig_of(&self, operator: &str, id: &str) -> Result<NodeInfo, ApiError> {
        self.rigs_of(operator)
            .await?
            .into_iter()
            .find(|n| n.id == id)
            .ok_or_else(|| ApiError::NotFound(format!("No rig of yours with id `{id}`.")))
    }
}
