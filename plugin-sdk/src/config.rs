//! Reading JSON: the plugin's configuration and JSON fields of the records (key metadata).

use std::any::{Any, TypeId};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;

use crate::Host;

/// JSON that did not parse into what the plugin expects.
///
/// Converts into the `String` error of a slot's result, so `?` works in a plugin:
///
/// ```
/// use garage_plugin_sdk::{config, testing::MemoryHost};
///
/// #[derive(serde::Deserialize, Default)]
/// #[serde(default, deny_unknown_fields)]
/// struct Settings {
///     epsilon: f64,
/// }
///
/// fn epsilon(host: &MemoryHost) -> Result<f64, String> {
///     let settings: Settings = config::parse(host)?;
///     Ok(settings.epsilon)
/// }
///
/// assert_eq!(epsilon(&MemoryHost::with_config(r#"{"epsilon": 0.5}"#)), Ok(0.5));
/// let error = epsilon(&MemoryHost::with_config(r#"{"epsilom": 0.5}"#)).unwrap_err();
/// assert!(error.starts_with("invalid plugin config: unknown field `epsilom`"), "{error}");
/// ```
#[derive(Debug)]
pub struct JsonError {
    what: &'static str,
    source: serde_json::Error,
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid {}: {}", self.what, self.source)
    }
}

impl std::error::Error for JsonError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<JsonError> for String {
    fn from(error: JsonError) -> Self {
        error.to_string()
    }
}

/// Parses the plugin's configuration ([`Host::config`]) into `T`.
///
/// An empty configuration reads as `{}`, so a `T` whose fields all have serde defaults gets
/// its defaults when the operator configured nothing. Use `#[serde(deny_unknown_fields)]` so
/// a misspelled setting is an error that names it rather than a silently ignored key.
pub fn parse<T: DeserializeOwned>(host: &dyn Host) -> Result<T, JsonError> {
    from_json("plugin config", &host.config())
}

/// [`parse`], once per instance: the configuration of a plugin instance never changes, so the
/// first call of an instance parses it and the later ones get the same value (the gateway
/// reuses instances across calls). An error is not kept: every call reports it again.
///
/// Against a host whose configuration may change between calls ([`Host::config_is_fixed`] is
/// `false`, as for [`MemoryHost`](crate::testing::MemoryHost)), it parses every time, so tests
/// can change the configuration between calls.
///
/// ```
/// use garage_plugin_sdk::{config, testing::MemoryHost};
///
/// #[derive(serde::Deserialize, Default)]
/// #[serde(default, deny_unknown_fields)]
/// struct Settings {
///     epsilon: f64,
/// }
///
/// let host = MemoryHost::with_config(r#"{"epsilon": 0.5}"#);
/// let settings = config::cached::<Settings>(&host).unwrap();
/// assert_eq!(settings.epsilon, 0.5);
/// ```
pub fn cached<T>(host: &dyn Host) -> Result<Arc<T>, JsonError>
where
    T: DeserializeOwned + Send + Sync + 'static,
{
    if !host.config_is_fixed() {
        return parse(host).map(Arc::new);
    }
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let id = TypeId::of::<T>();
    if let Some((_, value)) = cache.iter().find(|(type_id, _)| *type_id == id)
        && let Ok(value) = Arc::clone(value).downcast::<T>()
    {
        return Ok(value);
    }
    let value = Arc::new(parse::<T>(host)?);
    cache.push((id, Arc::clone(&value) as Arc<dyn Any + Send + Sync>));
    Ok(value)
}

/// The configurations parsed by [`cached`], by type.
type Cache = Vec<(TypeId, Arc<dyn Any + Send + Sync>)>;
static CACHE: Mutex<Cache> = Mutex::new(Vec::new());

/// Parses JSON text into `T`; `what` names the text in the error (`"key metadata"`...).
/// Empty text reads as `{}`.
///
/// ```
/// use garage_plugin_sdk::config;
///
/// #[derive(serde::Deserialize, Default, Debug, PartialEq)]
/// #[serde(default)]
/// struct Limits {
///     rpm: Option<u64>,
/// }
///
/// let limits: Limits = config::from_json("key metadata", r#"{"rpm": 60, "team": "x"}"#).unwrap();
/// assert_eq!(limits.rpm, Some(60));
/// let none: Limits = config::from_json("key metadata", "").unwrap();
/// assert_eq!(none, Limits::default());
/// ```
pub fn from_json<T: DeserializeOwned>(what: &'static str, text: &str) -> Result<T, JsonError> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    serde_json::from_str(text).map_err(|source| JsonError { what, source })
}
