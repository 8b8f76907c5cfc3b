//! Optional JWT bearer authentication: who the caller is, when the operator asks.
//!
//! Off by default. One key source is configured: an HS256 secret, a PEM public key
//! (RSA → RS256, P-256 → ES256), a JWKS file, or an identity provider's JWKS URL (kept
//! current: [`jwks`]); keys are chosen by the token's `kid` and fix the algorithm
//! ([`keys`]). Tokens must be signed by such a key, unexpired, carry a `sub`, and be
//! meant for this service (`aud`; any audience only when the operator says `*`); `iss`
//! is checked when configured. The verified subject becomes the rate-limit key, so a
//! caller's budget follows it across addresses.
//!
//! Signatures are the costly part, so they are checked last and as rarely as possible
//! ([`gate`]): a token verified a moment ago is looked up, not checked again, and an
//! address the limiter refused a moment ago (keyed on the address, as failed
//! authentications are) is refused again until its `Retry-After` without its token
//! being looked at.

mod gate;
pub mod jwks;
mod keys;

use std::{
    fmt,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{decode, decode_header, errors::ErrorKind};
use serde::Deserialize;

pub use jwks::{JwksOptions, MAX_JWKS_BYTES};
pub use keys::MAX_JWKS_KEYS;

use crate::ratelimit::{ClientKey, Decision, Window};
use keys::{KeySet, Lookup, Rules};

/// Subjects longer than this are refused: they become rate-limit keys.
const MAX_SUBJECT_BYTES: usize = 256;

/// Why a request was not authenticated; `Display` is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send Authorization: Bearer <JWT>")]
    Missing,
    #[error("malformed Authorization header: expected Bearer <JWT>")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("token not valid for this audience")]
    WrongAudience,
    #[error("token not issued by a trusted issuer")]
    WrongIssuer,
    #[error("token has no usable subject")]
    NoSubject,
    #[error("invalid token")]
    Invalid,
    /// No keys yet (the JWKS has not loaded): the token cannot be judged either way.
    #[error("the identity provider's keys are not loaded yet: retry shortly")]
    Unavailable,
    /// The address is over its rate limit, so the token was not looked at.
    #[error("token not checked")]
    NotChecked,
}

impl AuthError {
    /// A short machine-readable reason, for logs and alerts.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Expired => "expired",
            Self::WrongAudience => "wrong_audience",
            Self::WrongIssuer => "wrong_issuer",
            Self::NoSubject => "no_subject",
            Self::Invalid => "invalid",
            Self::Unavailable => "keys_unavailable",
            Self::NotChecked => "not_checked",
        }
    }
}

/// Whose tokens are accepted: `aud` must name this service, unless the operator
/// explicitly accepts any (`AUTH_JWT_AUDIENCE=*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    Any,
    Exactly(String),
}

/// Where the keys come from; exactly one is set.
#[derive(Debug, Default)]
pub struct KeySource<'a> {
    pub hs256_secret: Option<&'a str>,
    pub public_key_file: Option<&'a Path>,
    pub jwks_file: Option<&'a Path>,
    pub jwks_url: Option<&'a str>,
}

/// What authentication decided about a request.
#[derive(Debug)]
pub enum Outcome {
    /// The verified subject.
    Subject(Arc<str>),
    Refused(AuthError),
    /// The address was refused by the limiter a moment ago and still would be: this is
    /// that decision again, reached without looking at the token.
    Throttled(Decision),
}

enum Keys {
    Fixed(Arc<KeySet>),
    Remote(Arc<jwks::RemoteKeys>),
}

impl Keys {
    fn current(&self) -> Option<Arc<KeySet>> {
        match self {
            Self::Fixed(set) => Some(set.clone()),
            Self::Remote(remote) => remote.current(),
        }
    }
}

/// Verifies bearer tokens against the configured key(s).
pub struct Authenticator {
    keys: Keys,
    verified: gate::VerifiedTokens,
    throttled: gate::ThrottledAddresses,
    /// Signatures checked so far: the costly part of authentication.
    signature_checks: AtomicU64,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Authenticator");
        match &self.keys {
            Keys::Fixed(set) => debug.field("algorithms", &set.algorithms()),
            Keys::Remote(remote) => debug.field("jwks_url", &remote.shown),
        }
        .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
}

/// The token68 of an `Authorization: Bearer <token>` header. The scheme is
/// case-insensitive (RFC 9110 §11.1) and one or more spaces may follow it (§11.4).
fn bearer_token(authorization: Option<&[u8]>) -> Result<&str, AuthError> {
    let value = std::str::from_utf8(authorization.ok_or(AuthError::Missing)?)
        .map_err(|_| AuthError::Malformed)?;
    let (scheme, rest) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    let token = rest.trim_matches([' ', '\t']);
    let body = token.trim_end_matches('=');
    let token68 = !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    token68.then_some(token).ok_or(AuthError::Malformed)
}

impl Authenticator {
    /// Builds the verifier; `Err` says what is wrong with the key source, for start-up.
    /// A JWKS URL is not fetched here: see [`Authenticator::start`].
    pub fn new(
        source: KeySource<'_>,
        audience: Audience,
        issuer: Option<&str>,
    ) -> Result<Self, String> {
        let rules = Rules {
            audience,
            issuer: issuer.map(str::to_owned),
        };
        let read = |path: &Path| {
            let bytes =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if bytes.len() > MAX_JWKS_BYTES {
                return Err(format!(
                    "{} to be at most {MAX_JWKS_BYTES} bytes",
                    path.display()
                ));
            }
            Ok(bytes)
        };
        let keys =
            match (
                source.hs256_secret,
                source.public_key_file,
                source.jwks_file,
                source.jwks_url,
            ) {
                (Some(secret), None, None, None) => {
                    Keys::Fixed(Arc::new(KeySet::hs256(secret, &rules)?))
                }
                (None, Some(path), None, None) => Keys::Fixed(Arc::new(
                    KeySet::pem(&read(path)?, &rules)
                        .map_err(|what| format!("{} to hold {what}", path.display()))?,
                )),
                (None, None, Some(path), None) => Keys::Fixed(Arc::new(
                    KeySet::jwks(&read(path)?, &rules).map_err(|why| {
                        format!(
                            "{} to be a JWKS with a usable signing key: {why}",
                            path.display()
                        )
                    })?,
                )),
                (None, None, None, Some(url)) => {
                    let uri = jwks::parse_url(url)?;
                    Keys::Remote(Arc::new(jwks::RemoteKeys::new(uri, redact_url(url), rules)))
                }
                _ => return Err(
                    "exactly one of an HS256 secret, a public key file, a JWKS file or a JWKS URL"
                        .into(),
                ),
            };
        Ok(Self {
            keys,
            verified: gate::VerifiedTokens::new(),
            throttled: gate::ThrottledAddresses::new(),
            signature_checks: AtomicU64::new(0),
        })
    }

    /// Replaces how a JWKS URL is kept current (before [`Authenticator::start`]).
    pub fn with_jwks_options(mut self, options: JwksOptions) -> Self {
        if let Keys::Remote(remote) = &mut self.keys {
            Arc::get_mut(remote)
                .expect("options are set before the keys are shared")
                .options = options;
        }
        self
    }

    /// Starts fetching a JWKS URL in the background (idempotent; nothing to do for other
    /// key sources). Needs a tokio runtime.
    pub fn start(&self) {
        if let Keys::Remote(remote) = &self.keys {
            remote.start();
        }
    }

    /// Whether tokens can be judged: false until a JWKS URL has loaded once.
    pub fn ready(&self) -> bool {
        self.start();
        self.keys.current().is_some()
    }

    /// Why the last JWKS fetch failed, while none has succeeded since.
    pub fn jwks_error(&self) -> Option<String> {
        match &self.keys {
            Keys::Remote(remote) => remote.last_error(),
            Keys::Fixed(_) => None,
        }
    }

    /// How many token signatures this instance has checked.
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    /// Authenticates a request from `address`, cheapest checks first: a token verified
    /// a moment ago is looked up; an address refused by the limiter a moment ago is
    /// refused again without its token being looked at; only then is a signature checked.
    pub async fn authenticate(
        &self,
        authorization: Option<&(impl AsRef<[u8]> + ?Sized)>,
        address: &ClientKey,
    ) -> Outcome {
        let now = Instant::now();
        let token = bearer_token(authorization.map(AsRef::as_ref));
        let keys = self.keys.current();
        if let Some(subject) = self.verified_before(&token, &keys, now) {
            return Outcome::Subject(subject);
        }
        let own = self.throttled.get(address, now).map(|t| (t, false));
        let shared = || {
            let net48 = address.net48()?;
            self.throttled.get(&net48, now).map(|t| (t, true))
        };
        if let Some(((window, wait), shared)) = own.or_else(shared) {
            return Outcome::Throttled(Decision::Rejected {
                window,
                retry_after: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                shared,
            });
        }
        match self.verify_token(token, keys, now).await {
            Ok(subject) => Outcome::Subject(subject),
            Err(e) => Outcome::Refused(e),
        }
    }

    /// Remembers that the limiter refused `address` (keyed on the address) for
    /// `retry_after` ms, so that until then its tokens cost no signature checks.
    pub fn throttle(&self, address: &ClientKey, window: Window, retry_after: u64) {
        self.throttled.insert(
            address,
            window,
            Instant::now() + Duration::from_millis(retry_after),
        );
    }

    /// The verified subject of the bearer token in `authorization` (no address checks).
    pub async fn verify(
        &self,
        authorization: Option<&(impl AsRef<[u8]> + ?Sized)>,
    ) -> Result<Arc<str>, AuthError> {
        let now = Instant::now();
        let token = bearer_token(authorization.map(AsRef::as_ref));
        let keys = self.keys.current();
        match self.verified_before(&token, &keys, now) {
            Some(subject) => Ok(subject),
            None => self.verify_token(token, keys, now).await,
        }
    }

    /// The subject, if this token was verified a moment ago under these keys.
    fn verified_before(
        &self,
        token: &Result<&str, AuthError>,
        keys: &Option<Arc<KeySet>>,
        now: Instant,
    ) -> Option<Arc<str>> {
        match (token, keys) {
            (Ok(token), Some(keys)) => self.verified.get(token, keys.generation, now),
            _ => None,
        }
    }

    async fn verify_token(
        &self,
        token: Result<&str, AuthError>,
        keys: Option<Arc<KeySet>>,
        now: Instant,
    ) -> Result<Arc<str>, AuthError> {
        let token = token?;
        let header = decode_header(token).map_err(|_| AuthError::Invalid)?;
        let mut keys = keys.ok_or_else(|| {
            self.start();
            AuthError::Unavailable
        })?;
        if let (Lookup::UnknownKid, Keys::Remote(remote)) =
            (keys.find(header.kid.as_deref(), header.alg), &self.keys)
        {
            keys = remote
                .after_unknown_kid(&keys)
                .await
                .ok_or(AuthError::Invalid)?;
        }
        let Lookup::Found(key) = keys.find(header.kid.as_deref(), header.alg) else {
            return Err(AuthError::Invalid);
        };
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let data =
            decode::<Claims>(token, &key.key, &key.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::MissingRequiredClaim(claim) if claim == "sub" => AuthError::NoSubject,
                _ => AuthError::Invalid,
            })?;
        let subject: Arc<str> = data
            .claims
            .sub
            .filter(|s| !s.is_empty() && s.len() <= MAX_SUBJECT_BYTES)
            .ok_or(AuthError::NoSubject)?
            .into();
        if let Some(exp) = data.claims.exp {
            let unix_now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let left = Duration::try_from_secs_f64(exp - unix_now).unwrap_or_default();
            self.verified
                .insert(token, subject.clone(), keys.generation, now, now + left);
        }
        Ok(subject)
    }
}

/// `url` as logs and `Debug` may show it: no user, password or query (all may hold
/// secrets); `<redacted>` when it cannot even be parsed.
pub fn redact_url(url: &str) -> String {
    const REDACTED: &str = "<redacted>";
    let Some((scheme, rest)) = url.trim().split_once("://") else {
        return REDACTED.into();
    };
    // Everything before the last `@` is user information, whatever it contains.
    let (credentials, rest) = match rest.rsplit_once('@') {
        Some((_, host_and_path)) => (format!("{REDACTED}@"), host_and_path),
        None => (String::new(), rest),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((before, _)) => (before, format!("?{REDACTED}")),
        None => (rest, String::new()),
    };
    let rest = rest.split('#').next().unwrap_or_default();
    format!("{scheme}://{credentials}{rest}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    fn hs256(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[tokio::test]
    async fn hs256_rules() {
        let auth = Authenticator::new(
            KeySource {
                hs256_secret: Some(SECRET),
                ..Default::default()
            },
            Audience::Exactly("fibonacci-api".into()),
            Some("https://issuer.example"),
        )
        .unwrap();
        let good = json!({"sub": "alice", "exp": now() + 300, "aud": "fibonacci-api", "iss": "https://issuer.example"});
        assert_eq!(
            auth.verify(Some(&bearer(&hs256(good.clone())))).await,
            Ok("alice".into())
        );
        let with = |key: &str, value: serde_json::Value| {
            let mut claims = good.clone();
            claims[key] = value;
            hs256(claims)
        };
        let other_secret = encode(
            &Header::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(b"another-secret-another-secret-another"),
        )
        .unwrap();
        let cases: Vec<(Option<HeaderValue>, AuthError, &str)> = vec![
            (None, AuthError::Missing, "no header"),
            (
                Some(HeaderValue::from_static("Basic abc")),
                AuthError::Malformed,
                "not bearer",
            ),
            (
                Some(HeaderValue::from_static("Bearer ")),
                AuthError::Malformed,
                "empty token",
            ),
            (Some(bearer("not.a.jwt")), AuthError::Invalid, "garbage"),
            (Some(bearer(&other_secret)), AuthError::Invalid, "wrong key"),
            (
                Some(bearer(&with("exp", json!(now() - 3600)))),
                AuthError::Expired,
                "expired",
            ),
            (
                Some(bearer(&with("aud", json!("someone-else")))),
                AuthError::WrongAudience,
                "audience",
            ),
            (
                Some(bearer(&with("iss", json!("https://evil.example")))),
                AuthError::WrongIssuer,
                "issuer",
            ),
            (
                Some(bearer(&hs256(
                    json!({"exp": now() + 300, "aud": "fibonacci-api", "iss": "https://issuer.example"}),
                ))),
                AuthError::NoSubject,
                "no sub",
            ),
            (
                Some(bearer(&with("sub", json!("x".repeat(300))))),
                AuthError::NoSubject,
                "oversized sub",
            ),
        ];
        for (header, expected, why) in cases {
            assert_eq!(auth.verify(header.as_ref()).await, Err(expected), "{why}");
        }
        // alg=none and algorithm switching are refused: the key fixes the algorithm.
        let none = format!(
            "{}.{}.",
            base64url(r#"{"alg":"none","typ":"JWT"}"#),
            base64url(&good.to_string())
        );
        assert_eq!(
            auth.verify(Some(&bearer(&none))).await,
            Err(AuthError::Invalid),
            "alg none"
        );
    }

    fn base64url(text: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = text.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[tokio::test]
    async fn rs256_and_es256_public_keys() {
        for (private, public, algorithm) in [
            ("rsa-private.pem", "rsa-public.pem", Algorithm::RS256),
            ("ec-private.pem", "ec-public.pem", Algorithm::ES256),
        ] {
            let auth = Authenticator::new(
                KeySource {
                    public_key_file: Some(&fixture(public)),
                    ..Default::default()
                },
                Audience::Any,
                None,
            )
            .unwrap();
            let pem = std::fs::read(fixture(private)).unwrap();
            let key = match algorithm {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
                _ => EncodingKey::from_ec_pem(&pem).unwrap(),
            };
            let token = encode(
                &Header::new(algorithm),
                &json!({"sub": "svc", "exp": now() + 60}),
                &key,
            )
            .unwrap();
            assert_eq!(
                auth.verify(Some(&bearer(&token))).await,
                Ok("svc".into()),
                "{algorithm:?}"
            );
            // An HS256 token "signed" with the public key must not pass (key confusion).
            let forged = encode(
                &Header::new(Algorithm::HS256),
                &json!({"sub": "svc", "exp": now() + 60}),
                &EncodingKey::from_secret(&std::fs::read(fixture(public)).unwrap()),
            )
            .unwrap();
            assert_eq!(
                auth.verify(Some(&bearer(&forged))).await,
                Err(AuthError::Invalid),
                "{algorithm:?} confusion"
            );
        }
    }

    #[tokio::test]
    async fn jwks_keys_are_chosen_by_kid() {
        use jsonwebtoken::jwk::{Jwk, JwkSet};
        let mut keys = Vec::new();
        let mut signers = Vec::new();
        for (kid, private, algorithm) in [
            ("ec-1", "ec-private.pem", Algorithm::ES256),
            ("rsa-1", "rsa-private.pem", Algorithm::RS256),
        ] {
            let pem = std::fs::read(fixture(private)).unwrap();
            let key = match algorithm {
                Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
                _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
            };
            let mut jwk = Jwk::from_encoding_key(&key, algorithm).unwrap();
            jwk.common.key_id = Some(kid.to_owned());
            keys.push(jwk);
            signers.push((kid, key, algorithm));
        }
        let path = std::env::temp_dir().join(format!("jwks-{}.json", std::process::id()));
        std::fs::write(&path, serde_json::to_vec(&JwkSet { keys }).unwrap()).unwrap();
        let auth = Authenticator::new(
            KeySource {
                jwks_file: Some(&path),
                ..Default::default()
            },
            Audience::Any,
            None,
        )
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        for (kid, key, algorithm) in &signers {
            let mut header = Header::new(*algorithm);
            header.kid = Some((*kid).to_owned());
            let token = encode(&header, &json!({"sub": kid, "exp": now() + 60}), key).unwrap();
            assert_eq!(
                auth.verify(Some(&bearer(&token))).await,
                Ok((*kid).into()),
                "{kid}"
            );
            header.kid = Some("unknown".into());
            let token = encode(&header, &json!({"sub": kid, "exp": now() + 60}), key).unwrap();
            assert_eq!(
                auth.verify(Some(&bearer(&token))).await,
                Err(AuthError::Invalid),
                "{kid} under an unknown kid"
            );
        }
    }

    #[test]
    fn bad_key_sources_are_refused() {
        let short = Authenticator::new(
            KeySource {
                hs256_secret: Some("short"),
                ..Default::default()
            },
            Audience::Any,
            None,
        );
        assert!(short.is_err(), "a short HS256 secret");
        let missing = Authenticator::new(
            KeySource {
                public_key_file: Some(Path::new("/nonexistent.pem")),
                ..Default::default()
            },
            Audience::Any,
            None,
        );
        assert!(missing.unwrap_err().contains("/nonexistent.pem"));
        let both = Authenticator::new(
            KeySource {
                hs256_secret: Some(SECRET),
                public_key_file: Some(&fixture("rsa-public.pem")),
                ..Default::default()
            },
            Audience::Any,
            None,
        );
        assert!(both.is_err(), "two key sources");
    }
}
