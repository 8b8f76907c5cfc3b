//! The router: a plain function that tests can drive. Routes come from the route table
//! (`routes`); the layers every route gets are wrapped around the routed service once,
//! and that service is what the listeners serve (no outer `Router`, which would box and
//! clone the whole stack per request).

use std::sync::{Arc, Mutex};

use axum::{
    extract::FromRef,
    http::{HeaderValue, Method},
    Router,
};
use bytes::Bytes;
use tower::{util::Either, Layer};
use tower_http::cors::{Cors, CorsLayer};

use super::{
    admit::{Admit, AdmitLayer},
    error::ApiError,
    observe::{Observe, ObserveLayer},
    routes,
};
use crate::state::App;

/// What the handlers can ask for: the instance's state, and the OpenAPI document
/// rendered once for it.
#[derive(Clone)]
pub struct HttpState {
    pub app: Arc<App>,
    pub openapi: Bytes,
}

impl FromRef<HttpState> for Arc<App> {
    fn from_ref(state: &HttpState) -> Self {
        state.app.clone()
    }
}

/// The metric label of a request: its route template, found among the paths the route
/// table declared (so a route cannot be missing here), or `unmatched`. A closed set: no
/// request can add a series.
pub struct RouteLabels {
    /// The templates without parameters, compared as they are: the common case, cheaper
    /// than a walk of the tree.
    exact: Vec<&'static str>,
    templates: matchit::Router<&'static str>,
}

impl RouteLabels {
    fn of(doc: &utoipa::openapi::OpenApi, pages: &[&'static str]) -> Self {
        let mut templates = matchit::Router::new();
        let mut exact = Vec::new();
        let paths = doc.paths.paths.keys().map(String::as_str);
        for path in paths.chain(pages.iter().copied()) {
            let label = intern(path);
            templates
                .insert(path, label)
                .expect("the route table's paths are distinct");
            if !path.contains('{') {
                exact.push(label);
            }
        }
        Self { exact, templates }
    }

    /// The label of a request to `path`.
    pub fn of_path(&self, path: &str) -> &'static str {
        if let Some(label) = self.exact.iter().find(|label| **label == path) {
            return label;
        }
        self.templates.at(path).map_or("unmatched", |m| *m.value)
    }
}

/// One `&'static str` per route template for the whole process (metric labels are
/// `'static`): a handful, however many routers are built.
fn intern(template: &str) -> &'static str {
    static LABELS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut labels = LABELS.lock().expect("not poisoned");
    if let Some(label) = labels.iter().find(|l| **l == template) {
        return label;
    }
    let label: &'static str = Box::leak(template.to_owned().into_boxed_str());
    labels.push(label);
    label
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn cors(origins: &[HeaderValue]) -> Option<CorsLayer> {
    (!origins.is_empty()).then(|| {
        CorsLayer::new()
            .allow_origin(origins.to_vec())
            .allow_methods([Method::GET, Method::HEAD])
            .expose_headers([
                "etag".parse().expect("static"),
                "retry-after".parse().expect("static"),
                "ratelimit-limit".parse().expect("static"),
                "ratelimit-remaining".parse().expect("static"),
                "ratelimit-reset".parse().expect("static"),
                "ratelimit-policy".parse().expect("static"),
                "x-request-id".parse().expect("static"),
            ])
            .max_age(std::time::Duration::from_secs(3600))
    })
}

/// A router of some of the routes, with the document of every endpoint (the admin ones
/// included, wherever they are served) and the labels of the routes it serves.
struct Table {
    router: Router<HttpState>,
    doc: utoipa::openapi::OpenApi,
    labels: Arc<RouteLabels>,
    /// The labels of the routes behind admission.
    admitted: Vec<&'static str>,
}

impl Table {
    fn new(public: bool, admin: bool, with_docs: bool) -> Self {
        let public_routes = routes::public(with_docs);
        let admin_routes = routes::admin();
        let mut admitted = Vec::new();
        let mut pages = Vec::new();
        let (public_router, mut doc) = public_routes.router.split_for_parts();
        let (admin_router, admin_doc) = admin_routes.router.split_for_parts();
        let mut served = utoipa::openapi::OpenApi::default();
        let mut router = Router::new();
        if public {
            served.merge(doc.clone());
            router = router.merge(public_router);
            admitted.extend(public_routes.admitted);
            pages.extend(public_routes.pages);
        }
        if admin {
            served.merge(admin_doc.clone());
            router = router.merge(admin_router);
            admitted.extend(admin_routes.admitted);
        }
        doc.merge(admin_doc);
        Self {
            router,
            labels: Arc::new(RouteLabels::of(&served, &pages)),
            admitted: admitted.iter().map(|path| intern(path)).collect(),
            doc,
        }
    }

    /// Layers every route gets (admission only acts on the admitted ones), observation
    /// outermost so it sees every response and every request (a panic's 500 included, an
    /// abandoned request as 499).
    ///
    /// Wrapped around the routed service once rather than with `Router::layer` or a
    /// route's own layer, which box the service per route and clone it per request.
    fn finish(self, app: &Arc<App>, extra: Router<HttpState>) -> Api {
        let state = HttpState {
            app: app.clone(),
            openapi: Bytes::from(routes::openapi::render(
                &self.doc,
                app.config.max_n,
                app.config.auth.is_some(),
            )),
        };
        let routed = self
            .router
            .merge(extra)
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .with_state(state);
        let admitted = AdmitLayer::new(app, self.labels.clone(), self.admitted).layer(routed);
        let inner = match cors(&app.config.cors_allowed_origins) {
            Some(cors) => Either::Left(cors.layer(admitted)),
            None => Either::Right(admitted),
        };
        ObserveLayer::new(app, self.labels).layer(inner)
    }
}

/// What a listener serves: the routes under admission (and CORS, when configured) under
/// observation. A tower service; [`Observe::serving`] gives it a connection's peer.
pub type Api = Observe<Either<Cors<Admit<Router>>, Admit<Router>>>;

/// The API router: `/fibonacci` behind admission, `/health`, the OpenAPI document and its
/// page (`/docs`) beside it. Probes and metrics are here too unless `ADMIN_LISTEN_ADDR` gives them a
/// port of their own: then the public port (the one an Ingress routes to) never
/// exposes them.
pub fn router(app: Arc<App>) -> Api {
    router_with(app, Router::new())
}

/// The API router with `extra` routes beside the API, under the same layers: the seam
/// for tests that need a route of their own (one that panics, say).
pub fn router_with(app: Arc<App>, extra: Router<HttpState>) -> Api {
    let with_admin = app.config.admin_listen_addr.is_none();
    Table::new(true, with_admin, app.config.docs_enabled).finish(&app, extra)
}

/// The admin router (`ADMIN_LISTEN_ADDR`): metrics and probes only.
pub fn admin_router(app: Arc<App>) -> Api {
    Table::new(false, true, false).finish(&app, Router::new())
}
