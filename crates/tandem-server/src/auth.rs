//! API keys: which routes a request may call, and whom it is charged to.
//!
//! Without keys every route is open (a local server). With `--api-key` every route except
//! `/health` needs `Authorization: Bearer KEY` (or `X-API-Key: KEY`, which the Tinker SDK sends).
//! Training keys (`--training-api-key`) and admin keys (`--admin-api-key`), when given, are the
//! only ones that reach the training API and the admin routes; admin keys reach everything.
//! A request's identity for fair scheduling is then its key (as a short hash: keys never appear
//! in logs or metrics); `X-Tandem-Client` may only name it with `--trust-client-header`.
use crate::ApiError;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The keys a server accepts, by what they may call.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// Keys for the OpenAI API (and, when no training keys are set, the training API).
    pub api_keys: Vec<String>,
    /// Keys for the training API (also accepted by the OpenAI API).
    pub training_keys: Vec<String>,
    /// Keys for every route, including exports.
    pub admin_keys: Vec<String>,
    /// `X-Tandem-Client` names the client even when keys are on (a trusted gateway in front).
    pub trust_client_header: bool,
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Public,
    Serve,
    Train,
    Admin,
}

impl Scope {
    /// The rule for every route, in one place.
    pub fn of(path: &str) -> Scope {
        if path == "/health" {
            Scope::Public
        } else if path.starts_with("/tandem/v1/export") || crate::worker::is_control(path) {
            Scope::Admin
        } else if path.starts_with("/api/v1/") || path == "/generate" {
            Scope::Train
        } else {
            Scope::Serve
        }
    }
}

/// Who sent a request, as the auth layer established it (a request extension).
#[derive(Clone, Debug, Default)]
pub struct Identity {
    /// The key's short hash when keys are on (the request's client for fairness).
    pub key_client: Option<String>,
    /// Whether `X-Tandem-Client` may name the client.
    pub trust_client_header: bool,
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        !(self.api_keys.is_empty() && self.training_keys.is_empty() && self.admin_keys.is_empty())
    }

    /// Reads keys from `--api-key`-style values: each is a key, or `@PATH` for a file with one key
    /// per line (blank lines and `#` comments skipped).
    pub fn read_keys(values: &[String]) -> Result<Vec<String>, String> {
        let mut keys = Vec::new();
        for v in values {
            match v.strip_prefix('@') {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| format!("reading keys from {path}: {e}"))?;
                    keys.extend(
                        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from),
                    );
                }
                None => keys.push(v.trim().to_string()),
            }
        }
        if let Some(short) = keys.iter().find(|k| k.len() < 8) {
            return Err(format!("API keys need at least 8 characters (one has {})", short.len()));
        }
        Ok(keys)
    }

    /// Whether `key` may call routes of `scope`.
    fn allows(&self, key: &str, scope: Scope) -> bool {
        let any = |keys: &[String]| keys.iter().any(|k| same(k, key));
        let train = if self.training_keys.is_empty() { any(&self.api_keys) } else { any(&self.training_keys) };
        any(&self.admin_keys)
            || match scope {
                Scope::Public => true,
                Scope::Serve => any(&self.api_keys) || any(&self.training_keys),
                Scope::Train => train,
                Scope::Admin => self.admin_keys.is_empty() && train,
            }
    }
}

/// Compares in time independent of where the strings differ (no timing oracle on keys).
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A key's name in metrics and logs: a short hash (stable across restarts).
pub fn key_name(key: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    format!("key-{:08x}", h.finish() as u32)
}

/// The key a request carries: `Authorization: Bearer KEY`, else `X-API-Key: KEY`.
pub fn request_key(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = |name| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    value(header::AUTHORIZATION)
        .and_then(|v| v.strip_prefix("Bearer ").map(str::trim))
        .or_else(|| value(header::HeaderName::from_static("x-api-key")))
        .filter(|k| !k.is_empty())
        .map(String::from)
}

/// The middleware: refuses requests without a key that reaches the route (401 without a valid
/// key, 403 with a key that does not reach it) and records the request's identity.
pub async fn authorize(State(auth): State<Arc<AuthConfig>>, mut req: Request, next: Next) -> Response {
    let mut identity = Identity { key_client: None, trust_client_header: auth.trust_client_header || !auth.enabled() };
    if auth.enabled() {
        let scope = Scope::of(req.uri().path());
        let key = request_key(req.headers());
        if scope != Scope::Public {
            let Some(key) = key else {
                return ApiError::unauthorized("this server needs an API key: send `Authorization: Bearer KEY`")
                    .into_response();
            };
            let known = [&auth.api_keys, &auth.training_keys, &auth.admin_keys]
                .iter()
                .any(|ks| ks.iter().any(|k| same(k, &key)));
            if !known {
                return ApiError::unauthorized("the API key is not valid").into_response();
            }
            if !auth.allows(&key, scope) {
                return ApiError::forbidden(format!("this API key does not reach {scope:?} routes")).into_response();
            }
            identity.key_client = Some(key_name(&key));
        }
    }
    req.extensions_mut().insert(identity);
    next.run(req).await
}
