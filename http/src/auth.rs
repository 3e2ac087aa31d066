//! Credentials.
//!
//! - A **write key** identifies a source and can only append events. It comes
//!   as `Authorization: Basic base64(writeKey + ":")`, a `?writeKey=` query
//!   parameter, or a `writeKey` body field (for `navigator.sendBeacon`, which
//!   cannot set headers). It is public by design: it ships in web pages.
//! - A **secret token** reads a workspace. It comes as `Authorization: Bearer
//!   <token>` or as the Basic user name. A write key offered where a token is
//!   needed is refused with 403, an unknown one with 401.
//!
//! The workspace always comes from the credential, never from the payload.

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use trailmark_store::{ReadGrant, WriteGrant};

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

/// Resolves a write key to its grant, or 401.
pub async fn authorize_write(state: &AppState, key: Option<&str>) -> Result<WriteGrant, ApiError> {
    let Some(key) = key else {
        return Err(ApiError::Unauthorized(
            "a write key is required: basic auth, ?writeKey= or a writeKey field".into(),
        ));
    };
    state
        .directory
        .resolve_write_key(key)
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
        if let Some(grant) = state.directory.resolve_token(&token).await? {
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
    fn reads_the_query_write_key() {
        assert_eq!(
            write_key_from_query(Some("a=1&writeKey=wk%5F1")).as_deref(),
            Some("wk_1")
        );
        assert_eq!(write_key_from_query(Some("writeKey=")), None);
        assert_eq!(write_key_from_query(None), None);
    }
}
