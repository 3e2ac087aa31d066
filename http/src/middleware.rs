//! Request middleware every listener shares, whatever routes it serves:
//!
//! - [`request_context`]: gives the request an id, and makes every error
//!   response JSON through [`ApiError`] (the one mapping), whoever produced
//!   it: a handler, an extractor's rejection, the router's 405, or a
//!   tower-http layer's 413 or 415.
//! - [`body_deadline`]: the whole request body must arrive within a time
//!   limit, counted from the end of the headers; a body still arriving after
//!   it makes the handler's read fail with [`BodyTimeout`] (answered 408).
//! - [`normalise_content_encoding`]: `Content-Encoding` names are
//!   case-insensitive (RFC 9110), so `GZIP` is `gzip`, and `identity` means
//!   no encoding at all.
//! - [`wire_limit`]: a cap on the body as sent, before decompression, so a
//!   compressed body that inflates to little (empty deflate blocks) cannot
//!   stream forever; the services cap the decompressed size themselves.
//! - [`panic_response`]: what a panicking handler answers (500, request id).

use std::any::Any;
use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tracing::Instrument;

use crate::ApiError;
use crate::request::RequestId;

/// The response header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The most of a non-JSON error body read to become the JSON message; the
/// rejections of axum and tower-http are one short line.
const MAX_REJECTION_TEXT: usize = 1_024;

/// Middleware: a fresh request id for the request (in its extensions, its
/// tracing span and the `x-request-id` response header), and a JSON body
/// for every error response that does not have one yet.
pub async fn request_context(mut req: Request, next: Next) -> Response {
    let id = RequestId::generate();
    req.extensions_mut().insert(id.clone());
    let span = tracing::info_span!("request", request_id = %id);
    let header_value = HeaderValue::from_str(id.as_str()).expect("a request id is ascii");
    let mut resp = RequestId::scoped(
        id.as_str().to_owned(),
        async move {
            let resp = next.run(req).await;
            if is_error_without_json(&resp) {
                as_api_error(resp).await
            } else {
                resp
            }
        }
        .instrument(span),
    )
    .await;
    resp.headers_mut().insert(REQUEST_ID_HEADER, header_value);
    resp
}

fn is_error_without_json(resp: &Response) -> bool {
    let status = resp.status();
    (status.is_client_error() || status.is_server_error())
        && !resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"))
}

/// Rebuilds an error response as an [`ApiError`], keeping its headers
/// (`Allow` of a 405, `Accept-Encoding` of a 415).
async fn as_api_error(resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, MAX_REJECTION_TEXT).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    };
    let mut rebuilt = ApiError::from_status(parts.status, text).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE
            && name != header::CONTENT_LENGTH
            && !rebuilt.headers().contains_key(name)
        {
            rebuilt.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rebuilt
}

/// The answer of a handler that panicked, for tower-http's `CatchPanicLayer`:
/// a 500 with the request id; the panic message goes only to the log.
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a handler panicked");
    ApiError::Internal(format!("panic: {detail}")).into_response()
}

/// Middleware: `Content-Encoding` compared case-insensitively, `x-gzip` as
/// `gzip`, and `identity` (no encoding) dropped, before the decompression
/// layer, which only knows lower-case names.
pub async fn normalise_content_encoding(mut req: Request, next: Next) -> Response {
    if let Some(value) = req.headers().get(header::CONTENT_ENCODING) {
        let name = String::from_utf8_lossy(value.as_bytes())
            .trim()
            .to_ascii_lowercase();
        match name.as_str() {
            "" | "identity" => {
                req.headers_mut().remove(header::CONTENT_ENCODING);
            }
            "x-gzip" | "gzip" => {
                req.headers_mut()
                    .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            _ => {
                if let Ok(v) = HeaderValue::from_str(&name) {
                    req.headers_mut().insert(header::CONTENT_ENCODING, v);
                }
            }
        }
    }
    next.run(req).await
}

/// Middleware: the request body must arrive within `timeout` from now (the
/// end of the headers). Reading it later fails with [`BodyTimeout`].
pub async fn body_deadline(State(timeout): State<Duration>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let body = Body::new(DeadlineBody {
        inner: body,
        sleep: Box::pin(tokio::time::sleep(timeout)),
        timeout,
    });
    next.run(Request::from_parts(parts, body)).await
}

/// Middleware: the body as sent may hold at most `limit` bytes. A body
/// declared longer fails its first read with [`WireLimitExceeded`], before
/// a byte is read; any other fails once past `limit` bytes (with
/// `http_body_util::LengthLimitError`). The handler that reads the body
/// answers either with 413, from inside its routes' layers (CORS), so a
/// browser can read the answer.
pub async fn wire_limit(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (parts, body) = req.into_parts();
    let body = if declared.is_some_and(|n| n > limit as u64) {
        Body::new(Refused(Some(WireLimitExceeded(limit))))
    } else {
        Body::new(http_body_util::Limited::new(body, limit))
    };
    next.run(Request::from_parts(parts, body)).await
}

/// A body declared longer than the limit on the body as sent.
#[derive(Debug, thiserror::Error)]
#[error("body is larger than the limit of {0} bytes as sent")]
pub struct WireLimitExceeded(pub usize);

/// A body that fails at once, unread.
struct Refused(Option<WireLimitExceeded>);

impl HttpBody for Refused {
    type Data = Bytes;
    type Error = WireLimitExceeded;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take().map(Err))
    }
}

/// The request body did not arrive within the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(pub Duration);

impl BodyTimeout {
    /// The [`BodyTimeout`] somewhere in `error`'s chain, if any: the
    /// decompression and length-limit layers wrap it.
    pub fn find<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a BodyTimeout> {
        find_in_chain(error)
    }
}

/// The first error of type `E` in `error`'s chain (looking inside
/// `io::Error`s too, which hide their payload from `source()`).
pub fn find_in_chain<'a, E: StdError + 'static>(
    error: &'a (dyn StdError + 'static),
) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        if let Some(found) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| find_in_chain::<E>(inner))
        {
            return Some(found);
        }
        next = e.source();
    }
    None
}

struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // What has arrived is served even at the deadline.
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(self.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn a_body_still_arriving_at_the_deadline_fails_with_body_timeout() {
        let never = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
        let body = DeadlineBody {
            inner: Body::from_stream(never),
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(30))),
            timeout: Duration::from_secs(30),
        };
        let err = body.collect().await.unwrap_err();
        assert!(BodyTimeout::find(&*err).is_some(), "{err}");
    }

    #[tokio::test]
    async fn a_panic_answers_500_without_its_message() {
        let resp = panic_response(Box::new("index out of range near suffix[..8]"));
        assert_eq!(resp.status(), 500);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("suffix") && text.contains("request_id"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_arrived_is_read_whole() {
        let body = DeadlineBody {
            inner: Body::from("{}"),
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(30))),
            timeout: Duration::from_secs(30),
        };
        assert_eq!(body.collect().await.unwrap().to_bytes(), "{}");
    }
}
