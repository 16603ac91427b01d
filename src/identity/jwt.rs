//! JWT identity source (SPEC §2 `type: jwt`, §3): verifies `Bearer <jwt>` and
//! extracts the tenant (and optionally tier) claim.
//!
//! All cryptography and base64 handling is done by `jsonwebtoken`; this module
//! only loads key material, prebuilds the [`Validation`]s once, picks the key
//! for a token and maps `jsonwebtoken` errors to short client-facing messages
//! ([`JwtError`]), which never contain key material or internal details.
//! Requests go through `JwtSource::identify`, which remembers the tokens
//! that verified until their `exp` (module `verified`), so a client's next
//! requests skip the signature check.
//!
//! Security rules enforced here:
//!
//! * `alg` must be one of the configured algorithms, *and* one the loaded key
//!   can verify. `alg: none` never parses as an algorithm, so it is always
//!   rejected. An HMAC token signed with an RSA public key as the secret is
//!   rejected by a public-key source, because HMAC algorithms are never in its
//!   list (config validation forbids mixing them with public-key algorithms).
//! * `exp` is required and checked; `nbf` is checked when present; the
//!   configured leeway replaces `jsonwebtoken`'s 60 s default; `iss` and `aud`
//!   are required and checked only when configured. `exp`/`nbf` that are not
//!   numbers are rejected.
//! * Tokens longer than [`MAX_TOKEN_BYTES`] are refused before any parsing.
//! * Keys are parsed and checked at construction, so a bad key file is a
//!   startup error rather than a 401 on every request (and never a panic).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::verified::VerifiedTokens;
use super::{IdentityError, TenantId};
use crate::config::{JwtConfig, KeySource};

/// Longest accepted token (the part after `Bearer `), in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A configured JWT source, ready to verify tokens.
pub struct JwtSource {
    header: HeaderName,
    keys: Keys,
    tenant_claim: Arc<str>,
    tier_claim: Option<String>,
    /// The tokens that verified (see [`VerifiedTokens`]).
    verified: VerifiedTokens,
}

/// Verification keys with their prebuilt validations.
enum Keys {
    /// One key (HMAC secret or PEM public key). `validation.algorithms` holds
    /// exactly the configured algorithms this key can verify, all of one
    /// family, so `jsonwebtoken::decode` can be called directly.
    Single {
        key: DecodingKey,
        validation: Validation,
    },
    /// A JWKS document: the key is chosen by `kid`. `jsonwebtoken` requires
    /// every algorithm of a `Validation` to match the key's family, and a JWKS
    /// may mix families, so there is one `Validation` per algorithm.
    Set {
        by_kid: HashMap<String, SetKey>,
        /// The set's only key, usable by tokens without `kid`.
        sole: Option<SetKey>,
        validations: Vec<(Algorithm, Validation)>,
    },
}

/// One usable JWKS key.
struct SetKey {
    key: DecodingKey,
    /// Configured algorithms this key verifies (and its `alg`, if any, allows).
    algorithms: Vec<Algorithm>,
}

/// The identity a verified token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedClaims {
    /// Value of the tenant claim (not yet checked against the tenant alphabet).
    pub tenant: String,
    /// Value of the tier claim, when configured, present and a string.
    pub tier: Option<String>,
}

/// Why a token was refused. `Display` is the sentence sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// The header value is not `Bearer <token>`.
    #[error("missing Bearer scheme")]
    MissingBearer,
    /// The token is longer than [`MAX_TOKEN_BYTES`].
    #[error("token too large")]
    TooLarge,
    /// Not a well-formed JWS compact token (parts, base64, JSON).
    #[error("malformed token")]
    Malformed,
    /// `alg` is `none`, unknown, or not accepted by this source.
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    /// `alg` is accepted by the source but not by the key the token selected.
    #[error("algorithm does not match the key")]
    KeyMismatch,
    /// The token has no `kid` and the key set has several keys.
    #[error("missing key id")]
    MissingKeyId,
    /// The token's `kid` is not in the key set.
    #[error("unknown key id")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` does not contain the configured audience.
    #[error("wrong audience")]
    WrongAudience,
    /// A required registered claim (`exp`, `iss`, `aud`) is absent, or of a
    /// type jsonwebtoken cannot read (it reports both the same way, e.g. a
    /// string `exp`).
    #[error("missing or invalid `{0}` claim")]
    MissingClaim(&'static str),
    /// An optional time claim (`nbf`) is present but not a number.
    #[error("invalid `{0}` claim")]
    InvalidClaim(&'static str),
    /// The configured tenant claim is absent.
    #[error("missing tenant claim `{0}`")]
    MissingTenant(Arc<str>),
    /// The configured tenant claim is not a JSON string.
    #[error("tenant claim `{0}` is not a string")]
    TenantNotString(Arc<str>),
}

impl JwtSource {
    /// Builds the source; loads key material. `env` resolves env var names
    /// (return `None` = unset). The error is a human message naming the
    /// setting at fault (the caller adds the YAML path).
    pub fn from_config(
        cfg: &JwtConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<JwtSource, String> {
        if cfg.algorithms.is_empty() {
            return Err("`algorithms` must list at least one algorithm".to_owned());
        }
        let keys = match &cfg.key {
            KeySource::SecretEnv(name) => {
                let secret = env(name).ok_or_else(|| {
                    format!("environment variable `{name}` (secret_env) is not set")
                })?;
                if secret.is_empty() {
                    return Err(format!(
                        "environment variable `{name}` (secret_env) is empty"
                    ));
                }
                let key = DecodingKey::from_secret(secret.as_bytes());
                let algorithms = usable_algorithms(&key, &cfg.algorithms);
                if algorithms.is_empty() {
                    return Err(format!(
                        "secret_env `{name}` is an HMAC secret, which cannot verify {}",
                        alg_list(&cfg.algorithms)
                    ));
                }
                Keys::Single {
                    key,
                    validation: validation(cfg, algorithms),
                }
            }
            KeySource::PublicKeyFile(path) => {
                let (key, algorithms) = load_pem(path, &cfg.algorithms)?;
                Keys::Single {
                    key,
                    validation: validation(cfg, algorithms),
                }
            }
            KeySource::JwksFile(path) => load_jwks(cfg, path)?,
        };
        Ok(JwtSource {
            header: cfg.header.clone(),
            keys,
            tenant_claim: Arc::from(cfg.tenant_claim.as_str()),
            tier_claim: cfg.tier_claim.clone(),
            verified: VerifiedTokens::new(cfg.leeway.as_secs()),
        })
    }

    /// The header this source reads.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Verifies `Bearer <jwt>` (scheme case-insensitive) and returns the
    /// tenant and tier claims. Every call verifies in full; requests go
    /// through `JwtSource::identify`, which remembers the tokens that
    /// verified.
    pub fn verify(&self, value: &HeaderValue) -> Result<VerifiedClaims, JwtError> {
        let token = bearer_token(value.as_bytes())?;
        self.decode(token).map(|(claims, _)| claims)
    }

    /// The tenant and claimed tier of the request whose header this source
    /// reads is `value`: from the tokens that verified before and still
    /// hold (see [`VerifiedTokens`]), else by verifying `value` and
    /// keeping the result. `known` as for [`TenantId::claimed`].
    pub(super) fn identify(
        &self,
        value: &HeaderValue,
        known: Option<&TenantId>,
    ) -> Result<(TenantId, Option<Arc<str>>), IdentityError> {
        let token = bearer_token(value.as_bytes()).map_err(IdentityError::InvalidToken)?;
        let now = unix_now();
        if let Some(hit) = self.verified.get(token, now) {
            return Ok(hit);
        }
        let (claims, times) = self.decode(token).map_err(IdentityError::InvalidToken)?;
        let tenant = TenantId::claimed(&claims.tenant, known)?;
        let tier = claims.tier.map(Arc::<str>::from);
        if let Some((exp, nbf)) = times {
            self.verified
                .insert(token, tenant.clone(), tier.clone(), exp, nbf, now);
        }
        Ok((tenant, tier))
    }

    /// Verifies `token`; with the claims, its `exp` and `nbf` as
    /// jsonwebtoken read them (`None`: not readable so, never the case for
    /// a token that verified).
    fn decode(&self, token: &[u8]) -> Result<(VerifiedClaims, Option<TokenTimes>), JwtError> {
        let data = match &self.keys {
            Keys::Single { key, validation } => {
                jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
            }
            Keys::Set {
                by_kid,
                sole,
                validations,
            } => {
                let header = jsonwebtoken::decode_header(token).map_err(map_error)?;
                let validation = validations
                    .iter()
                    .find(|(alg, _)| *alg == header.alg)
                    .map(|(_, v)| v)
                    .ok_or(JwtError::AlgorithmNotAllowed)?;
                let set_key = match header.kid.as_deref() {
                    Some(kid) => by_kid.get(kid).ok_or(JwtError::UnknownKey)?,
                    None => sole.as_ref().ok_or(JwtError::MissingKeyId)?,
                };
                if !set_key.algorithms.contains(&header.alg) {
                    return Err(JwtError::KeyMismatch);
                }
                jsonwebtoken::decode::<Map<String, Value>>(token, &set_key.key, validation)
            }
        };
        let mut claims = data.map_err(map_error)?.claims;
        let times = match (
            claims.get("exp").map(numeric),
            claims.get("nbf").map(numeric),
        ) {
            (Some(Some(exp)), None) => Some((exp, None)),
            (Some(Some(exp)), Some(Some(nbf))) => Some((exp, Some(nbf))),
            _ => None,
        };

        let tenant = match claims.remove(&*self.tenant_claim) {
            Some(Value::String(tenant)) => tenant,
            Some(_) => return Err(JwtError::TenantNotString(self.tenant_claim.clone())),
            None => return Err(JwtError::MissingTenant(self.tenant_claim.clone())),
        };
        let tier = match self.tier_claim.as_deref().and_then(|c| claims.remove(c)) {
            Some(Value::String(tier)) => Some(tier),
            _ => None,
        };
        Ok((VerifiedClaims { tenant, tier }, times))
    }
}

/// A verified token's `exp` and `nbf`, in Unix seconds.
type TokenTimes = (u64, Option<u64>);

/// A time claim as jsonwebtoken reads it (`validation.rs`, `numeric_type`):
/// a whole number as is, a fractional one rounded; `None` for anything it
/// would refuse.
fn numeric(v: &Value) -> Option<u64> {
    let Value::Number(n) = v else { return None };
    if let Some(u) = n.as_u64() {
        return Some(u);
    }
    if n.is_i64() {
        return None;
    }
    let f = n.as_f64()?;
    (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then(|| f.round() as u64)
}

/// The wall clock in Unix seconds, the clock jsonwebtoken checks `exp`
/// and `nbf` against.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl fmt::Debug for JwtSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("JwtSource");
        d.field("header", &self.header);
        match &self.keys {
            Keys::Single { key, validation } => d
                .field("family", &key.family())
                .field("algorithms", &validation.algorithms),
            Keys::Set { by_kid, sole, .. } => d
                .field("kids", &by_kid.keys().collect::<Vec<_>>())
                .field("sole_key", &sole.is_some()),
        };
        d.field("tenant_claim", &self.tenant_claim)
            .field("tier_claim", &self.tier_claim)
            .finish()
    }
}

/// Splits `Bearer <token>` (scheme case-insensitive, one or more spaces) and
/// caps the token length before anything parses it.
fn bearer_token(value: &[u8]) -> Result<&[u8], JwtError> {
    let value = value.trim_ascii();
    let space = value
        .iter()
        .position(|&b| b == b' ')
        .ok_or(JwtError::MissingBearer)?;
    if !value[..space].eq_ignore_ascii_case(b"bearer") {
        return Err(JwtError::MissingBearer);
    }
    let token = value[space..].trim_ascii_start();
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::TooLarge);
    }
    if token.is_empty() {
        return Err(JwtError::Malformed);
    }
    Ok(token)
}

/// Maps a `jsonwebtoken` error to the client-facing reason.
fn map_error(err: jsonwebtoken::errors::Error) -> JwtError {
    match err.kind() {
        ErrorKind::InvalidSignature => JwtError::BadSignature,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
        ErrorKind::InvalidAudience => JwtError::WrongAudience,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => JwtError::AlgorithmNotAllowed,
        // The verifier refused the key for this algorithm (e.g. a P-256 key
        // and ES384); keys are pre-checked, so this is only a safety net.
        ErrorKind::InvalidKeyFormat
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_) => JwtError::KeyMismatch,
        ErrorKind::MissingRequiredClaim(claim) => match registered_claim(claim) {
            Some(claim) => JwtError::MissingClaim(claim),
            None => JwtError::Malformed,
        },
        ErrorKind::InvalidClaimFormat(claim) => match registered_claim(claim) {
            Some(claim) => JwtError::InvalidClaim(claim),
            None => JwtError::Malformed,
        },
        // The header's `alg` is deserialized into `jsonwebtoken::Algorithm`,
        // which has no `none` variant: `alg: none` (or any unknown name)
        // surfaces as a serde "unknown variant" error while parsing the header.
        // Claims are a JSON map, which never produces that error.
        ErrorKind::Json(e)
            if e.classify() == serde_json::error::Category::Data
                && e.to_string().starts_with("unknown variant") =>
        {
            JwtError::AlgorithmNotAllowed
        }
        _ => JwtError::Malformed,
    }
}

fn registered_claim(name: &str) -> Option<&'static str> {
    ["exp", "nbf", "iss", "aud", "sub"]
        .into_iter()
        .find(|c| *c == name)
}

/// The prebuilt validation for `algorithms` (one family).
fn validation(cfg: &JwtConfig, algorithms: Vec<Algorithm>) -> Validation {
    let mut v = Validation::new(algorithms[0]);
    v.algorithms = algorithms;
    v.leeway = cfg.leeway.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(iss) = &cfg.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    match &cfg.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            v.validate_aud = true;
            required.push("aud");
        }
        None => v.validate_aud = false,
    }
    v.set_required_spec_claims(&required);
    v
}

/// The configured algorithms that `key` can verify, checked by building
/// `jsonwebtoken`'s verifier for each (which parses EC/Ed points) and, for
/// every family, by extracting the public components (which parses RSA DER
/// and checks EC/Ed key lengths; `jsonwebtoken` would panic on a short Ed
/// key at verification time).
fn usable_algorithms(key: &DecodingKey, wanted: &[Algorithm]) -> Vec<Algorithm> {
    if Jwk::from_decoding_key(key, None).is_err() {
        return Vec::new();
    }
    let mut out: Vec<Algorithm> = Vec::new();
    for &alg in wanted {
        if alg.family() == key.family()
            && !out.contains(&alg)
            && jsonwebtoken::crypto::verify("", b"", key, alg).is_ok()
        {
            out.push(alg);
        }
    }
    out
}

fn alg_list(algorithms: &[Algorithm]) -> String {
    algorithms
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join("/")
}

/// Loads a PEM public key, trying the families of the configured algorithms
/// in order.
fn load_pem(path: &Path, wanted: &[Algorithm]) -> Result<(DecodingKey, Vec<Algorithm>), String> {
    let shown = path.display();
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read public_key_file `{shown}`: {}", io_reason(&e)))?;
    if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
        return Err(format!(
            "public_key_file `{shown}` holds a private key; give the public key (`openssl pkey -pubout`)"
        ));
    }
    let mut families: Vec<AlgorithmFamily> = Vec::new();
    for alg in wanted {
        if !families.contains(&alg.family()) {
            families.push(alg.family());
        }
    }
    for family in families {
        let key = match family {
            AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&pem),
            AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&pem),
            AlgorithmFamily::Ed => DecodingKey::from_ed_pem(&pem),
            AlgorithmFamily::Hmac => continue,
        };
        if let Ok(key) = key {
            let algorithms = usable_algorithms(&key, wanted);
            if !algorithms.is_empty() {
                return Ok((key, algorithms));
            }
        }
    }
    Err(format!(
        "public_key_file `{shown}` is not a PEM RSA/EC/Ed25519 public key for {}",
        alg_list(wanted)
    ))
}

/// Loads a JWKS document. Keys marked `use: enc`, of a family none of the
/// configured algorithms needs, or whose `alg` is not configured, are
/// skipped; malformed keys of a needed family are errors.
fn load_jwks(cfg: &JwtConfig, path: &Path) -> Result<Keys, String> {
    let shown = path.display();
    let text = std::fs::read(path)
        .map_err(|e| format!("cannot read jwks_file `{shown}`: {}", io_reason(&e)))?;
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|e| format!("jwks_file `{shown}` is not a JWKS document: {e}"))?;

    let mut usable: Vec<(Option<&String>, SetKey)> = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let kid = jwk.common.key_id.as_ref();
        let name = match kid {
            Some(kid) => format!("key `{kid}`"),
            None => format!("key #{i}"),
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let declared = jwk.common.key_algorithm;
        let wanted: Vec<Algorithm> = match declared {
            None => cfg.algorithms.clone(),
            Some(ka) => match Algorithm::try_from(ka) {
                Ok(a) if cfg.algorithms.contains(&a) => vec![a],
                _ => continue,
            },
        };
        let key = match DecodingKey::from_jwk(jwk) {
            Ok(key) => key,
            Err(_) if matches!(jwk.algorithm, AlgorithmParameters::Other(_)) => continue,
            Err(_) => return Err(format!("jwks_file `{shown}`: {name} is malformed")),
        };
        if !wanted.iter().any(|a| a.family() == key.family()) {
            continue;
        }
        let algorithms = usable_algorithms(&key, &wanted);
        if algorithms.is_empty() {
            if declared.is_some() {
                return Err(format!(
                    "jwks_file `{shown}`: {name} is not a valid key for {}",
                    alg_list(&wanted)
                ));
            }
            // No declared `alg` and no configured algorithm can use it,
            // e.g. a P-384 key when only ES256 is accepted.
            continue;
        }
        usable.push((kid, SetKey { key, algorithms }));
    }
    if usable.is_empty() {
        return Err(format!(
            "jwks_file `{shown}` has no signing key usable with {}",
            alg_list(&cfg.algorithms)
        ));
    }
    if usable.len() > 1 && usable.iter().any(|(kid, _)| kid.is_none()) {
        return Err(format!(
            "jwks_file `{shown}`: every key needs a `kid` when the set has more than one"
        ));
    }
    let sole = match usable.as_slice() {
        [(_, only)] => Some(SetKey {
            key: only.key.clone(),
            algorithms: only.algorithms.clone(),
        }),
        _ => None,
    };
    let mut by_kid: HashMap<String, SetKey> = HashMap::new();
    for (kid, set_key) in usable {
        if let Some(kid) = kid
            && by_kid.insert(kid.clone(), set_key).is_some()
        {
            return Err(format!("jwks_file `{shown}`: duplicate kid `{kid}`"));
        }
    }

    let mut validations = Vec::new();
    for &alg in &cfg.algorithms {
        if validations.iter().all(|(a, _)| *a != alg) {
            validations.push((alg, validation(cfg, vec![alg])));
        }
    }
    Ok(Keys::Set {
        by_kid,
        sole,
        validations,
    })
}

/// The OS reason without the "(os error N)" suffix.
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use jsonwebtoken::{EncodingKey, Header, get_current_timestamp};
    use serde_json::json;

    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt/", $name)
        };
    }

    const SECRET: &str = "test-secret-0123456789abcdef0123456789";
    const SECRET_ENV: &str = "TIERGATE_JWT_SECRET";

    fn env(name: &str) -> Option<String> {
        (name == SECRET_ENV).then(|| SECRET.to_owned())
    }

    fn config(algorithms: &[Algorithm], key: KeySource) -> JwtConfig {
        JwtConfig {
            header: HeaderName::from_static("authorization"),
            algorithms: algorithms.to_vec(),
            key,
            issuer: None,
            audience: None,
            tenant_claim: "tenant_id".to_owned(),
            tier_claim: Some("tier".to_owned()),
            leeway: Duration::from_secs(30),
        }
    }

    fn hs256_config() -> JwtConfig {
        config(
            &[Algorithm::HS256],
            KeySource::SecretEnv(SECRET_ENV.to_owned()),
        )
    }

    fn source(cfg: &JwtConfig) -> JwtSource {
        JwtSource::from_config(cfg, &env).expect("source builds")
    }

    fn hs256() -> JwtSource {
        source(&hs256_config())
    }

    fn pem_source(algorithm: Algorithm, file: &str) -> JwtSource {
        source(&config(
            &[algorithm],
            KeySource::PublicKeyFile(PathBuf::from(file)),
        ))
    }

    fn jwks_source(file: &str) -> JwtSource {
        source(&config(
            &[Algorithm::RS256, Algorithm::ES256],
            KeySource::JwksFile(PathBuf::from(file)),
        ))
    }

    fn read(path: &str) -> Vec<u8> {
        std::fs::read(path).expect("fixture exists")
    }

    fn now() -> u64 {
        get_current_timestamp()
    }

    /// Claims with a tenant, a tier and an `exp` an hour away.
    fn claims() -> Value {
        json!({ "tenant_id": "acme", "tier": "enterprise", "exp": now() + 3600 })
    }

    fn sign_kid(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).expect("test token encodes")
    }

    fn sign(alg: Algorithm, claims: &Value, key: &EncodingKey) -> String {
        sign_kid(alg, None, claims, key)
    }

    fn hs(claims: &Value) -> String {
        sign(
            Algorithm::HS256,
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
    }

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).expect("valid header value")
    }

    fn rsa_key() -> EncodingKey {
        EncodingKey::from_rsa_pem(&read(fixture!("rsa_private.pem"))).unwrap()
    }

    fn ec_key() -> EncodingKey {
        EncodingKey::from_ec_pem(&read(fixture!("ec_private.pem"))).unwrap()
    }

    fn acme_enterprise() -> VerifiedClaims {
        VerifiedClaims {
            tenant: "acme".to_owned(),
            tier: Some("enterprise".to_owned()),
        }
    }

    /// The happy path: a valid HS256 token yields its tenant and tier claims.
    #[test]
    fn hs256_valid_with_tenant_and_tier() {
        let src = hs256();
        assert_eq!(src.header(), "authorization");
        assert_eq!(src.verify(&bearer(&hs(&claims()))), Ok(acme_enterprise()));
    }

    /// The scheme is case-insensitive (RFC 7235) and tolerates extra spaces.
    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let token = hs(&claims());
        for value in [format!("bearer {token}"), format!("BEARER   {token}")] {
            let value = HeaderValue::from_str(&value).unwrap();
            assert_eq!(hs256().verify(&value), Ok(acme_enterprise()));
        }
    }

    /// A token without the Bearer scheme (or another scheme) is refused.
    #[test]
    fn missing_bearer_scheme() {
        let src = hs256();
        let token = hs(&claims());
        for value in [token.clone(), format!("Basic {token}"), "Bearer".to_owned()] {
            let value = HeaderValue::from_str(&value).unwrap();
            assert_eq!(
                src.verify(&value),
                Err(JwtError::MissingBearer),
                "{value:?}"
            );
        }
    }

    /// Garbage after `Bearer` is a clean error, not a panic.
    #[test]
    fn malformed_token() {
        let src = hs256();
        for token in [
            "abc",
            "a.b",
            "a.b.c",
            "a.b.c.d",
            "...",
            "eyJhbGciOiJIUzI1NiJ9.!!.x",
        ] {
            assert_eq!(
                src.verify(&bearer(token)),
                Err(JwtError::Malformed),
                "{token}"
            );
        }
    }

    /// A tier claim that is not a string is treated as absent, not an error.
    #[test]
    fn non_string_tier_is_ignored() {
        let token = hs(&json!({ "tenant_id": "acme", "tier": 3, "exp": now() + 60 }));
        let got = hs256().verify(&bearer(&token)).unwrap();
        assert_eq!(got.tier, None);
        let token = hs(&json!({ "tenant_id": "acme", "exp": now() + 60 }));
        assert_eq!(hs256().verify(&bearer(&token)).unwrap().tier, None);
    }

    /// An expired token (100 s past `exp`, beyond the 30 s leeway) is refused.
    #[test]
    fn expired() {
        let token = hs(&json!({ "tenant_id": "acme", "exp": now() - 100 }));
        assert_eq!(hs256().verify(&bearer(&token)), Err(JwtError::Expired));
    }

    /// The configured leeway replaces jsonwebtoken's 60 s default, both ways.
    #[test]
    fn leeway_comes_from_config() {
        let token = hs(&json!({ "tenant_id": "acme", "exp": now() - 10 }));
        assert!(
            hs256().verify(&bearer(&token)).is_ok(),
            "within 30 s leeway"
        );
        let token = hs(&json!({ "tenant_id": "acme", "exp": now() - 45 }));
        assert_eq!(hs256().verify(&bearer(&token)), Err(JwtError::Expired));
    }

    /// `nbf` in the future (beyond leeway) is refused; `nbf` is validated.
    #[test]
    fn nbf_in_future() {
        let token = hs(&json!({ "tenant_id": "acme", "exp": now() + 3600, "nbf": now() + 600 }));
        assert_eq!(hs256().verify(&bearer(&token)), Err(JwtError::NotYetValid));
        let token = hs(&json!({ "tenant_id": "acme", "exp": now() + 3600, "nbf": now() - 5 }));
        assert!(hs256().verify(&bearer(&token)).is_ok());
    }

    /// A token without `exp` is refused: `exp` is required.
    #[test]
    fn missing_exp() {
        let token = hs(&json!({ "tenant_id": "acme" }));
        assert_eq!(
            hs256().verify(&bearer(&token)),
            Err(JwtError::MissingClaim("exp"))
        );
    }

    /// `exp`/`nbf` as strings are refused rather than ignored (jsonwebtoken
    /// reports an unreadable required `exp` as missing).
    #[test]
    fn exp_as_string() {
        let far = (now() + 3600).to_string();
        let token = hs(&json!({ "tenant_id": "acme", "exp": far }));
        assert_eq!(
            hs256().verify(&bearer(&token)),
            Err(JwtError::MissingClaim("exp"))
        );
        let token = hs(&json!({ "tenant_id": "acme", "exp": now() + 3600, "nbf": "0" }));
        assert_eq!(
            hs256().verify(&bearer(&token)),
            Err(JwtError::InvalidClaim("nbf"))
        );
    }

    /// A token signed with another secret is refused.
    #[test]
    fn bad_signature() {
        let other = EncodingKey::from_secret(b"some-other-secret");
        let token = sign(Algorithm::HS256, &claims(), &other);
        assert_eq!(hs256().verify(&bearer(&token)), Err(JwtError::BadSignature));
    }

    /// Tampering with the payload of a valid token breaks the signature.
    #[test]
    fn tampered_payload() {
        let token = hs(&claims());
        let other = hs(&json!({ "tenant_id": "globex", "exp": now() + 3600 }));
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = other.split('.').nth(1).unwrap();
        let forged = parts.join(".");
        assert_eq!(
            hs256().verify(&bearer(&forged)),
            Err(JwtError::BadSignature)
        );
    }

    /// An unsigned `alg: none` token is refused with a clear reason (it fails
    /// while jsonwebtoken parses the header) on both key paths.
    #[test]
    fn alg_none_rejected() {
        // `{"alg":"none"}` and `{"alg":"none","typ":"JWT"}`, base64url.
        let payload = hs(&claims()).split('.').nth(1).unwrap().to_owned();
        for header in ["eyJhbGciOiJub25lIn0", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"] {
            let token = format!("{header}.{payload}.");
            assert_eq!(
                hs256().verify(&bearer(&token)),
                Err(JwtError::AlgorithmNotAllowed)
            );
            assert_eq!(
                jwks_source(fixture!("jwks.json")).verify(&bearer(&token)),
                Err(JwtError::AlgorithmNotAllowed)
            );
        }
    }

    /// A supported algorithm that is not in the source's list is refused.
    #[test]
    fn alg_not_in_list() {
        let token = sign(
            Algorithm::HS384,
            &claims(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        );
        assert_eq!(
            hs256().verify(&bearer(&token)),
            Err(JwtError::AlgorithmNotAllowed)
        );
    }

    /// `iss` is checked when configured (and then required).
    #[test]
    fn wrong_issuer() {
        let mut cfg = hs256_config();
        cfg.issuer = Some("https://auth.example.com".to_owned());
        let src = source(&cfg);
        let mut c = claims();
        c["iss"] = json!("https://evil.example.com");
        assert_eq!(src.verify(&bearer(&hs(&c))), Err(JwtError::WrongIssuer));
        assert_eq!(
            src.verify(&bearer(&hs(&claims()))),
            Err(JwtError::MissingClaim("iss"))
        );
        c["iss"] = json!("https://auth.example.com");
        assert_eq!(src.verify(&bearer(&hs(&c))), Ok(acme_enterprise()));
    }

    /// `aud` is checked when configured (string or array), ignored otherwise.
    #[test]
    fn wrong_audience() {
        let mut cfg = hs256_config();
        cfg.audience = Some("api".to_owned());
        let src = source(&cfg);
        let mut c = claims();
        c["aud"] = json!("other");
        assert_eq!(src.verify(&bearer(&hs(&c))), Err(JwtError::WrongAudience));
        assert_eq!(
            src.verify(&bearer(&hs(&claims()))),
            Err(JwtError::MissingClaim("aud"))
        );
        c["aud"] = json!(["other", "api"]);
        assert_eq!(src.verify(&bearer(&hs(&c))), Ok(acme_enterprise()));
        // Without a configured audience, any `aud` is accepted.
        c["aud"] = json!("other");
        assert_eq!(hs256().verify(&bearer(&hs(&c))), Ok(acme_enterprise()));
    }

    /// A verified token without the tenant claim (or a non-string one) is
    /// refused, naming the claim.
    #[test]
    fn missing_tenant_claim() {
        let token = hs(&json!({ "sub": "acme", "exp": now() + 60 }));
        let err = hs256().verify(&bearer(&token)).unwrap_err();
        assert_eq!(err.to_string(), "missing tenant claim `tenant_id`");
        let token = hs(&json!({ "tenant_id": 42, "exp": now() + 60 }));
        assert_eq!(
            hs256().verify(&bearer(&token)),
            Err(JwtError::TenantNotString(Arc::from("tenant_id")))
        );
    }

    /// RS256 with a PEM public key verifies tokens signed by its private key.
    #[test]
    fn rs256_valid() {
        let src = pem_source(Algorithm::RS256, fixture!("rsa_public.pem"));
        let token = sign(Algorithm::RS256, &claims(), &rsa_key());
        assert_eq!(src.verify(&bearer(&token)), Ok(acme_enterprise()));
    }

    /// The classic RS/HS confusion: an HS256 token whose HMAC secret is the
    /// RSA public key PEM must not pass an RS256 source.
    #[test]
    fn rs_hs_confusion() {
        let src = pem_source(Algorithm::RS256, fixture!("rsa_public.pem"));
        let forged = EncodingKey::from_secret(&read(fixture!("rsa_public.pem")));
        let token = sign(Algorithm::HS256, &claims(), &forged);
        assert_eq!(
            src.verify(&bearer(&token)),
            Err(JwtError::AlgorithmNotAllowed)
        );
    }

    /// ES256 with a PEM public key verifies tokens signed by its private key.
    #[test]
    fn es256_valid() {
        let src = pem_source(Algorithm::ES256, fixture!("ec_public.pem"));
        let token = sign(Algorithm::ES256, &claims(), &ec_key());
        assert_eq!(src.verify(&bearer(&token)), Ok(acme_enterprise()));
    }

    /// EdDSA (Ed25519) with a PEM public key verifies tokens signed by its
    /// private key.
    #[test]
    fn eddsa_valid() {
        let src = pem_source(Algorithm::EdDSA, fixture!("ed_public.pem"));
        let key = EncodingKey::from_ed_pem(&read(fixture!("ed_private.pem"))).unwrap();
        let token = sign(Algorithm::EdDSA, &claims(), &key);
        assert_eq!(src.verify(&bearer(&token)), Ok(acme_enterprise()));
    }

    /// A JWKS source picks the key by `kid`, across key families.
    #[test]
    fn jwks_by_kid() {
        let src = jwks_source(fixture!("jwks.json"));
        let rs = sign_kid(Algorithm::RS256, Some("rsa-1"), &claims(), &rsa_key());
        assert_eq!(src.verify(&bearer(&rs)), Ok(acme_enterprise()));
        let es = sign_kid(Algorithm::ES256, Some("ec-1"), &claims(), &ec_key());
        assert_eq!(src.verify(&bearer(&es)), Ok(acme_enterprise()));
    }

    /// A `kid` that is not in the set is refused.
    #[test]
    fn jwks_unknown_kid() {
        let src = jwks_source(fixture!("jwks.json"));
        let token = sign_kid(Algorithm::RS256, Some("rsa-2"), &claims(), &rsa_key());
        assert_eq!(src.verify(&bearer(&token)), Err(JwtError::UnknownKey));
    }

    /// With several keys a token must name one; with one key it need not.
    #[test]
    fn jwks_kid_optional_only_for_single_key() {
        let token = sign(Algorithm::RS256, &claims(), &rsa_key());
        let multi = jwks_source(fixture!("jwks.json"));
        assert_eq!(multi.verify(&bearer(&token)), Err(JwtError::MissingKeyId));
        let single = jwks_source(fixture!("jwks_single.json"));
        assert_eq!(single.verify(&bearer(&token)), Ok(acme_enterprise()));
    }

    /// A token whose `alg` does not fit the key its `kid` selects is refused
    /// before any signature check (RS256 token naming the EC key).
    #[test]
    fn jwks_alg_must_match_key() {
        let src = jwks_source(fixture!("jwks.json"));
        let token = sign_kid(Algorithm::RS256, Some("ec-1"), &claims(), &rsa_key());
        assert_eq!(src.verify(&bearer(&token)), Err(JwtError::KeyMismatch));
    }

    /// Oversized tokens are refused before any parsing.
    #[test]
    fn too_large() {
        let token = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(hs256().verify(&bearer(&token)), Err(JwtError::TooLarge));
        let padded = hs(&json!({
            "tenant_id": "acme",
            "exp": now() + 60,
            "pad": "x".repeat(MAX_TOKEN_BYTES),
        }));
        assert_eq!(hs256().verify(&bearer(&padded)), Err(JwtError::TooLarge));
    }

    /// Config errors are readable and name the setting: unset secret env var.
    #[test]
    fn from_config_secret_env_unset() {
        let err = JwtSource::from_config(&hs256_config(), &|_| None).unwrap_err();
        assert_eq!(
            err,
            "environment variable `TIERGATE_JWT_SECRET` (secret_env) is not set"
        );
    }

    /// Config errors: an unreadable key file names the file and the reason.
    #[test]
    fn from_config_missing_file() {
        let cfg = config(
            &[Algorithm::RS256],
            KeySource::PublicKeyFile("x.pem".into()),
        );
        let err = JwtSource::from_config(&cfg, &env).unwrap_err();
        assert!(
            err.starts_with("cannot read public_key_file `x.pem`: "),
            "{err}"
        );
        let cfg = config(&[Algorithm::RS256], KeySource::JwksFile("x.json".into()));
        let err = JwtSource::from_config(&cfg, &env).unwrap_err();
        assert!(err.starts_with("cannot read jwks_file `x.json`: "), "{err}");
    }

    /// Config errors: a private key or a key of the wrong type is refused at
    /// startup instead of failing every request.
    #[test]
    fn from_config_wrong_key_type() {
        let cfg = config(
            &[Algorithm::RS256],
            KeySource::PublicKeyFile(fixture!("rsa_private.pem").into()),
        );
        let err = JwtSource::from_config(&cfg, &env).unwrap_err();
        assert!(err.contains("holds a private key"), "{err}");
        let cfg = config(
            &[Algorithm::RS256],
            KeySource::PublicKeyFile(fixture!("ec_public.pem").into()),
        );
        let err = JwtSource::from_config(&cfg, &env).unwrap_err();
        assert!(
            err.ends_with("is not a PEM RSA/EC/Ed25519 public key for RS256"),
            "{err}"
        );
        let cfg = config(
            &[Algorithm::EdDSA],
            KeySource::JwksFile(fixture!("jwks.json").into()),
        );
        let err = JwtSource::from_config(&cfg, &env).unwrap_err();
        assert!(
            err.contains("has no signing key usable with EdDSA"),
            "{err}"
        );
    }

    /// Error messages sent to clients never echo token or key material.
    #[test]
    fn error_messages_are_plain() {
        assert_eq!(JwtError::Expired.to_string(), "token expired");
        assert_eq!(JwtError::BadSignature.to_string(), "bad signature");
        assert_eq!(
            JwtError::AlgorithmNotAllowed.to_string(),
            "algorithm not allowed"
        );
        assert_eq!(JwtError::UnknownKey.to_string(), "unknown key id");
        assert_eq!(
            JwtError::MissingClaim("exp").to_string(),
            "missing or invalid `exp` claim"
        );
    }

    /// A token that verified is remembered: the same token again gives the
    /// same tenant id (the remembered one) without a verification.
    #[test]
    fn identify_remembers_a_token_that_verified() {
        let src = pem_source(Algorithm::RS256, fixture!("rsa_public.pem"));
        let token = sign(Algorithm::RS256, &claims(), &rsa_key());
        let (first, tier) = src.identify(&bearer(&token), None).unwrap();
        assert_eq!(first.as_str(), "acme");
        assert_eq!(tier.as_deref(), Some("enterprise"));
        assert_eq!(src.verified.len(), 1);
        let (again, _) = src.identify(&bearer(&token), None).unwrap();
        assert!(Arc::ptr_eq(&first.0, &again.0), "not the remembered id");
        // The scheme's spelling does not matter; the token's bytes do.
        let (spaced, _) = src
            .identify(
                &HeaderValue::from_str(&format!("bearer   {token}")).unwrap(),
                None,
            )
            .unwrap();
        assert!(Arc::ptr_eq(&first.0, &spaced.0));
        assert_eq!(src.verified.len(), 1);
        // Another token of the same tenant is verified and kept on its own.
        let other = sign(
            Algorithm::RS256,
            &json!({ "tenant_id": "acme", "exp": now() + 60 }),
            &rsa_key(),
        );
        let (_, tier) = src.identify(&bearer(&other), None).unwrap();
        assert_eq!(tier, None);
        assert_eq!(src.verified.len(), 2);
    }

    /// A remembered token whose `exp` has passed is verified again, and
    /// refused with jsonwebtoken's own reason; the entry is dropped.
    #[test]
    fn a_remembered_token_past_its_exp_is_refused_as_expired() {
        let src = hs256();
        let exp = now() - 31;
        let token = hs(&json!({ "tenant_id": "acme", "exp": exp }));
        // As if it had verified while it was valid.
        src.verified.insert(
            token.as_bytes(),
            TenantId::parse("acme").unwrap(),
            None,
            exp,
            None,
            exp,
        );
        assert_eq!(
            src.identify(&bearer(&token), None).unwrap_err(),
            IdentityError::InvalidToken(JwtError::Expired)
        );
        assert_eq!(src.verified.len(), 0);
    }

    /// Only tokens that give an identity are kept: a bad signature, a time
    /// refusal or a tenant id the alphabet refuses is checked every time.
    #[test]
    fn refused_tokens_are_never_remembered() {
        let src = hs256();
        let forged = sign(
            Algorithm::HS256,
            &claims(),
            &EncodingKey::from_secret(b"not-the-secret"),
        );
        let premature = hs(&json!({ "tenant_id": "acme", "exp": now() + 600, "nbf": now() + 300 }));
        let anonymous = hs(&json!({ "tenant_id": "ip:10.0.0.1", "exp": now() + 60 }));
        for _ in 0..2 {
            assert_eq!(
                src.identify(&bearer(&forged), None).unwrap_err(),
                IdentityError::InvalidToken(JwtError::BadSignature)
            );
            assert_eq!(
                src.identify(&bearer(&premature), None).unwrap_err(),
                IdentityError::InvalidToken(JwtError::NotYetValid)
            );
            assert_eq!(
                src.identify(&bearer(&anonymous), None).unwrap_err(),
                IdentityError::InvalidTenant
            );
        }
        assert_eq!(src.verified.len(), 0);
    }

    /// `exp` and `nbf` are read as jsonwebtoken reads them.
    #[test]
    fn time_claims_are_read_like_jsonwebtoken() {
        assert_eq!(numeric(&json!(1_800_000_000u64)), Some(1_800_000_000));
        assert_eq!(numeric(&json!(1_800_000_000.4)), Some(1_800_000_000));
        assert_eq!(numeric(&json!(1_800_000_000.5)), Some(1_800_000_001));
        assert_eq!(numeric(&json!(u64::MAX)), Some(u64::MAX));
        assert_eq!(numeric(&json!(-1)), None);
        assert_eq!(numeric(&json!(-0.5)), None);
        assert_eq!(numeric(&json!("1800000000")), None);
        // The same token both ways: what `decode` reports is what is kept.
        let t = now();
        let token = hs(&json!({ "tenant_id": "acme", "exp": t as f64 + 60.7, "nbf": t - 10 }));
        let (_, times) = hs256().decode(token.as_bytes()).unwrap();
        assert_eq!(times, Some((t + 61, Some(t - 10))));
    }
}
