//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers' annotations
//! as the routes are declared, rendered once per router.

use axum::{extract::State, http::header, response::IntoResponse};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::http::router::HttpState;

/// Every error body.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": "query parameter 'n' must be at most 1000; got 5000"}))]
pub struct ErrorBody {
    /// What is wrong and what is allowed.
    pub error: String,
}

/// The document's frame: its title and the shared schemas; the paths come from the
/// routes themselves (`routes::public`, `routes::admin`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "fibonacci-api",
        description = "Returns the nth Fibonacci number, exactly: `GET /fibonacci?n=10` answers \
`{\"n\":10,\"fibonacci\":55}`, the value a JSON integer of any size.\n\n\
**On this page.** Its response viewer is JavaScript, which rounds integers above 2^53: \
from n = 79 on, the body shown here has wrong last digits (F(1000) even turns into a float). \
The service sends every digit: run the curl command the page shows. The page also checks n \
before sending it (an integer from 0 to MAX_N), so the server's own 400 for bad input is only \
seen with curl. With JWT authentication on (`AUTH_JWT_*`), give a token with Authorize first.\n\n\
**Rate limits.** Each client (IP address, an IPv6 /64) has windows, by default 30 requests a \
minute, 50 an hour and 200 a day; every `/fibonacci` answer carries `RateLimit-Limit`, \
`-Remaining`, `-Reset` (seconds until Remaining next grows if no request comes: with \
sliding windows that can be longer than the window) and `-Policy`; past a limit the answer is 429 with \
`Retry-After`. The probes, `/metrics`, `/openapi.json` and this page are never limited.\n\n\
**Caching.** An answer never changes: `Cache-Control: public, max-age=31536000, immutable` \
and `ETag: \"fib-v1-{n}\"`; a request with a matching `If-None-Match` gets 304. Your browser \
may answer a repeated Execute from its own cache (same `x-request-id`, same remaining count): \
change n to reach the server.\n\n\
**Operations.** Every response carries `X-Request-Id` (yours if sane, else a new one), also in \
the service's logs and traces. With `ADMIN_LISTEN_ADDR` set, `/livez`, `/readyz` and \
`/metrics` are on that port only."
    ),
    components(schemas(ErrorBody, super::fibonacci::FibonacciResponse, super::probes::Status))
)]
pub struct ApiDoc;

/// The document as JSON text, with this instance's `MAX_N` as the bound of `n`, and, when
/// it requires JWTs, their bearer scheme on `/fibonacci` (so /docs offers "Authorize" and
/// Try it out can send a token).
pub fn render(doc: &utoipa::openapi::OpenApi, max_n: u64, bearer_auth: bool) -> String {
    let mut doc = serde_json::to_value(doc).expect("the document serializes");
    if let Some(schema) = doc.pointer_mut("/paths/~1fibonacci/get/parameters/0/schema") {
        schema["maximum"] = max_n.into();
    }
    if bearer_auth {
        doc["components"]["securitySchemes"]["bearer"] = serde_json::json!({
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
        });
        if let Some(operation) = doc.pointer_mut("/paths/~1fibonacci/get") {
            operation["security"] = serde_json::json!([{"bearer": []}]);
        }
    }
    serde_json::to_string_pretty(&doc).expect("the document serializes")
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json", body = Object)))]
pub async fn openapi_json(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.clone(),
    )
}
