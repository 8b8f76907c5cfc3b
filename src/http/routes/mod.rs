//! The endpoints, each declared once: `routes!` takes a handler's `#[utoipa::path]` and
//! gives the router its route and the OpenAPI document its path; the metric labels are
//! read from that document (see `http::router`), so no list of routes is kept by hand.

pub mod fibonacci;
pub mod openapi;
pub mod probes;

use utoipa::OpenApi;
use utoipa_axum::{
    router::{OpenApiRouter, UtoipaMethodRouter},
    routes,
};

use super::router::HttpState;

/// The routes of one listener, and which of them pass through admission.
pub struct Routes {
    pub router: OpenApiRouter<HttpState>,
    /// Paths (templates) behind the admission layer: shedding, authentication, limits.
    pub admitted: Vec<String>,
}

impl Routes {
    fn new(doc: utoipa::openapi::OpenApi) -> Self {
        Self {
            router: OpenApiRouter::with_openapi(doc),
            admitted: Vec::new(),
        }
    }

    /// A route open to everyone, never limited.
    fn open(mut self, route: UtoipaMethodRouter<HttpState>) -> Self {
        self.router = self.router.routes(route);
        self
    }

    /// A route behind admission (applied once around the router, not boxed per route).
    fn admitted(mut self, route: UtoipaMethodRouter<HttpState>) -> Self {
        self.admitted.extend(route.1.paths.keys().cloned());
        self.open(route)
    }
}

/// The public API: `/fibonacci` behind admission, `/health` and the document beside it.
pub fn public() -> Routes {
    Routes::new(openapi::ApiDoc::openapi())
        .admitted(routes!(fibonacci::fibonacci))
        .open(routes!(probes::health))
        .open(routes!(openapi::openapi_json))
}

/// Probes and metrics: on the admin port when there is one, else beside the API.
pub fn admin() -> Routes {
    Routes::new(utoipa::openapi::OpenApi::default())
        .open(routes!(probes::livez))
        .open(routes!(probes::readyz))
        .open(routes!(probes::metrics))
}
