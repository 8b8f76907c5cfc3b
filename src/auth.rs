//! Optional JWT bearer authentication: who the caller is, when the operator asks.
//!
//! Off by default. One key source is configured: an HS256 secret, a PEM public key
//! (RSA → RS256, P-256 → ES256), or a JWKS file (keys chosen by the token's `kid`).
//! Tokens must be signed by that key with its algorithm, unexpired, and carry a `sub`;
//! `aud` and `iss` are checked when configured. The verified subject becomes the
//! rate-limit key, so a caller's budget follows it across addresses.

use std::{
    fmt,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use http::HeaderValue;
use jsonwebtoken::{
    decode, decode_header,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, JwkSet},
    Algorithm, DecodingKey, Validation,
};
use serde::Deserialize;

/// Subjects longer than this are refused: they become rate-limit keys.
const MAX_SUBJECT_BYTES: usize = 256;
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 30;

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
        }
    }
}

struct Key {
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

/// Verifies bearer tokens against the configured key(s).
pub struct Authenticator {
    keys: Vec<Key>,
    /// Signatures checked so far: the costly part of authentication.
    signature_checks: AtomicU64,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algorithms: Vec<_> = self
            .keys
            .iter()
            .map(|k| k.validation.algorithms[0])
            .collect();
        f.debug_struct("Authenticator")
            .field("algorithms", &algorithms)
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
}

/// Where the keys come from; exactly one is set.
#[derive(Debug, Default)]
pub struct KeySource<'a> {
    pub hs256_secret: Option<&'a str>,
    pub public_key_file: Option<&'a Path>,
    pub jwks_file: Option<&'a Path>,
}

fn validation(algorithm: Algorithm, audience: Option<&str>, issuer: Option<&str>) -> Validation {
    let mut v = Validation::new(algorithm);
    v.leeway = LEEWAY_SECS;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    match audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        None => v.validate_aud = false,
    }
    if let Some(iss) = issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

impl Authenticator {
    /// Builds the verifier; `Err` says what is wrong with the key source, for start-up.
    pub fn new(
        source: KeySource<'_>,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> Result<Self, String> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let keys = match (
            source.hs256_secret,
            source.public_key_file,
            source.jwks_file,
        ) {
            (Some(secret), None, None) => {
                if secret.len() < 32 {
                    return Err("an HS256 secret of at least 32 bytes".into());
                }
                vec![Key {
                    kid: None,
                    key: DecodingKey::from_secret(secret.as_bytes()),
                    validation: validation(Algorithm::HS256, audience, issuer),
                }]
            }
            (None, Some(path), None) => {
                let pem = read(path)?;
                let (key, algorithm) = DecodingKey::from_rsa_pem(&pem)
                    .map(|k| (k, Algorithm::RS256))
                    .or_else(|_| DecodingKey::from_ec_pem(&pem).map(|k| (k, Algorithm::ES256)))
                    .map_err(|_| {
                        format!(
                            "{} to hold an RSA or P-256 public key in PEM",
                            path.display()
                        )
                    })?;
                vec![Key {
                    kid: None,
                    key,
                    validation: validation(algorithm, audience, issuer),
                }]
            }
            (None, None, Some(path)) => {
                let set: JwkSet = serde_json::from_slice(&read(path)?)
                    .map_err(|e| format!("{} to be a JWKS document ({e})", path.display()))?;
                let keys = set
                    .keys
                    .iter()
                    .filter_map(|jwk| {
                        let algorithm = match &jwk.algorithm {
                            AlgorithmParameters::RSA(_) => Algorithm::RS256,
                            AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                            _ => return None,
                        };
                        Some(Key {
                            kid: jwk.common.key_id.clone(),
                            key: DecodingKey::from_jwk(jwk).ok()?,
                            validation: validation(algorithm, audience, issuer),
                        })
                    })
                    .collect::<Vec<_>>();
                if keys.is_empty() {
                    return Err(format!(
                        "{} to hold at least one RSA or EC key",
                        path.display()
                    ));
                }
                keys
            }
            _ => {
                return Err(
                    "exactly one of an HS256 secret, a public key file or a JWKS file".into(),
                )
            }
        };
        Ok(Self {
            keys,
            signature_checks: AtomicU64::new(0),
        })
    }

    /// How many token signatures this instance has checked.
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    /// The verified subject of the bearer token in `authorization`.
    pub fn verify(&self, authorization: Option<&HeaderValue>) -> Result<String, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let value = header.to_str().map_err(|_| AuthError::Malformed)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        let kid = decode_header(token).map_err(|_| AuthError::Invalid)?.kid;
        let key = match &kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str())),
            None => None,
        }
        .or_else(|| (self.keys.len() == 1).then(|| &self.keys[0]))
        .ok_or(AuthError::Invalid)?;
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let data =
            decode::<Claims>(token, &key.key, &key.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::MissingRequiredClaim(claim) if claim == "sub" => AuthError::NoSubject,
                _ => AuthError::Invalid,
            })?;
        data.claims
            .sub
            .filter(|s| !s.is_empty() && s.len() <= MAX_SUBJECT_BYTES)
            .ok_or(AuthError::NoSubject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
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

    #[test]
    fn hs256_rules() {
        let auth = Authenticator::new(
            KeySource {
                hs256_secret: Some(SECRET),
                ..Default::default()
            },
            Some("fibonacci-api"),
            Some("https://issuer.example"),
        )
        .unwrap();
        let good = json!({"sub": "alice", "exp": now() + 300, "aud": "fibonacci-api", "iss": "https://issuer.example"});
        assert_eq!(
            auth.verify(Some(&bearer(&hs256(good.clone())))),
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
            assert_eq!(auth.verify(header.as_ref()), Err(expected), "{why}");
        }
        // alg=none and algorithm switching are refused: the key fixes the algorithm.
        let none = format!(
            "{}.{}.",
            base64url(r#"{"alg":"none","typ":"JWT"}"#),
            base64url(&good.to_string())
        );
        assert_eq!(
            auth.verify(Some(&bearer(&none))),
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

    #[test]
    fn rs256_and_es256_public_keys() {
        for (private, public, algorithm) in [
            ("rsa-private.pem", "rsa-public.pem", Algorithm::RS256),
            ("ec-private.pem", "ec-public.pem", Algorithm::ES256),
        ] {
            let auth = Authenticator::new(
                KeySource {
                    public_key_file: Some(&fixture(public)),
                    ..Default::default()
                },
                None,
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
                auth.verify(Some(&bearer(&token))),
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
                auth.verify(Some(&bearer(&forged))),
                Err(AuthError::Invalid),
                "{algorithm:?} confusion"
            );
        }
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid() {
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
            None,
            None,
        )
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        for (kid, key, algorithm) in &signers {
            let mut header = Header::new(*algorithm);
            header.kid = Some((*kid).to_owned());
            let token = encode(&header, &json!({"sub": kid, "exp": now() + 60}), key).unwrap();
            assert_eq!(
                auth.verify(Some(&bearer(&token))),
                Ok((*kid).to_owned()),
                "{kid}"
            );
            header.kid = Some("unknown".into());
            let token = encode(&header, &json!({"sub": kid, "exp": now() + 60}), key).unwrap();
            assert_eq!(
                auth.verify(Some(&bearer(&token))),
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
            None,
            None,
        );
        assert!(short.is_err(), "a short HS256 secret");
        let missing = Authenticator::new(
            KeySource {
                public_key_file: Some(Path::new("/nonexistent.pem")),
                ..Default::default()
            },
            None,
            None,
        );
        assert!(missing.unwrap_err().contains("/nonexistent.pem"));
        let both = Authenticator::new(
            KeySource {
                hs256_secret: Some(SECRET),
                public_key_file: Some(&fixture("rsa-public.pem")),
                ..Default::default()
            },
            None,
            None,
        );
        assert!(both.is_err(), "two key sources");
    }
}
