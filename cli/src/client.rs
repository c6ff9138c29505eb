//! A client for the gateway's OpenAI Files and Batches API.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::multipart::{Form, Part};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::input::Endpoint;
use crate::openai::{Batch, BatchList, ErrorBody, FileObject};

/// A gateway may sit behind a slow proxy, but a refused or black-holed address should say so
/// quickly rather than hang a script.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// For the small JSON calls (create, get, list, cancel): generous for a loaded gateway, short
/// enough that a wedged one does not stall a `--wait` forever. Uploads and downloads have no
/// overall limit: a large file on a slow link legitimately takes long.
const JSON_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// An error body that is not OpenAI's shape (a proxy's HTML page, say) is shown cut to this.
const RAW_ERROR_SHOWN: usize = 300;

/// The gateway's address, normalised so `/v1/...` paths can be appended: `http://host:8080`,
/// `http://host:8080/`, `http://host:8080/v1` and `http://host:8080/v1/` are all the same
/// gateway. A path prefix in front (`https://example.com/garage/v1`) is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayUrl(Url);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("not a URL: {0}")]
    Invalid(String),
    #[error("the gateway URL must start with http:// or https://")]
    Scheme,
    #[error("the gateway URL must not have a query or fragment")]
    QueryOrFragment,
}

impl GatewayUrl {
    /// The URL of an API path under `/v1`, each segment percent-encoded (a batch id cannot
    /// escape its path segment).
    pub fn api(&self, segments: &[&str]) -> Url {
        let mut url = self.0.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("v1").extend(segments);
        }
        url
    }

    /// The URL of an admin API path (`/admin/...`), each segment percent-encoded.
    pub fn admin(&self, segments: &[&str]) -> Url {
        let mut url = self.0.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("admin").extend(segments);
        }
        url
    }
}

impl FromStr for GatewayUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, UrlError> {
        let mut url = Url::parse(text.trim()).map_err(|err| UrlError::Invalid(err.to_string()))?;
        // `localhost:8080` parses, as a URL with the scheme `localhost`.
        if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
            return Err(UrlError::Scheme);
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(UrlError::QueryOrFragment);
        }
        let mut segments: Vec<String> = url
            .path_segments()
            .map(|segments| {
                segments
                    .filter(|segment| !segment.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if segments.last().is_some_and(|last| last == "v1") {
            segments.pop();
        }
        url.set_path(&segments.join("/"));
        Ok(GatewayUrl(url))
    }
}

impl fmt::Display for GatewayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str().trim_end_matches('/'))
    }
}

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway answered with an error (OpenAI's `{"error": ...}`, or anything else non-2xx).
    #[error("{message} (HTTP {status}{})", code.as_ref().map(|c| format!(", {c}")).unwrap_or_default())]
    Api {
        status: StatusCode,
        message: String,
        kind: Option<String>,
        code: Option<String>,
    },
    /// No answer: refused, reset, timed out, TLS failed.
    #[error("cannot reach the gateway at {url}: {reason}")]
    Transport { url: String, reason: String },
    /// An answer that is not what the API returns.
    #[error("unexpected answer from {url}: {reason}")]
    Decode { url: String, reason: String },
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

impl ClientError {
    /// Worth asking again: the gateway was unreachable, overloaded or failing for a moment.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Api { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            ClientError::Decode { .. } | ClientError::Setup(_) => false,
        }
    }

    fn transport(url: &Url, err: &reqwest::Error) -> Self {
        // reqwest's own message is "error sending request for url (...)"; the innermost cause
        // ("Connection refused", "invalid peer certificate") is the one a user can act on.
        let mut cause: &dyn std::error::Error = err;
        while let Some(source) = cause.source() {
            cause = source;
        }
        let reason = if err.is_timeout() {
            "timed out".to_owned()
        } else {
            cause.to_string()
        };
        ClientError::Transport {
            url: url.to_string(),
            reason,
        }
    }
}

/// The Files and Batches API of one gateway, with one API key.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: GatewayUrl,
    api_key: String,
}

impl Client {
    pub fn new(base: GatewayUrl, api_key: String) -> Result<Self, ClientError> {
        // The workspace builds reqwest without a TLS crypto provider: bring ring's, and
        // Mozilla's roots, as the rig agent does.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| ClientError::Setup(err.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .user_agent(concat!("garage-cli/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|err| ClientError::Setup(err.to_string()))?;
        Ok(Client {
            http,
            base,
            api_key,
        })
    }

    pub fn base(&self) -> &GatewayUrl {
        &self.base
    }

    /// `POST /v1/files` with `purpose=batch`.
    pub async fn upload_batch_file(
        &self,
        filename: &str,
        jsonl: Vec<u8>,
    ) -> Result<FileObject, ClientError> {
        let url = self.base.api(&["files"]);
        let file = Part::bytes(jsonl)
            .file_name(filename.to_owned())
            .mime_str("application/jsonl")
            .map_err(|err| ClientError::Setup(err.to_string()))?;
        let form = Form::new().text("purpose", "batch").part("file", file);
        let response = self
            .send(&url, self.http.post(url.clone()).multipart(form))
            .await?;
        read_json(&url, response).await
    }

    /// `POST /v1/batches`.
    pub async fn create_batch(
        &self,
        input_file_id: &str,
        endpoint: Endpoint,
        metadata: &Map<String, Value>,
    ) -> Result<Batch, ClientError> {
        let mut body = json!({
            "input_file_id": input_file_id,
            "endpoint": endpoint.path(),
            "completion_window": "24h",
        });
        if !metadata.is_empty() {
            body["metadata"] = Value::Object(metadata.clone());
        }
        let url = self.base.api(&["batches"]);
        self.call_json(&url, self.http.post(url.clone()).json(&body))
            .await
    }

    /// `GET /v1/batches/{id}`: the parsed batch, and the JSON as sent (for `--json`).
    pub async fn batch(&self, id: &str) -> Result<(Batch, Value), ClientError> {
        let url = self.base.api(&["batches", id]);
        let json: Value = self.call_json(&url, self.http.get(url.clone())).await?;
        let batch = serde_json::from_value(json.clone()).map_err(|err| ClientError::Decode {
            url: url.to_string(),
            reason: err.to_string(),
        })?;
        Ok((batch, json))
    }

    /// `GET /v1/batches?limit=N&after=ID`: one page, newest first.
    pub async fn list_batches(
        &self,
        limit: u32,
        after: Option<&str>,
    ) -> Result<BatchList, ClientError> {
        let mut url = self.base.api(&["batches"]);
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("limit", &limit.to_string());
            if let Some(after) = after {
                query.append_pair("after", after);
            }
        }
        self.call_json(&url, self.http.get(url.clone())).await
    }

    /// `POST /v1/batches/{id}/cancel`.
    pub async fn cancel_batch(&self, id: &str) -> Result<Batch, ClientError> {
        let url = self.base.api(&["batches", id, "cancel"]);
        self.call_json(&url, self.http.post(url.clone())).await
    }

    /// `GET /v1/files/{id}/content`, to be read chunk by chunk.
    pub async fn file_content(&self, id: &str) -> Result<FileContent, ClientError> {
        let url = self.base.api(&["files", id, "content"]);
        let response = self.send(&url, self.http.get(url.clone())).await?;
        Ok(FileContent { url, response })
    }

    /// A call to the admin API (the client's key is then the admin token): the JSON answer.
    /// A body is a WebAssembly component (`application/wasm`); those calls have no overall
    /// limit, as the gateway compiles the component before it answers (seconds for one
    /// written in Python or JavaScript), and a replay runs it on many recorded calls.
    pub async fn admin_call(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        query: &[(&str, String)],
        wasm: Option<Vec<u8>>,
    ) -> Result<Value, ClientError> {
        let mut url = self.base.admin(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let request = self.http.request(method, url.clone());
        let response = match wasm {
            Some(bytes) => {
                let request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/wasm")
                    .body(bytes);
                self.send(&url, request).await?
            }
            None => self.send(&url, request.timeout(JSON_CALL_TIMEOUT)).await?,
        };
        read_json(&url, response).await
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        url: &Url,
        request: RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = self.send(url, request.timeout(JSON_CALL_TIMEOUT)).await?;
        read_json(url, response).await
    }

    /// Sends with the API key; a non-2xx answer becomes [`ClientError::Api`].
    async fn send(&self, url: &Url, request: RequestBuilder) -> Result<Response, ClientError> {
        let response = request
            .bearer_auth(&self.api_key)
            .send()
            .await
            .map_err(|err| ClientError::transport(url, &err))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|err| ClientError::transport(url, &err))?;
        Err(api_error(status, &body))
    }
}

/// A file's bytes as they arrive.
#[derive(Debug)]
pub struct FileContent {
    url: Url,
    response: Response,
}

impl FileContent {
    /// The next piece, `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        self.response
            .chunk()
            .await
            .map_err(|err| ClientError::transport(&self.url, &err))
    }
}

async fn read_json<T: DeserializeOwned>(url: &Url, response: Response) -> Result<T, ClientError> {
    let body = response
        .bytes()
        .await
        .map_err(|err| ClientError::transport(url, &err))?;
    serde_json::from_slice(&body).map_err(|err| ClientError::Decode {
        url: url.to_string(),
        reason: err.to_string(),
    })
}

/// Reads OpenAI's error envelope, or makes do with whatever the body is.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    if let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(body) {
        let code = error.code.and_then(|code| match code {
            Value::String(code) => Some(code),
            Value::Null => None,
            other => Some(other.to_string()),
        });
        return ClientError::Api {
            status,
            message: error
                .message
                .filter(|message| !message.is_empty())
                .unwrap_or_else(|| reason_phrase(status)),
            kind: error.kind,
            code,
        };
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let message = if text.is_empty() {
        reason_phrase(status)
    } else if text.chars().count() > RAW_ERROR_SHOWN {
        format!(
            "{}...",
            text.chars().take(RAW_ERROR_SHOWN).collect::<String>()
        )
    } else {
        text.to_owned()
    };
    ClientError::Api {
        status,
        message,
        kind: None,
        code: None,
    }
}

fn reason_phrase(status: StatusCode) -> String {
    status.canonical_reason().unwrap_or("no message").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(text: &str) -> GatewayUrl {
        text.parse().expect("a gateway URL")
    }

    #[test]
    fn trailing_slash_and_v1_are_optional() {
        for text in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://127.0.0.1:8080/v1",
            "http://127.0.0.1:8080/v1/",
            " http://127.0.0.1:8080//v1// ",
        ] {
            let url = gateway(text);
            assert_eq!(url.to_string(), "http://127.0.0.1:8080", "{text}");
            assert_eq!(
                url.api(&["batches"]).as_str(),
                "http://127.0.0.1:8080/v1/batches",
                "{text}"
            );
        }
    }

    #[test]
    fn a_path_prefix_is_kept() {
        let url = gateway("https://example.com/garage/v1/");
        assert_eq!(url.to_string(), "https://example.com/garage");
        assert_eq!(
            url.api(&["files", "file-1", "content"]).as_str(),
            "https://example.com/garage/v1/files/file-1/content"
        );
        // Only a last `v1` is the API's; one inside the prefix stays.
        assert_eq!(
            gateway("https://example.com/v1/proxy")
                .api(&["batches"])
                .as_str(),
            "https://example.com/v1/proxy/v1/batches"
        );
    }

    #[test]
    fn ids_cannot_escape_their_path_segment() {
        let url = gateway("http://h").api(&["batches", "../files?x=1#y", "cancel"]);
        assert_eq!(
            url.as_str(),
            "http://h/v1/batches/..%2Ffiles%3Fx=1%23y/cancel"
        );
    }

    #[test]
    fn bad_urls_say_why() {
        assert_eq!(
            "localhost:8080".parse::<GatewayUrl>(),
            Err(UrlError::Scheme)
        );
        assert_eq!(
            "ftp://example.com".parse::<GatewayUrl>(),
            Err(UrlError::Scheme)
        );
        assert_eq!(
            "http://h/v1?x=1".parse::<GatewayUrl>(),
            Err(UrlError::QueryOrFragment)
        );
        assert!(matches!(
            "not a url".parse::<GatewayUrl>(),
            Err(UrlError::Invalid(_))
        ));
    }

    #[test]
    fn openai_errors_keep_message_status_and_code() {
        let error = api_error(
            StatusCode::NOT_FOUND,
            br#"{"error": {"message": "No batch found with id 'batch_x'.", "type": "invalid_request_error", "param": null, "code": "not_found"}}"#,
        );
        assert_eq!(
            error.to_string(),
            "No batch found with id 'batch_x'. (HTTP 404 Not Found, not_found)"
        );
        assert!(!error.is_transient());
    }

    #[test]
    fn other_error_bodies_are_shown_cut_short() {
        let error = api_error(StatusCode::BAD_GATEWAY, "x".repeat(1000).as_bytes());
        let message = error.to_string();
        assert!(message.ends_with("... (HTTP 502 Bad Gateway)"), "{message}");
        assert!(message.len() < 400);
        assert!(error.is_transient());

        let error = api_error(StatusCode::UNAUTHORIZED, b"");
        assert_eq!(error.to_string(), "Unauthorized (HTTP 401 Unauthorized)");
    }
}
