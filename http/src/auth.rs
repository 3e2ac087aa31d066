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

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Mutex, RwLock};
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
/// time. Only known credentials are kept; the cache is emptied when it
/// reaches `max` entries of a kind. An entry older than `ttl` is still
/// honoured while one background lookup refreshes it ([`Refreshing`]), so a
/// request never waits on the directory for a credential it has seen, even
/// while a store node restarts or the store is down; a credential removed
/// from the directory stops working within `ttl` plus one lookup.
pub struct CredentialCache {
    writes: Arc<Refreshing<WriteGrant>>,
    reads: Arc<Refreshing<ReadGrant>>,
}

/// A cache of directory answers by key, refreshed ahead: a value older than
/// `ttl` is served as it is while a background task, at most one per key,
/// reads it again. A read that finds the key gone removes it; a read that
/// fails keeps the value for another `ttl` (the directory is down, and the
/// last answer is the best one). Only a key never seen waits for the
/// directory.
struct Refreshing<V> {
    entries: RwLock<HashMap<String, (V, Instant)>>,
    refreshing: Mutex<HashSet<String>>,
    ttl: Duration,
    max: usize,
}

/// What [`Refreshing::get`] found.
enum Found<V> {
    Fresh(V),
    Stale(V),
    Missing,
}

impl<V: Clone + Send + Sync + 'static> Refreshing<V> {
    fn new(ttl: Duration, max: usize) -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            refreshing: Mutex::new(HashSet::new()),
            ttl,
            max,
        }
    }

    fn get(&self, key: &str) -> Found<V> {
        let entries = self.entries.read().expect("refreshing cache lock");
        match entries.get(key) {
            Some((v, at)) if at.elapsed() < self.ttl => Found::Fresh(v.clone()),
            Some((v, _)) => Found::Stale(v.clone()),
            None => Found::Missing,
        }
    }

    fn put(&self, key: &str, value: V) {
        let mut entries = self.entries.write().expect("refreshing cache lock");
        if entries.len() >= self.max && !entries.contains_key(key) {
            entries.clear();
        }
        entries.insert(key.to_owned(), (value, Instant::now()));
    }

    fn remove(&self, key: &str) {
        self.entries
            .write()
            .expect("refreshing cache lock")
            .remove(key);
    }

    /// The value of `key`: a cached one at once (refreshing it in the
    /// background when stale), else `fetch`'s answer, cached when found.
    async fn get_or_fetch<F>(
        self: &Arc<Self>,
        key: &str,
        fetch: impl FnOnce() -> F,
    ) -> trailmark_store::Result<Option<V>>
    where
        F: Future<Output = trailmark_store::Result<Option<V>>> + Send + 'static,
    {
        match self.get(key) {
            Found::Fresh(v) => Ok(Some(v)),
            Found::Stale(v) => {
                self.refresh(key, v.clone(), fetch());
                Ok(Some(v))
            }
            Found::Missing => {
                let found = fetch().await?;
                if let Some(v) = &found {
                    self.put(key, v.clone());
                }
                Ok(found)
            }
        }
    }

    /// Starts one background read of `key`, unless one is running.
    fn refresh<F>(self: &Arc<Self>, key: &str, stale: V, fetch: F)
    where
        F: Future<Output = trailmark_store::Result<Option<V>>> + Send + 'static,
    {
        if !self
            .refreshing
            .lock()
            .expect("refreshing set lock")
            .insert(key.to_owned())
        {
            return;
        }
        let (cache, key) = (self.clone(), key.to_owned());
        tokio::spawn(async move {
            match fetch.await {
                Ok(Some(v)) => cache.put(&key, v),
                Ok(None) => cache.remove(&key),
                Err(e) => {
                    tracing::warn!(error = %e, "directory unavailable; keeping the last answer");
                    cache.put(&key, stale);
                }
            }
            cache
                .refreshing
                .lock()
                .expect("refreshing set lock")
                .remove(&key);
        });
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
            writes: Arc::new(Refreshing::new(ttl, max)),
            reads: Arc::new(Refreshing::new(ttl, max)),
        }
    }
}

/// Resolves a write key to its grant, or 401.
pub async fn authorize_write(state: &AppState, key: Option<&str>) -> Result<WriteGrant, ApiError> {
    let Some(key) = key else {
        return Err(ApiError::Unauthorized(
            "a write key is required: basic auth, ?writeKey= or a writeKey field".into(),
        ));
    };
    // The closure runs only for a stale or unknown key, so a fresh one
    // costs no clone.
    state
        .credentials
        .writes
        .get_or_fetch(key, || {
            let (directory, key) = (state.directory.clone(), key.to_owned());
            async move { directory.resolve_write_key(&key).await }
        })
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
        let grant = state
            .credentials
            .reads
            .get_or_fetch(&token, || {
                let (directory, token) = (state.directory.clone(), token.clone());
                async move { directory.resolve_token(&token).await }
            })
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

/// Workspaces' identity rules as ingest applies them (blocked values), read
/// again in the background once older than [`RULES_TTL`]: a change applies
/// to new events within that long (plus one read). While the directory
/// cannot answer, the last rules read (or the defaults, for a workspace
/// never read) stay in force, so ingest keeps accepting.
pub struct RulesCache(Arc<Refreshing<Arc<Rules>>>);

impl Default for RulesCache {
    fn default() -> Self {
        Self(Arc::new(Refreshing::new(RULES_TTL, 10_000)))
    }
}

/// How long ingest trusts the identity rules it read.
pub const RULES_TTL: Duration = Duration::from_secs(10);

impl RulesCache {
    /// The rules of `workspace`.
    pub async fn get(
        &self,
        directory: &Arc<dyn WorkspaceDirectory>,
        workspace: &str,
    ) -> Arc<Rules> {
        let fetch = || {
            let (directory, workspace) = (directory.clone(), workspace.to_owned());
            async move {
                let settings = directory.identity_rules(&workspace).await?;
                let rules = settings
                    .map(|s| Rules::from_settings(&s).unwrap_or_default())
                    .unwrap_or_default();
                Ok(Some(Arc::new(rules)))
            }
        };
        match self.0.get_or_fetch(workspace, fetch).await {
            Ok(Some(rules)) => rules,
            Ok(None) => Arc::new(Rules::default()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read identity rules; using the defaults");
                Arc::new(Rules::default())
            }
        }
    }

    /// Forgets a workspace's rules, after this process changed them.
    pub fn forget(&self, workspace: &str) {
        self.0.remove(workspace);
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

    /// Waits until `key`'s background refresh has finished.
    async fn settled<V: Clone + Send + Sync + 'static>(cache: &Refreshing<V>, key: &str) {
        while cache.refreshing.lock().unwrap().contains(key) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn the_cache_refreshes_ahead_and_never_waits_for_a_known_key() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use trailmark_store::StoreError;
        let ttl = Duration::from_millis(30);
        let cache = Arc::new(Refreshing::<u32>::new(ttl, 2));
        let got = |r: trailmark_store::Result<Option<u32>>| r.ok().flatten();
        // Unknown: waits for the directory, and caches what it found.
        assert_eq!(
            got(cache.get_or_fetch("a", || async { Ok(Some(1)) }).await),
            Some(1)
        );
        assert_eq!(
            got(cache
                .get_or_fetch("a", || async { unreachable!("fresh") })
                .await),
            Some(1)
        );
        // Stale: answered at once, even by a directory that hangs, with one
        // refresh however many ask.
        tokio::time::sleep(ttl + Duration::from_millis(10)).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        for _ in 0..5 {
            let calls = calls.clone();
            let v = cache
                .get_or_fetch("a", || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(Some(2))
                })
                .await;
            assert_eq!(got(v), Some(1));
        }
        assert!(started.elapsed() < Duration::from_millis(100));
        settled(&cache, "a").await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one refresh at a time");
        assert!(matches!(cache.get("a"), Found::Fresh(2)));
        // A failed refresh keeps the last answer for another period.
        tokio::time::sleep(ttl + Duration::from_millis(10)).await;
        let v = cache
            .get_or_fetch("a", || async {
                Err(StoreError::Unavailable("down".into()))
            })
            .await;
        assert_eq!(got(v), Some(2));
        settled(&cache, "a").await;
        assert!(matches!(cache.get("a"), Found::Fresh(2)));
        // A refresh that finds the key gone removes it.
        tokio::time::sleep(ttl + Duration::from_millis(10)).await;
        assert_eq!(
            got(cache.get_or_fetch("a", || async { Ok(None) }).await),
            Some(2)
        );
        settled(&cache, "a").await;
        assert!(matches!(cache.get("a"), Found::Missing));
        assert_eq!(
            got(cache.get_or_fetch("a", || async { Ok(None) }).await),
            None
        );
        // Bounded: a third key empties the cache first.
        for (k, v) in [("a", 1), ("b", 2), ("c", 3)] {
            cache.put(k, v);
        }
        assert!(
            matches!(cache.get("a"), Found::Missing),
            "emptied when full"
        );
        assert!(matches!(cache.get("c"), Found::Fresh(3)));
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
