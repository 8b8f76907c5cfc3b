//! `GET /fibonacci?n=`: the answer, with caching headers that say it never changes.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    response::Response,
};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use super::matches_if_none_match;
use crate::{cache::etag, http::error::ApiError, input::parse_n, state::App};

/// A year, the longest max-age caches honour; `immutable` tells browsers not to revalidate.
const CACHE_CONTROL: HeaderValue = HeaderValue::from_static("public, max-age=31536000, immutable");

/// The answer for n. `fibonacci` is an exact JSON integer of any size.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"n": 10, "fibonacci": 55}))]
pub struct FibonacciResponse {
    /// The requested index.
    pub n: u64,
    /// F(n), exactly: F(1000) has 209 digits. Parse it with an arbitrary-precision reader.
    #[schema(schema_with = big_integer)]
    pub fibonacci: u64,
}

/// An integer of any size: no `format`, which would claim 64 bits.
fn big_integer() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Integer)
        .minimum(Some(0))
        .description(Some("F(n), exactly, as a JSON integer of any size"))
        .build()
}

/// Query parameters of `/fibonacci`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct FibonacciQuery {
    /// A non-negative decimal integer (digits only) from 0 to `MAX_N` (default 1000), given
    /// once. This page checks it before sending; curl shows the server's 400 for bad input.
    #[param(minimum = 0, maximum = 1000)]
    n: u64,
}

/// Returns F(n).
///
/// Exactly, as a JSON integer of any size (F(1000) has 209 digits). This page's viewer
/// rounds integers above 2^53 (n ≥ 79): the curl command it shows gets every digit.
#[utoipa::path(get, path = "/fibonacci", tag = "fibonacci", params(FibonacciQuery),
    responses(
        (status = 200, description = "F(n)", body = FibonacciResponse,
            headers(("ETag" = String, description = "\"fib-v1-{n}\": known from n alone; send it back in If-None-Match for a 304"),
                    ("Cache-Control" = String, description = "public, max-age=31536000, immutable: an answer never changes"),
                    ("RateLimit-Limit" = u64, description = "Quota of the tightest window (absent with RATE_LIMITS=off)"),
                    ("RateLimit-Remaining" = u64, description = "Requests left in that window"),
                    ("RateLimit-Reset" = u64, description = "Seconds until Remaining next grows if no request comes (sliding windows: can be longer than the window)"),
                    ("RateLimit-Policy" = String, description = "Every window: quota;w=seconds, e.g. 30;w=60,50;w=3600,200;w=86400"))),
        (status = 304, description = "Not modified: the client's cached copy (If-None-Match) is current",
            headers(("ETag" = String), ("Cache-Control" = String), ("RateLimit-Limit" = u64),
                    ("RateLimit-Remaining" = u64), ("RateLimit-Reset" = u64), ("RateLimit-Policy" = String))),
        (status = 400, description = "n missing, repeated, not a plain non-negative integer, or above MAX_N", body = crate::http::routes::openapi::ErrorBody,
            headers(("RateLimit-Limit" = u64), ("RateLimit-Remaining" = u64), ("RateLimit-Reset" = u64), ("RateLimit-Policy" = String)),
            example = json!({"error": "query parameter 'n' must be at most 1000; got 5000"})),
        (status = 401, description = "JWT authentication is enabled (AUTH_JWT_*) and the bearer token is missing or invalid",
            body = crate::http::routes::openapi::ErrorBody, headers(("WWW-Authenticate" = String)),
            example = json!({"error": "unauthorized: missing bearer token: send Authorization: Bearer <JWT>"})),
        (status = 405, description = "Method other than GET or HEAD", body = crate::http::routes::openapi::ErrorBody,
            example = json!({"error": "method not allowed: this endpoint answers GET and HEAD"})),
        (status = 429, description = "Over a rate limit; see Retry-After", body = crate::http::routes::openapi::ErrorBody,
            headers(("Retry-After" = u64, description = "Whole seconds (at least 1) after which a retry is allowed"),
                    ("RateLimit-Limit" = u64), ("RateLimit-Remaining" = u64), ("RateLimit-Reset" = u64), ("RateLimit-Policy" = String)),
            example = json!({"error": "rate limit exceeded: 30 requests per minute; retry in 52 s"})),
        (status = 503, description = "Overloaded, timed out, or (AUTH_JWT_JWKS_URL) the signing keys not loaded yet; see Retry-After", body = crate::http::routes::openapi::ErrorBody,
            headers(("Retry-After" = u64)), example = json!({"error": "the service is at capacity: retry shortly"})),
    ))]
pub async fn fibonacci(State(app): State<Arc<App>>, req: Request) -> Result<Response, ApiError> {
    let n = parse_n(req.uri().query(), app.config.max_n)?;
    if req.headers().contains_key(header::IF_NONE_MATCH) {
        // The tag depends on n alone: a conditional request is answered with no lookup.
        let etag = HeaderValue::try_from(etag(n)).expect("ASCII");
        if matches_if_none_match(req.headers(), &etag) {
            return Ok(answer(StatusCode::NOT_MODIFIED, Body::empty(), etag, false));
        }
    }
    let answer_of_n = app.store.get(n).await?;
    let etag = HeaderValue::from_maybe_shared(answer_of_n.etag).expect("ASCII");
    Ok(answer(
        StatusCode::OK,
        Body::from(answer_of_n.body),
        etag,
        true,
    ))
}

/// A response with the caching headers, its header map sized once for every header the
/// layers add too: these three, `content-length`, four rate-limit headers, three security
/// headers and the request id (twelve, what a map of 16 slots holds without growing).
fn answer(status: StatusCode, body: Body, etag: HeaderValue, json: bool) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.reserve(12);
    if json {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    headers.insert(header::ETAG, etag);
    headers.insert(header::CACHE_CONTROL, CACHE_CONTROL);
    response
}
