//! The endpoints, each declared once: `routes!` takes a handler's `#[utoipa::path]` and
//! gives the router its route and the OpenAPI document its path; the metric labels are
//! read from that document (see `http::router`), so no list of routes is kept by hand.

pub mod fibonacci;
pub mod openapi;
pub mod probes;

use std::sync::Arc;

use utoipa::OpenApi;
use utoipa_axum::{
    router::{OpenApiRouter, UtoipaMethodRouterExt},
    routes,
};

use super::{admit::AdmitLayer, router::HttpState};
use crate::state::App;

/// The public API: `/fibonacci` behind admission (load shedding, authentication, the
/// rate limits), `/health` and the document beside it, never limited.
pub fn public(app: &Arc<App>) -> OpenApiRouter<HttpState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(fibonacci::fibonacci).layer(AdmitLayer::new(app)))
        .routes(routes!(probes::health))
        .routes(routes!(openapi::openapi_json))
}

/// Probes and metrics: on the admin port when there is one, else beside the API.
pub fn admin() -> OpenApiRouter<HttpState> {
    OpenApiRouter::new()
        .routes(routes!(probes::livez))
        .routes(routes!(probes::readyz))
        .routes(routes!(probes::metrics))
}
