//! Keys from an identity provider's JWKS endpoint (`AUTH_JWT_JWKS_URL`), kept current.
//!
//! - Fetched in the background from start-up: until the first fetch succeeds the service
//!   starts and serves, but `/readyz` says not ready and tokens get 503 (they cannot be
//!   judged yet); failed fetches are retried with a doubling back-off and logged.
//! - Refetched every [`JwksOptions::refresh_interval`], so withdrawn keys stop working.
//! - Refetched when a token names an unknown `kid` (a rotation), at most once per
//!   [`JwksOptions::unknown_kid_interval`] however many unknown kids arrive; concurrent
//!   requests share one fetch.
//! - Bounded: one fetch at a time, each within [`JwksOptions::fetch_timeout`]; a body over
//!   [`MAX_JWKS_BYTES`] is refused without being read further; at most
//!   [`super::keys::MAX_JWKS_KEYS`] keys. A failed refresh keeps the keys in force.
//! - `https://` (system and Mozilla roots), or `http://` to a loopback address only.
//!   Redirects are not followed.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex, RwLock, Weak},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

use super::keys::{KeySet, Rules};

/// Largest JWKS document read, in bytes: real ones are a few KiB.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Longest wait between retries of a failing fetch.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// How the key set is kept current; the defaults are what the service runs with.
#[derive(Debug, Clone, Copy)]
pub struct JwksOptions {
    /// One fetch, connection to last byte.
    pub fetch_timeout: Duration,
    /// Refetch this often, to drop withdrawn keys.
    pub refresh_interval: Duration,
    /// At most one refetch for unknown `kid`s per this interval.
    pub unknown_kid_interval: Duration,
    /// First wait after a failed fetch; doubled after each failure, up to 30 s.
    pub retry_initial: Duration,
}

impl Default for JwksOptions {
    fn default() -> Self {
        Self {
            fetch_timeout: Duration::from_secs(5),
            refresh_interval: Duration::from_secs(300),
            unknown_kid_interval: Duration::from_secs(30),
            retry_initial: Duration::from_secs(1),
        }
    }
}

/// Checks `AUTH_JWT_JWKS_URL`; `Err` says what is expected.
pub(super) fn parse_url(raw: &str) -> Result<Uri, String> {
    const EXPECTED: &str =
        "an https:// URL of the identity provider's JWKS (http:// only to a loopback address)";
    let uri: Uri = raw.trim().parse().map_err(|_| EXPECTED.to_owned())?;
    let host = uri.host().ok_or_else(|| EXPECTED.to_owned())?;
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if loopback => Ok(uri),
        _ => Err(EXPECTED.to_owned()),
    }
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

fn client() -> HttpsClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // The system's roots too (a private CA among them, or SSL_CERT_FILE's).
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// The key set of one JWKS URL and what it takes to keep it current.
pub(super) struct RemoteKeys {
    uri: Uri,
    /// The URL as logs may show it (no credentials, no query).
    pub shown: String,
    rules: Rules,
    pub options: JwksOptions,
    client: HttpsClient,
    current: RwLock<Option<Arc<KeySet>>>,
    last_error: Mutex<Option<String>>,
    /// One fetch at a time; holds when a token's unknown kid last caused one.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    started: std::sync::Once,
}

impl RemoteKeys {
    pub fn new(uri: Uri, shown: String, rules: Rules) -> Self {
        Self {
            uri,
            shown,
            rules,
            options: JwksOptions::default(),
            client: client(),
            current: RwLock::new(None),
            last_error: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(None),
            started: std::sync::Once::new(),
        }
    }

    /// The keys in force, once a fetch has succeeded.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current.read().expect("not poisoned").clone()
    }

    /// Why the last fetch failed, while no fetch has succeeded since.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("not poisoned").clone()
    }

    /// Starts the background fetcher (once; needs a tokio runtime, else does nothing).
    pub fn start(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.started.call_once(|| {
            tracing::info!(
                url = %self.shown,
                "fetching the JWKS: until it loads, /readyz is 503 and tokens are answered 503"
            );
            runtime.spawn(keep_current(Arc::downgrade(self)));
        });
    }

    /// Called when a token names a kid `seen` does not have: the set as it is after
    /// refetching, if a refetch is allowed now (or another request just did one).
    ///
    /// Only the request that starts a refetch waits for it. Others never queue behind a
    /// fetch under way: against a slow identity provider they would hold request slots
    /// (`MAX_IN_FLIGHT`) for the fetch's whole timeout, before any rate limit applies.
    pub async fn after_unknown_kid(&self, seen: &Arc<KeySet>) -> Option<Arc<KeySet>> {
        let newer = || self.current().filter(|current| !Arc::ptr_eq(current, seen));
        let Ok(mut last) = self.fetching.try_lock() else {
            return newer();
        };
        if let Some(current) = newer() {
            return Some(current);
        }
        if last.is_some_and(|t| t.elapsed() < self.options.unknown_kid_interval) {
            return None;
        }
        *last = Some(Instant::now());
        self.refresh_locked("unknown kid").await.ok()
    }

    async fn refresh(&self, why: &str) -> Result<Arc<KeySet>, ()> {
        let _one_at_a_time = self.fetching.lock().await;
        self.refresh_locked(why).await
    }

    async fn refresh_locked(&self, why: &str) -> Result<Arc<KeySet>, ()> {
        let fetched = self
            .fetch()
            .await
            .and_then(|body| KeySet::jwks(&body, &self.rules));
        let previous = self.current();
        match fetched {
            Ok(set) => {
                *self.last_error.lock().expect("not poisoned") = None;
                if let Some(previous) = previous.filter(|p| p.same_keys(&set)) {
                    return Ok(previous);
                }
                tracing::info!(
                    url = %self.shown,
                    reason = why,
                    keys = ?set.describe(),
                    skipped = ?set.skipped,
                    "JWKS loaded"
                );
                let set = Arc::new(set);
                *self.current.write().expect("not poisoned") = Some(set.clone());
                Ok(set)
            }
            Err(error) => {
                match &previous {
                    None => tracing::warn!(
                        url = %self.shown,
                        reason = why,
                        %error,
                        "JWKS fetch failed: no keys yet, tokens are answered 503 and /readyz is 503 until one succeeds"
                    ),
                    Some(set) => tracing::warn!(
                        url = %self.shown,
                        reason = why,
                        %error,
                        keys = ?set.describe(),
                        "JWKS fetch failed: keeping the keys in force"
                    ),
                }
                *self.last_error.lock().expect("not poisoned") = Some(error);
                Err(())
            }
        }
    }

    /// One GET of the document, bounded in time and size.
    async fn fetch(&self) -> Result<Vec<u8>, String> {
        let get = async {
            let request = http::Request::get(self.uri.clone())
                .header(header::ACCEPT, "application/jwk-set+json, application/json")
                .header(
                    header::USER_AGENT,
                    concat!("fibonacci-api/", env!("CARGO_PKG_VERSION")),
                )
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let response = self.client.request(request).await.map_err(|e| cause(&e))?;
            if !response.status().is_success() {
                return Err(format!("the endpoint answered {}", response.status()));
            }
            let announced = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if announced.is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
                return Err(too_large());
            }
            Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map(|body| body.to_bytes().to_vec())
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        too_large()
                    } else {
                        format!("reading the body: {}", cause(e.as_ref()))
                    }
                })
        };
        tokio::time::timeout(self.options.fetch_timeout, get)
            .await
            .map_err(|_| format!("no complete answer within {:?}", self.options.fetch_timeout))?
    }
}

fn too_large() -> String {
    format!("the document is larger than {MAX_JWKS_BYTES} bytes")
}

/// An error and its causes, innermost last ("connection refused", "invalid peer
/// certificate", "dns error"…), without the URL.
fn cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Fetches until the first success (with back-off), then refreshes periodically; ends
/// when the keys are no longer used.
async fn keep_current(keys: Weak<RemoteKeys>) {
    let mut retry = None;
    loop {
        let Some(this) = keys.upgrade() else { return };
        let options = this.options;
        let wait = match this.refresh("scheduled").await {
            Ok(_) => {
                retry = None;
                options.refresh_interval
            }
            Err(()) => {
                let wait = retry.map_or(options.retry_initial, |r: Duration| {
                    (r * 2).min(MAX_RETRY.max(options.retry_initial))
                });
                retry = Some(wait);
                wait.min(options.refresh_interval)
            }
        };
        drop(this);
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        for ok in [
            "https://idp.example/.well-known/jwks.json",
            "http://127.0.0.1:8080/jwks",
            "http://[::1]/jwks",
            "http://localhost/jwks",
        ] {
            assert!(parse_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example/jwks",
            "http://10.0.0.1/jwks",
            "ftp://idp.example/jwks",
            "idp.example/jwks",
            "https://",
            "not a url",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
