//! The endpoints, each declared once: `routes!` takes a handler's `#[utoipa::path]` and
//! gives the router its route and the OpenAPI document its path; the metric labels are
//! read from that document (see `http::router`), so no list of routes is kept by hand.

pub mod docs;
pub mod fibonacci;
pub mod openapi;
pub mod probes;

use axum::{
    http::{header, HeaderMap, HeaderValue},
    routing::{get, MethodRouter},
};
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
    /// Paths (templates) served but not part of the API's document: the docs page.
    pub pages: Vec<&'static str>,
}

impl Routes {
    fn new(doc: utoipa::openapi::OpenApi) -> Self {
        Self {
            router: OpenApiRouter::with_openapi(doc),
            admitted: Vec::new(),
            pages: Vec::new(),
        }
    }

    /// A page for people, not in the document and never limited.
    fn page(mut self, path: &'static str, route: MethodRouter<HttpState>) -> Self {
        self.router = self.router.route(path, route);
        self.pages.push(path);
        self
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

/// The public API: `/fibonacci` behind admission, `/health` and the document beside it,
/// and (`DOCS_ENABLED`) the document as an interactive page.
pub fn public(with_docs: bool) -> Routes {
    let routes = Routes::new(openapi::ApiDoc::openapi())
        .admitted(routes!(fibonacci::fibonacci))
        .open(routes!(probes::health))
        .open(routes!(openapi::openapi_json));
    if !with_docs {
        return routes;
    }
    routes
        .page("/docs", get(docs::page_handler))
        .page("/docs/", get(docs::slash_handler))
        .page("/docs/{version}/{file}", get(docs::file_handler))
}

/// Probes and metrics: on the admin port when there is one, else beside the API.
pub fn admin() -> Routes {
    Routes::new(utoipa::openapi::OpenApi::default())
        .open(routes!(probes::livez))
        .open(routes!(probes::readyz))
        .open(routes!(probes::metrics))
}

/// Whether `If-None-Match` lists `etag` (weak comparison, as RFC 9110 prescribes for it).
pub(crate) fn matches_if_none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.as_bytes();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == ours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::etag;

    #[test]
    fn if_none_match_forms() {
        let ours = HeaderValue::try_from(etag(10)).unwrap();
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
