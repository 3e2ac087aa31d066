//! The id of the request being served: generated per request (never taken
//! from the client), returned in the `x-request-id` header and in the body of
//! a 500 or 503, and attached to the log lines of its error.

use std::fmt;
use std::future::Future;

tokio::task_local! {
    static REQUEST_ID: RequestId;
}

/// A request id, also in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// A fresh id (a UUIDv7 in hex: sortable by time).
    pub fn generate() -> Self {
        RequestId(uuid::Uuid::now_v7().simple().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Runs `fut` with this id as the current one.
    pub async fn scoped<F: Future>(id: String, fut: F) -> F::Output {
        REQUEST_ID.scope(RequestId(id), fut).await
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of the request being served, or a fresh one outside a request (an
/// error built by a test or a background task still gets an id to log).
pub fn current_request_id() -> RequestId {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| RequestId::generate())
}
