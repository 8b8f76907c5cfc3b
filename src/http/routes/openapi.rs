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
        description = "Returns the nth Fibonacci number, exactly."
    ),
    components(schemas(ErrorBody, super::fibonacci::FibonacciResponse, super::probes::Status))
)]
pub struct ApiDoc;

/// The document as JSON text, with this instance's `MAX_N` as the bound of `n`.
pub fn render(doc: &utoipa::openapi::OpenApi, max_n: u64) -> String {
    let mut doc = serde_json::to_value(doc).expect("the document serializes");
    if let Some(schema) = doc.pointer_mut("/paths/~1fibonacci/get/parameters/0/schema") {
        schema["maximum"] = max_n.into();
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
