//! `GET /fibonacci?n=`: the answer, with caching headers that say it never changes.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use crate::{app::App, error::ApiError, input::parse_n};

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
    /// A non-negative decimal integer (digits only) from 0 to `MAX_N` (default 1000), given once.
    #[param(minimum = 0, maximum = 1000)]
    n: u64,
}

/// The strong validator of F(n)'s representation: it depends on n alone (and the format
/// version), so a conditional request is answered without looking anything up.
fn etag(n: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"fib-v1-{n}\"")).expect("ASCII")
}

/// Whether `If-None-Match` lists `etag` (weak comparison, as RFC 9110 prescribes for it).
fn matches_if_none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.as_bytes();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == ours)
}

/// Returns F(n).
#[utoipa::path(get, path = "/fibonacci", tag = "fibonacci", params(FibonacciQuery),
    responses(
        (status = 200, description = "F(n)", body = FibonacciResponse,
            headers(("ETag" = String), ("Cache-Control" = String), ("RateLimit-Limit" = u64),
                    ("RateLimit-Remaining" = u64), ("RateLimit-Reset" = u64), ("RateLimit-Policy" = String))),
        (status = 304, description = "Not modified: the client's cached copy (If-None-Match) is current",
            headers(("ETag" = String), ("Cache-Control" = String), ("RateLimit-Limit" = u64),
                    ("RateLimit-Remaining" = u64), ("RateLimit-Reset" = u64), ("RateLimit-Policy" = String))),
        (status = 400, description = "n missing, repeated, not a plain non-negative integer, or above MAX_N", body = crate::routes::openapi::ErrorBody,
            headers(("RateLimit-Limit" = u64), ("RateLimit-Remaining" = u64), ("RateLimit-Reset" = u64), ("RateLimit-Policy" = String))),
        (status = 401, description = "JWT authentication is enabled (AUTH_JWT_*) and the bearer token is missing or invalid",
            body = crate::routes::openapi::ErrorBody, headers(("WWW-Authenticate" = String))),
        (status = 405, description = "Method other than GET or HEAD", body = crate::routes::openapi::ErrorBody),
        (status = 429, description = "Over a rate limit; see Retry-After", body = crate::routes::openapi::ErrorBody,
            headers(("Retry-After" = u64, description = "Whole seconds (at least 1) after which a retry is allowed"),
                    ("RateLimit-Limit" = u64), ("RateLimit-Remaining" = u64), ("RateLimit-Reset" = u64), ("RateLimit-Policy" = String))),
        (status = 503, description = "Overloaded, timed out, or (AUTH_JWT_JWKS_URL) the signing keys not loaded yet; see Retry-After", body = crate::routes::openapi::ErrorBody,
            headers(("Retry-After" = u64))),
    ))]
pub async fn fibonacci(State(app): State<Arc<App>>, req: Request) -> Result<Response, ApiError> {
    let n = parse_n(req.uri().query(), app.config.max_n)?;
    let etag = etag(n);
    let cache_headers = [
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, CACHE_CONTROL),
    ];
    if matches_if_none_match(req.headers(), &etag) {
        return Ok((StatusCode::NOT_MODIFIED, cache_headers).into_response());
    }
    let body = app.store.get(n).await?;
    Ok((
        cache_headers,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_forms() {
        let ours = etag(10);
        let cases = [
            ("\"fib-v1-10\"", true, "exact"),
            ("W/\"fib-v1-10\"", true, "weak form of ours"),
            ("\"x\", \"fib-v1-10\"", true, "in a list"),
            ("*", true, "any"),
            ("\"fib-v1-11\"", false, "another n"),
            ("fib-v1-10", false, "unquoted is not our tag"),
        ];
        for (value, expected, why) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static(value));
            assert_eq!(matches_if_none_match(&headers, &ours), expected, "{why}");
        }
    }
}
