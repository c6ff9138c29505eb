//! The account record: who the customer is, their budgets per period and alert thresholds,
//! and whether the account is closed. Its money is the store's (see the module's doc).

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::Accounts;
use super::money::Credits;
use super::periods::Period;
use crate::error::ApiError;
use crate::store::keyspace::ACCOUNTS;
use crate::store::{ApiKeyRecord, StoreError, StoreEvent};

/// Longest account name, in characters: names are shown in the console and in logs.
const MAX_NAME_CHARS: usize = 200;
/// Largest metadata, as JSON.
const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Most alert thresholds per account.
const MAX_THRESHOLDS: usize = 10;

/// An account's spending caps per period (credits), each optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Budgets {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<Credits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub week: Option<Credits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<Credits>,
}

impl Budgets {
    pub fn get(&self, period: Period) -> Option<Credits> {
        match period {
            Period::Day => self.day,
            Period::Week => self.week,
            Period::Month => self.month,
        }
    }

    /// The periods that have a cap, with it.
    pub fn caps(&self) -> impl Iterator<Item = (Period, Credits)> + '_ {
        Period::ALL
            .into_iter()
            .filter_map(|period| self.get(period).map(|cap| (period, cap)))
    }

    fn check(&self) -> Result<(), ApiError> {
        for (period, cap) in self.caps() {
            if cap.micro() <= 0 {
                return Err(ApiError::bad_request(
                    format!(
                        "budgets.{} must be more than 0 credits (leave it out for no cap)",
                        period.as_str()
                    ),
                    Some("budgets"),
                ));
            }
        }
        Ok(())
    }
}

/// An account as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Account {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub budgets: Budgets,
    /// Percentages of each period budget at which an alert is raised, ascending.
    #[serde(default)]
    pub alert_thresholds: Vec<u32>,
    /// An alert is raised when the balance falls below this.
    #[serde(default)]
    pub low_balance_alert: Option<Credits>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; a closed account's keys are refused and it takes no top-ups.
    #[serde(default)]
    pub closed_at: Option<u64>,
}

/// A new account.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    /// A name for people: the customer.
    pub name: String,
    /// Free-form metadata (a customer number, a contact...).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Spending caps per calendar day, week (from Monday) and month, in the gateway's zone
    /// (`accounts.utc_offset_minutes`).
    #[serde(default)]
    pub budgets: Budgets,
    /// Percentages of each period budget at which an alert is raised once per period (say
    /// `[50, 80, 100]`), 1 to 100.
    #[serde(default)]
    pub alert_thresholds: Vec<u32>,
    /// Raise an alert when the balance falls below this many credits.
    #[serde(default)]
    pub low_balance_alert: Option<Credits>,
}

/// Changes to an account: the members sent replace the account's (`budgets` whole; `null`
/// clears `low_balance_alert`).
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAccount {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub budgets: Option<Budgets>,
    #[serde(default)]
    pub alert_thresholds: Option<Vec<u32>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<f64>)]
    pub low_balance_alert: Option<Option<Credits>>,
}

/// A member that is there, as `Some` (its value may be `null`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

fn check_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty()
        || name.chars().count() > MAX_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            format!("name must be 1 to {MAX_NAME_CHARS} characters, without control characters"),
            Some("name"),
        ));
    }
    Ok(name.to_owned())
}

fn check_metadata(metadata: &serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    let size = serde_json::to_vec(metadata).map_or(usize::MAX, |json| json.len());
    if size > MAX_METADATA_BYTES {
        return Err(ApiError::bad_request(
            format!("metadata must be at most {MAX_METADATA_BYTES} bytes of JSON"),
            Some("metadata"),
        ));
    }
    Ok(())
}

/// Thresholds sorted, without repeats; each 1 to 100 percent.
fn check_thresholds(thresholds: &[u32]) -> Result<Vec<u32>, ApiError> {
    if thresholds.len() > MAX_THRESHOLDS || thresholds.iter().any(|t| !(1..=100).contains(t)) {
        return Err(ApiError::bad_request(
            format!("alert_thresholds must be at most {MAX_THRESHOLDS} percentages from 1 to 100"),
            Some("alert_thresholds"),
        ));
    }
    let mut sorted = thresholds.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    Ok(sorted)
}

fn check_low_balance(alert: Option<Credits>) -> Result<Option<Credits>, ApiError> {
    match alert {
        Some(amount) if amount.micro() <= 0 => Err(ApiError::bad_request(
            "low_balance_alert must be more than 0 credits (leave it out for no alert)",
            Some("low_balance_alert"),
        )),
        other => Ok(other),
    }
}

impl Accounts {
    /// An account by id.
    pub async fn get(&self, id: &str) -> Result<Option<Account>, StoreError> {
        self.store()
            .record_get(ACCOUNTS, id)
            .await?
            .map(|bytes| serde_json::from_slice(&bytes))
            .transpose()
            .map_err(StoreError::from)
    }

    /// An account by id, or 404.
    pub async fn get_or_404(&self, id: &str) -> Result<Account, ApiError> {
        self.get(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("No account with id `{id}`.")))
    }

    async fn put(&self, account: &Account) -> Result<(), StoreError> {
        let json = serde_json::to_vec(account)?;
        self.store().record_put(ACCOUNTS, &account.id, &json).await
    }

    /// Every account, oldest first.
    pub async fn list(&self) -> Result<Vec<Account>, StoreError> {
        let mut accounts: Vec<Account> = self
            .store()
            .record_list(ACCOUNTS)
            .await?
            .iter()
            .map(|bytes| serde_json::from_slice(bytes))
            .collect::<Result<_, _>>()?;
        accounts.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(accounts)
    }

    /// Creates an account, with no credits.
    pub async fn create(&self, request: CreateAccount) -> Result<Account, ApiError> {
        let name = check_name(&request.name)?;
        check_metadata(&request.metadata)?;
        request.budgets.check()?;
        let account = Account {
            id: format!("acct_{}", crate::keys::random_token(20)),
            name,
            metadata: request.metadata,
            budgets: request.budgets,
            alert_thresholds: check_thresholds(&request.alert_thresholds)?,
            low_balance_alert: check_low_balance(request.low_balance_alert)?,
            created_at: self.now_ms() / 1000,
            closed_at: None,
        };
        self.put(&account).await?;
        tracing::info!(account = %account.id, name = %account.name, "account created");
        Ok(account)
    }

    /// Changes an account's name, metadata, budgets or alerts.
    pub async fn update(&self, id: &str, update: UpdateAccount) -> Result<Account, ApiError> {
        let mut account = self.get_or_404(id).await?;
        if let Some(name) = update.name {
            account.name = check_name(&name)?;
        }
        if let Some(metadata) = update.metadata {
            check_metadata(&metadata)?;
            account.metadata = metadata;
        }
        if let Some(budgets) = update.budgets {
            budgets.check()?;
            account.budgets = budgets;
        }
        if let Some(thresholds) = update.alert_thresholds {
            account.alert_thresholds = check_thresholds(&thresholds)?;
        }
        if let Some(alert) = update.low_balance_alert {
            account.low_balance_alert = check_low_balance(alert)?;
        }
        self.put(&account).await?;
        Ok(account)
    }

    /// Closes an account: its keys are refused from now on, and it takes no more top-ups. Its
    /// record, credit ledger and balance stay (a refund is a negative adjustment).
    pub async fn close(&self, id: &str) -> Result<Account, ApiError> {
        let mut account = self.get_or_404(id).await?;
        if account.closed_at.is_none() {
            account.closed_at = Some(self.now_ms() / 1000);
            self.put(&account).await?;
            tracing::info!(account = %account.id, "account closed");
        }
        Ok(account)
    }

    /// The keys an account owns, oldest first.
    pub async fn keys_of(&self, id: &str) -> Result<Vec<ApiKeyRecord>, StoreError> {
        Ok(self
            .store()
            .list_keys()
            .await?
            .into_iter()
            .filter(|key| key.account.as_deref() == Some(id))
            .collect())
    }

    /// Checks that a key may be given to the account `id`: it exists and is open.
    pub async fn check_assignable(&self, id: &str) -> Result<Account, ApiError> {
        let account = self.get(id).await?.ok_or_else(|| {
            ApiError::bad_request_code(
                format!("No account with id `{id}`."),
                Some("account"),
                "account_not_found",
            )
        })?;
        if account.closed_at.is_some() {
            return Err(ApiError::bad_request_code(
                format!("The account `{id}` is closed."),
                Some("account"),
                "account_closed",
            ));
        }
        Ok(account)
    }

    /// Gives a key to an account (`Some`), or takes it from its account (`None`). Requests of
    /// the key in flight are charged to the account it has when they are settled.
    pub async fn set_key_account(
        &self,
        key_id: &str,
        account: Option<&str>,
    ) -> Result<ApiKeyRecord, ApiError> {
        let mut key = self
            .store()
            .key_by_id(key_id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("No API key with id `{key_id}`.")))?;
        key.account = account.map(str::to_owned);
        self.store().put_key(&key).await?;
        // Every replica drops the key from its cache, and sees its new account.
        self.store()
            .publish(&StoreEvent::KeyChanged {
                id: key.id.clone(),
                hash: key.hash.clone(),
            })
            .await?;
        tracing::info!(key_id = %key.id, account = ?key.account, "key's account changed");
        Ok(key)
    }
}
