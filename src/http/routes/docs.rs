//! `/docs`: the OpenAPI document as an interactive page (Swagger UI). Its files are
//! compiled into the binary, so the page works offline and behind an egress policy; it
//! loads nothing from another origin, and its policy (CSP) allows nothing else.
//!
//! The page itself is revalidated (`no-cache` + ETag: a 304 costs a header); the files it
//! loads sit under a fingerprint of their contents, so browsers keep them for a year
//! without asking, and a new release is a new address.

use std::{
    borrow::Cow,
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, LazyLock},
};

use axum::{
    extract::Path,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;

use super::matches_if_none_match;
use crate::http::error::ApiError;

/// Only what Swagger UI needs from its own origin: its scripts and styles, the document
/// (`connect-src`) and the data: images its stylesheet embeds. No inline script, no eval.
pub const CSP: HeaderValue = HeaderValue::from_static(
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
);

const IMMUTABLE: HeaderValue = HeaderValue::from_static("public, max-age=31536000, immutable");
const REVALIDATE: HeaderValue = HeaderValue::from_static("no-cache");

/// The Swagger UI files the page loads, from the vendored distribution.
const FILES: [&str; 6] = [
    "swagger-ui.css",
    "index.css",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "swagger-initializer.js",
    "favicon-32x32.png",
];

/// A file as it is served: the body, its type and its tag, all built once.
struct File {
    body: Bytes,
    content_type: HeaderValue,
    etag: HeaderValue,
}

impl File {
    fn new(body: Bytes, content_type: &str) -> Self {
        let mut hasher = DefaultHasher::new();
        body.hash(&mut hasher);
        Self {
            etag: HeaderValue::try_from(format!("\"{:016x}\"", hasher.finish())).expect("hex"),
            content_type: HeaderValue::try_from(content_type).expect("a MIME type"),
            body,
        }
    }

    fn serve(&self, request: &HeaderMap, cache_control: HeaderValue) -> Response {
        let mut response = if matches_if_none_match(request, &self.etag) {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            let mut response = self.body.clone().into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, self.content_type.clone());
            response
        };
        let headers = response.headers_mut();
        headers.insert(header::ETAG, self.etag.clone());
        headers.insert(header::CACHE_CONTROL, cache_control);
        headers.insert(header::CONTENT_SECURITY_POLICY, CSP);
        response
    }
}

/// The page and its files, built on the first visit (hashing ~2 MB once).
struct Ui {
    /// The fingerprint of every file, the directory they are served under.
    version: String,
    page: File,
    files: HashMap<&'static str, File>,
}

static UI: LazyLock<Ui> = LazyLock::new(Ui::build);

impl Ui {
    fn build() -> Self {
        // The document is fetched relative to the page (`/docs` → `/openapi.json`), so the
        // page also works behind a path prefix; the validator badge would load an image
        // from swagger.io, and the URL bar would let the page fetch other documents.
        let config = Arc::new(
            utoipa_swagger_ui::Config::new(["openapi.json"])
                .use_base_layout()
                .validator_url("none")
                .try_it_out_enabled(true)
                .display_request_duration(true),
        );
        let files: HashMap<_, _> = FILES
            .iter()
            .map(|&name| {
                let file = utoipa_swagger_ui::serve(name, config.clone())
                    .expect("the vendored files are valid")
                    .expect("the vendored distribution has every file the page loads");
                // Borrowed from the binary (no copy) except the generated initializer.
                let body = match file.bytes {
                    Cow::Borrowed(bytes) => Bytes::from_static(bytes),
                    Cow::Owned(bytes) => Bytes::from(bytes),
                };
                (name, File::new(body, &file.content_type))
            })
            .collect();
        let mut hasher = DefaultHasher::new();
        for name in FILES {
            files[name].etag.as_bytes().hash(&mut hasher);
        }
        let version = format!("{:016x}", hasher.finish());
        let page = File::new(Bytes::from(page(&version)), "text/html; charset=utf-8");
        Self {
            version,
            page,
            files,
        }
    }
}

/// The page: Swagger UI's own markup, its files under `docs/<version>/` (relative, so a
/// path prefix in front of the service keeps working).
fn page(version: &str) -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>fibonacci-api — API documentation</title>
<link rel="stylesheet" href="docs/{version}/swagger-ui.css">
<link rel="stylesheet" href="docs/{version}/index.css">
<link rel="icon" type="image/png" href="docs/{version}/favicon-32x32.png" sizes="32x32">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/{version}/swagger-ui-bundle.js"></script>
<script src="docs/{version}/swagger-ui-standalone-preset.js"></script>
<script src="docs/{version}/swagger-initializer.js"></script>
</body>
</html>
"#
    )
}

/// The interactive documentation of this API.
pub async fn page_handler(headers: HeaderMap) -> Response {
    UI.page.serve(&headers, REVALIDATE)
}

/// `/docs/` is where people type it; the page's relative links need `/docs`.
pub async fn slash_handler() -> Response {
    let mut response = StatusCode::PERMANENT_REDIRECT.into_response();
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("../docs"));
    response
}

/// One of the page's files. A fingerprint other than this build's (a page from another
/// release during a rollout) still gets the file, but not to keep.
pub async fn file_handler(
    Path((version, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let file = UI.files.get(name.as_str()).ok_or(ApiError::NotFound)?;
    let cache_control = if version == UI.version {
        IMMUTABLE
    } else {
        REVALIDATE
    };
    Ok(file.serve(&headers, cache_control))
}
