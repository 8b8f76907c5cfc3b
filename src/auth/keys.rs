//! Verification keys and the rules that decide which key may verify which token.
//!
//! A key fixes its algorithm, so a token cannot choose one (`alg: none`, or HS256 "signed"
//! with a public key, are refused). From a JWK, only what the key itself allows is used:
//! `use` must be `sig` (or absent), `key_ops` must include `verify` (or be absent), `alg`
//! pins the algorithm and must fit the key, an EC curve decides ES256 (P-256) or ES384
//! (P-384). Symmetric (`oct`) keys are never taken from a key set: whoever can read it
//! could sign with them. RSA moduli under 2048 bits are refused.

use std::sync::atomic::{AtomicU64, Ordering};

use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse},
    Algorithm, DecodingKey, Validation,
};
use serde::Deserialize;

use super::Audience;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub(super) const LEEWAY_SECS: u64 = 30;
/// A key set with more keys than this is refused: real providers publish a handful.
pub const MAX_JWKS_KEYS: usize = 100;
/// The smallest RSA modulus accepted, in bytes (2048 bits).
const MIN_RSA_MODULUS_BYTES: usize = 256;

/// What every token must satisfy besides its signature.
#[derive(Debug, Clone)]
pub(super) struct Rules {
    pub audience: Audience,
    pub issuer: Option<String>,
}

impl Rules {
    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut v = Validation::new(algorithm);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &self.audience {
            Audience::Exactly(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            Audience::Any => v.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        v
    }
}

/// One verification key.
pub(super) struct Key {
    pub kid: Option<String>,
    pub algorithm: Algorithm,
    pub key: DecodingKey,
    pub validation: Validation,
}

/// The keys in force at one time. Each set has its own generation, so a verification
/// remembered under one set is not trusted under the next.
pub(super) struct KeySet {
    keys: Vec<Key>,
    /// What was in the source and why it was not used, for the logs.
    pub skipped: Vec<String>,
    pub generation: u64,
    /// The usable keys as published (sorted JSON), to tell a changed set from a re-fetch.
    fingerprint: Vec<String>,
}

/// What a token's header finds in a key set.
pub(super) enum Lookup<'a> {
    Found(&'a Key),
    /// The token names a key id the set does not have (perhaps newer than the set).
    UnknownKid,
    /// Nothing in the set may verify this token.
    NoMatch,
}

fn next_generation() -> u64 {
    static GENERATION: AtomicU64 = AtomicU64::new(1);
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

#[derive(Deserialize)]
struct Document {
    keys: Vec<serde_json::Value>,
}

impl KeySet {
    fn new(keys: Vec<Key>, skipped: Vec<String>, fingerprint: Vec<String>) -> Self {
        Self {
            keys,
            skipped,
            generation: next_generation(),
            fingerprint,
        }
    }

    /// An HS256 shared secret (at least 32 bytes).
    pub fn hs256(secret: &str, rules: &Rules) -> Result<Self, String> {
        if secret.len() < 32 {
            return Err("an HS256 secret of at least 32 bytes".into());
        }
        let key = Key {
            kid: None,
            algorithm: Algorithm::HS256,
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation: rules.validation(Algorithm::HS256),
        };
        Ok(Self::new(vec![key], Vec::new(), Vec::new()))
    }

    /// A PEM public key: RSA → RS256, EC (P-256) → ES256.
    pub fn pem(pem: &[u8], rules: &Rules) -> Result<Self, String> {
        let (key, algorithm) = DecodingKey::from_rsa_pem(pem)
            .map(|k| (k, Algorithm::RS256))
            .or_else(|_| DecodingKey::from_ec_pem(pem).map(|k| (k, Algorithm::ES256)))
            .map_err(|_| "an RSA or P-256 public key in PEM".to_owned())?;
        let key = Key {
            kid: None,
            algorithm,
            key,
            validation: rules.validation(algorithm),
        };
        Ok(Self::new(vec![key], Vec::new(), Vec::new()))
    }

    /// A JWKS document; `Err` says why none of it can be used.
    pub fn jwks(document: &[u8], rules: &Rules) -> Result<Self, String> {
        let document: Document =
            serde_json::from_slice(document).map_err(|e| format!("not a JWKS document ({e})"))?;
        if document.keys.len() > MAX_JWKS_KEYS {
            return Err(format!(
                "too many keys ({}; at most {MAX_JWKS_KEYS})",
                document.keys.len()
            ));
        }
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        let mut fingerprint = Vec::new();
        for value in document.keys {
            let kid = value
                .get("kid")
                .and_then(|k| k.as_str())
                .unwrap_or("(no kid)")
                .chars()
                .take(64)
                .collect::<String>();
            let published = value.to_string();
            match usable(value, rules) {
                Ok(key) => {
                    keys.push(key);
                    fingerprint.push(published);
                }
                Err(why) => skipped.push(format!("{kid}: {why}")),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "no usable signing key ({})",
                if skipped.is_empty() {
                    "the set is empty".to_owned()
                } else {
                    skipped.join("; ")
                }
            ));
        }
        fingerprint.sort();
        Ok(Self::new(keys, skipped, fingerprint))
    }

    /// Whether `other` holds the same usable keys as this set.
    pub fn same_keys(&self, other: &KeySet) -> bool {
        !self.fingerprint.is_empty() && self.fingerprint == other.fingerprint
    }

    /// The key for a token whose header says `kid` and `algorithm`. A key without a
    /// `kid` (a PEM key, a secret, or a set's only key) serves tokens with or without one.
    pub fn find(&self, kid: Option<&str>, algorithm: Algorithm) -> Lookup<'_> {
        let fits = |key: &&Key| key.algorithm == algorithm;
        if let Some(kid) = kid {
            let mut named = self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .peekable();
            if named.peek().is_some() {
                return named.find(fits).map_or(Lookup::NoMatch, Lookup::Found);
            }
        }
        match (self.keys.as_slice(), kid) {
            ([only], _) if only.kid.is_none() => Some(only).filter(fits),
            ([only], None) => Some(only).filter(fits),
            (_, Some(_)) => return Lookup::UnknownKid,
            _ => None,
        }
        .map_or(Lookup::NoMatch, Lookup::Found)
    }

    /// `kid:alg` of every key, for the logs.
    pub fn describe(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| format!("{}:{:?}", k.kid.as_deref().unwrap_or("-"), k.algorithm))
            .collect()
    }

    /// The algorithms in use, for `Debug`.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        self.keys.iter().map(|k| k.algorithm).collect()
    }
}

/// The key a JWK describes, if the JWK allows verifying signatures with it.
fn usable(value: serde_json::Value, rules: &Rules) -> Result<Key, String> {
    let jwk: Jwk = serde_json::from_value(value).map_err(|e| format!("not a usable JWK ({e})"))?;
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(other) => return Err(format!("use is {other:?}, not sig")),
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return Err("key_ops does not include verify".into());
        }
    }
    let alg = jwk.common.key_algorithm;
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            // Base64url without padding: 4 characters per 3 bytes.
            let modulus_bytes = rsa.n.trim_end_matches('=').len() * 3 / 4;
            if modulus_bytes < MIN_RSA_MODULUS_BYTES {
                return Err(format!(
                    "an RSA key of about {} bits (at least 2048 required)",
                    modulus_bytes * 8
                ));
            }
            match alg {
                None | Some(KeyAlgorithm::RS256) => Algorithm::RS256,
                Some(KeyAlgorithm::RS384) => Algorithm::RS384,
                Some(KeyAlgorithm::RS512) => Algorithm::RS512,
                Some(KeyAlgorithm::PS256) => Algorithm::PS256,
                Some(KeyAlgorithm::PS384) => Algorithm::PS384,
                Some(KeyAlgorithm::PS512) => Algorithm::PS512,
                Some(other) => return Err(format!("alg {other} does not fit an RSA key")),
            }
        }
        AlgorithmParameters::EllipticCurve(ec) => {
            let (by_curve, named) = match ec.curve {
                EllipticCurve::P256 => (Algorithm::ES256, KeyAlgorithm::ES256),
                EllipticCurve::P384 => (Algorithm::ES384, KeyAlgorithm::ES384),
                ref other => return Err(format!("unsupported curve {other:?}")),
            };
            match alg {
                None => by_curve,
                Some(a) if a == named => by_curve,
                Some(a) => return Err(format!("alg {a} contradicts the curve {:?}", ec.curve)),
            }
        }
        AlgorithmParameters::OctetKeyPair(okp) => match (&okp.curve, alg) {
            (EllipticCurve::Ed25519, None | Some(KeyAlgorithm::EdDSA)) => Algorithm::EdDSA,
            (curve, alg) => return Err(format!("unsupported OKP key ({curve:?}, {alg:?})")),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric key: never trusted from a key set".into())
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unreadable key ({e})"))?;
    Ok(Key {
        kid: jwk.common.key_id,
        algorithm,
        key,
        validation: rules.validation(algorithm),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> Rules {
        Rules {
            audience: Audience::Any,
            issuer: None,
        }
    }

    fn rsa_jwk(kid: &str) -> serde_json::Value {
        let pem = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rsa-private.pem"),
        )
        .unwrap();
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap();
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        jwk
    }

    #[test]
    fn lookup_by_kid_and_algorithm() {
        let set = KeySet::jwks(
            json!({"keys": [rsa_jwk("a"), rsa_jwk("b")]})
                .to_string()
                .as_bytes(),
            &rules(),
        )
        .unwrap();
        let cases = [
            (Some("a"), Algorithm::RS256, "found", "a known kid"),
            (
                Some("a"),
                Algorithm::ES256,
                "no match",
                "a known kid, another alg",
            ),
            (Some("c"), Algorithm::RS256, "unknown", "an unknown kid"),
            (
                None,
                Algorithm::RS256,
                "no match",
                "no kid among several keys",
            ),
        ];
        for (kid, alg, expected, why) in cases {
            let got = match set.find(kid, alg) {
                Lookup::Found(_) => "found",
                Lookup::UnknownKid => "unknown",
                Lookup::NoMatch => "no match",
            };
            assert_eq!(got, expected, "{why}");
        }
        let one = KeySet::jwks(
            json!({"keys": [rsa_jwk("a")]}).to_string().as_bytes(),
            &rules(),
        )
        .unwrap();
        assert!(
            matches!(one.find(None, Algorithm::RS256), Lookup::Found(_)),
            "a set's only key serves a token without kid"
        );
        assert!(
            matches!(one.find(Some("z"), Algorithm::RS256), Lookup::UnknownKid),
            "…but a token naming another kid is for a key not seen yet"
        );
    }

    #[test]
    fn sets_are_told_apart_by_their_keys() {
        let doc = |keys: serde_json::Value| json!({ "keys": keys }).to_string();
        let a = KeySet::jwks(doc(json!([rsa_jwk("a")])).as_bytes(), &rules()).unwrap();
        let again = KeySet::jwks(doc(json!([rsa_jwk("a")])).as_bytes(), &rules()).unwrap();
        let b = KeySet::jwks(doc(json!([rsa_jwk("b")])).as_bytes(), &rules()).unwrap();
        assert!(a.same_keys(&again) && !a.same_keys(&b));
        assert_ne!(a.generation, again.generation);
    }
}
