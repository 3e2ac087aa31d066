//! Credentials.
//!
//! - A **write key** identifies a source and can only append events. It comes
//!   as `Authorization: Basic base64(writeKey + ":")`, a `?writeKey=` query
//!   parameter, or a `writeKey` body field (for `navigator.sendBeacon`, which
//!   cannot set headers). It is public by design: it ships in web pages.
//! - A **secret token** reads a workspace. It comes as `Authorization: Bearer
//!   <token>` or as the Basic user name. A write key offered where a token is
//!   needed is refused with 403, an unknown one with 401. The token a
//!   workspace is created with is an **admin** token ([`Admin`]): it also
//!   changes identity rules, merges and splits profiles, and creates
//!   read-only tokens, which get 403 there.
//!
//! The workspace always comes from the credential, never from the payload.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::sync::Arc;

use trailmark_domain::identity::Rules;
use trailmark_store::{ReadGrant, Scope, WorkspaceDirectory, WriteGrant};

use crate::{ApiError, AppState};

/// The credential in an `Authorization` header: the Bearer token, or the user
/// name of Basic credentials.
pub fn credential_from_headers(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_owned()).filter(|t| !t.is_empty());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD.decode(rest).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
        return Some(user.to_owned()).filter(|u| !u.is_empty());
    }
    None
}

/// The `writeKey` query parameter, if any.
pub fn write_key_from_query(query: Option<&str>) -> Option<String> {
    let query = query?;
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("writeKey=") {
            return Some(percent_decode(v)).filter(|k| !k.is_empty());
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Recently resolved credentials, so that the hot paths (every ingest
/// request, every profile read) do not hash and look up the same key each
/// time. Only known credentials are kept, each for at most `ttl`, so a
/// credential removed from the directory stops working within `ttl`; the
/// cache is emptied when it reaches `max` entries. While the directory is
/// unavailable (a store outage), an expired entry is still honoured, so ingest
/// keeps accepting events from known sources into the log.
pub struct CredentialCache {
    writes: Cache<WriteGrant>,
    reads: Cache<ReadGrant>,
}

struct Cache<G> {
    entries: RwLock<HashMap<String, (G, Instant)>>,
    ttl: Duration,
    max: usize,
}

impl<G: Clone> Cache<G> {
    fn new(ttl: Duration, max: usize) -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            ttl,
            max,
        }
    }

    fn get(&self, key: &str) -> Option<G> {
        let entries = self.entries.read().expect("credential cache lock");
        entries
            .get(key)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(g, _)| g.clone())
    }

    /// The entry whatever its age: for when the directory cannot answer.
    fn get_stale(&self, key: &str) -> Option<G> {
        let entries = self.entries.read().expect("credential cache lock");
        entries.get(key).map(|(g, _)| g.clone())
    }

    fn put(&self, key: &str, grant: G) {
        let mut entries = self.entries.write().expect("credential cache lock");
        if entries.len() >= self.max {
            entries.clear();
        }
        entries.insert(key.to_owned(), (grant, Instant::now()));
    }
}

impl Default for CredentialCache {
    fn default() -> Self {
        Self::new(Duration::from_secs(60), 10_000)
    }
}

impl CredentialCache {
    /// A cache keeping each credential for `ttl`, up to `max` of each kind.
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            writes: Cache::new(ttl, max),
            reads: Cache::new(ttl, max),
        }
    }
}

async fn cached<G, F>(cache: &Cache<G>, key: &str, lookup: F) -> Result<Option<G>, ApiError>
where
    G: Clone + Eq + Hash,
    F: std::future::Future<Output = trailmark_store::Result<Option<G>>>,
{
    if let Some(g) = cache.get(key) {
        return Ok(Some(g));
    }
    let found = match lookup.await {
        Ok(found) => found,
        Err(e) if e.is_retryable() => match cache.get_stale(key) {
            Some(g) => {
                tracing::warn!(error = %e, "directory unavailable; using a cached credential");
                // Trust it for another period rather than make every request
                // wait for the directory's timeout first.
                cache.put(key, g.clone());
                return Ok(Some(g));
            }
            None => return Err(e.into()),
        },
        Err(e) => return Err(e.into()),
    };
    if let Some(g) = &found {
        cache.put(key, g.clone());
    }
    Ok(found)
}

/// Resolves a write key to its grant, or 401.
pub async fn authorize_write(state: &AppState, key: Option<&str>) -> Result<WriteGrant, ApiError> {
    let Some(key) = key else {
        return Err(ApiError::Unauthorized(
            "a write key is required: basic auth, ?writeKey= or a writeKey field".into(),
        ));
    };
    cached(
        &state.credentials.writes,
        key,
        state.directory.resolve_write_key(key),
    )
    .await?
    .ok_or_else(|| ApiError::Unauthorized("unknown write key".into()))
}

/// An authenticated reader of one workspace. Extracting it checks the token.
#[derive(Debug, Clone)]
pub struct Reader(pub ReadGrant);

impl FromRequestParts<AppState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(token) = credential_from_headers(&parts.headers) else {
            return Err(ApiError::Unauthorized(
                "a secret token is required: bearer or basic auth".into(),
            ));
        };
        let grant = cached(
            &state.credentials.reads,
            &token,
            state.directory.resolve_token(&token),
        )
        .await?;
        if let Some(grant) = grant {
            return Ok(Reader(grant));
        }
        if state.directory.resolve_write_key(&token).await?.is_some() {
            return Err(ApiError::Forbidden(
                "write keys can only write; use the workspace's secret token".into(),
            ));
        }
        Err(ApiError::Unauthorized("unknown token".into()))
    }
}

/// An administrator of one workspace: a secret token of [`Scope::Admin`].
/// A read-only token or a write key gets 403.
#[derive(Debug, Clone)]
pub struct Admin(pub ReadGrant);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Reader(grant) = Reader::from_request_parts(parts, state).await?;
        match grant.scope {
            Scope::Admin => Ok(Admin(grant)),
            Scope::Read => Err(ApiError::Forbidden(
                "this token can only read; administration needs the workspace's admin token".into(),
            )),
        }
    }
}

/// Workspaces' identity rules as ingest applies them (blocked values), each
/// read from the directory at most every [`RULES_TTL`]: a change applies to
/// new events within that long. While the directory cannot answer, the last
/// rules read (or the defaults) stay in force, so ingest keeps accepting.
#[derive(Default)]
pub struct RulesCache {
    entries: RwLock<HashMap<String, (Arc<Rules>, Instant)>>,
}

/// How long ingest trusts the identity rules it read.
pub const RULES_TTL: Duration = Duration::from_secs(10);

impl RulesCache {
    /// The rules of `workspace`.
    pub async fn get(&self, directory: &dyn WorkspaceDirectory, workspace: &str) -> Arc<Rules> {
        let cached = self
            .entries
            .read()
            .expect("rules cache lock")
            .get(workspace)
            .cloned();
        if let Some((r, at)) = &cached
            && at.elapsed() < RULES_TTL
        {
            return r.clone();
        }
        let rules = match directory.identity_rules(workspace).await {
            Ok(Some(s)) => Rules::from_settings(&s).unwrap_or_default(),
            Ok(None) => Rules::default(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read identity rules; keeping the last known");
                return cached.map_or_else(|| Arc::new(Rules::default()), |(r, _)| r);
            }
        };
        let rules = Arc::new(rules);
        let mut entries = self.entries.write().expect("rules cache lock");
        if entries.len() >= 10_000 {
            entries.clear();
        }
        entries.insert(workspace.to_owned(), (rules.clone(), Instant::now()));
        rules
    }

    /// Forgets a workspace's rules, after this process changed them.
    pub fn forget(&self, workspace: &str) {
        self.entries
            .write()
            .expect("rules cache lock")
            .remove(workspace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn reads_basic_and_bearer() {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic d2tfMTIzOg=="),
        );
        assert_eq!(credential_from_headers(&h).as_deref(), Some("wk_123"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer tmk_abc"));
        assert_eq!(credential_from_headers(&h).as_deref(), Some("tmk_abc"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(credential_from_headers(&h), None);
    }

    #[test]
    fn the_cache_forgets_after_its_ttl_and_when_full() {
        let cache: Cache<u32> = Cache::new(Duration::from_millis(30), 2);
        cache.put("a", 1);
        assert_eq!(cache.get("a"), Some(1));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get("a"), None, "expired");
        cache.put("a", 1);
        cache.put("b", 2);
        cache.put("c", 3);
        assert_eq!(cache.get("a"), None, "emptied when full");
        assert_eq!(cache.get("c"), Some(3));
    }

    #[test]
    fn reads_the_query_write_key() {
        assert_eq!(
            write_key_from_query(Some("a=1&writeKey=wk%5F1")).as_deref(),
            Some("wk_1")
        );
        assert_eq!(write_key_from_query(Some("writeKey=")), None);
        assert_eq!(write_key_from_query(None), None);
    }
}
