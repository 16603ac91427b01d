//! `JwtSource::verify` of an HS256 source with a fixed secret.
//!
//! Input: a mode byte, then the rest.
//!
//! * `mode % 4 == 0`: the rest is the Authorization header value, as is.
//! * `1`: the rest is `<header JSON> 0xFF <payload JSON>`; both are
//!   base64url-encoded and signed with the source's secret (HMAC-SHA256), so
//!   arbitrary headers (`alg`, `kid`, `typ`, ...) and claims get past the
//!   signature and reach header and claim handling.
//! * `2`: the rest is the payload JSON, under `{"alg":"HS256","typ":"JWT"}`,
//!   signed with the secret.
//! * `3`: like 2, but signed with another secret: must never verify.
//! * `mode & 4` writes the scheme as `bearer` with extra spaces.
//!
//! Proves, for every input: `verify` never panics; when it accepts, the
//! token's signature is the HMAC-SHA256 of `header.payload` under the secret
//! (recomputed here with `hmac`/`sha2`, not `jsonwebtoken`), its header says
//! `alg: HS256`, its `exp` is a number not past (beyond the 30 s leeway), any
//! `nbf` is a number not ahead, the returned tenant and tier are the
//! payload's `tenant_id` and string `tier`, and `jsonwebtoken::decode` with
//! the same rules accepts the same token with the same claims ("accepts only
//! what verifies"); and conversely, a well-framed `Bearer` token that
//! `jsonwebtoken::decode` accepts with a string `tenant_id` is accepted too.
//! Tokens whose `exp`/`nbf` sit within 2 s of the leeway boundary are not
//! compared both ways (the clock moves between the two calls). And
//! `Identifier::identify`, the request path's entry point, which remembers
//! tokens that verified, gives `verify`'s answer for the same header twice
//! in a row, whatever tokens earlier inputs left remembered.
#![no_main]

use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::{DecodePaddingMode, general_purpose};
use hmac::{Hmac, Mac};
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use sha2::Sha256;
use tiergate::config::{Anonymous, IdentityConfig, JwtConfig, KeySource, SourceConfig};
use tiergate::identity::jwt::{JwtSource, MAX_TOKEN_BYTES, VerifiedClaims};
use tiergate::identity::{Identifier, IdentityError, IdentitySource, TenantId};

const SECRET: &str = "fuzz-secret-0123456789abcdef0123456789";
const OTHER_SECRET: &str = "not-the-secret-0123456789abcdef012345";
const LEEWAY: u64 = 30;

fn config() -> JwtConfig {
    JwtConfig {
        header: HeaderName::from_static("authorization"),
        algorithms: vec![Algorithm::HS256],
        key: KeySource::SecretEnv("FUZZ_SECRET".to_owned()),
        issuer: None,
        audience: None,
        tenant_claim: "tenant_id".to_owned(),
        tier_claim: Some("tier".to_owned()),
        leeway: Duration::from_secs(LEEWAY),
    }
}

fn env(_: &str) -> Option<String> {
    Some(SECRET.to_owned())
}

static SOURCE: LazyLock<JwtSource> =
    LazyLock::new(|| JwtSource::from_config(&config(), &env).expect("source builds"));

/// The same source behind the request path's entry point, which remembers
/// the tokens that verified (for the whole run: a token remembered from
/// one input must not change the answer for another).
static IDENTIFIER: LazyLock<Identifier> = LazyLock::new(|| {
    let cfg = IdentityConfig {
        sources: vec![SourceConfig::Jwt(config())],
        anonymous: Anonymous::Reject,
    };
    Identifier::new(&cfg, &env).expect("identifier builds")
});

static ORACLE_KEY: LazyLock<DecodingKey> =
    LazyLock::new(|| DecodingKey::from_secret(SECRET.as_bytes()));

/// The same rules, stated directly to `jsonwebtoken`.
static ORACLE_VALIDATION: LazyLock<Validation> = LazyLock::new(|| {
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = LEEWAY;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp"]);
    v
});

/// base64url that tolerates padding and trailing bits: used only to look
/// inside tokens the source accepted, so leniency here cannot hide a bug.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

fn hmac(secret: &str, message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn sign(secret: &str, header: &[u8], payload: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let sig = general_purpose::URL_SAFE_NO_PAD.encode(hmac(secret, signing_input.as_bytes()));
    format!("{signing_input}.{sig}")
}

/// `Bearer <token>` framing, restated: trimmed, scheme case-insensitive,
/// one or more spaces, at most `MAX_TOKEN_BYTES`, not empty.
fn framed_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let space = value.iter().position(|&b| b == b' ')?;
    if !value[..space].eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = value[space..].trim_ascii_start();
    (!token.is_empty() && token.len() <= MAX_TOKEN_BYTES).then_some(token)
}

fn json_object(part: &str) -> Option<Map<String, Value>> {
    serde_json::from_slice(&LENIENT.decode(part).ok()?).ok()
}

/// Whether a time claim sits within 2 s of its leeway boundary.
fn near_boundary(claims: &Map<String, Value>, now: f64) -> bool {
    let near = |name: &str, edge: f64| {
        claims
            .get(name)
            .and_then(Value::as_f64)
            .is_some_and(|t| (t + edge - now).abs() <= 2.0)
    };
    near("exp", LEEWAY as f64) || near("nbf", -(LEEWAY as f64))
}

/// What `jsonwebtoken` alone says about the token.
fn oracle(token: &[u8]) -> Option<VerifiedClaims> {
    let data =
        jsonwebtoken::decode::<Map<String, Value>>(token, &ORACLE_KEY, &ORACLE_VALIDATION).ok()?;
    let tenant = data.claims.get("tenant_id")?.as_str()?.to_owned();
    let tier = data
        .claims
        .get("tier")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Some(VerifiedClaims { tenant, tier })
}

/// Checks an accepted token from first principles.
fn check_accepted(token: &[u8], claims: &VerifiedClaims, now: f64) {
    let token = std::str::from_utf8(token).expect("an accepted token is ASCII");
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "accepted token {token:?} is not 3 parts");
    let signing_input = &token[..parts[0].len() + 1 + parts[1].len()];
    let sig = LENIENT
        .decode(parts[2])
        .expect("accepted signature is base64url");
    assert_eq!(
        sig,
        hmac(SECRET, signing_input.as_bytes()),
        "accepted a token whose signature is not HMAC-SHA256 under the secret: {token:?}"
    );
    let header = json_object(parts[0]).expect("accepted header is a JSON object");
    assert_eq!(header.get("alg"), Some(&Value::from("HS256")), "{header:?}");
    let payload = json_object(parts[1]).expect("accepted payload is a JSON object");
    assert_eq!(
        payload.get("tenant_id").and_then(Value::as_str),
        Some(claims.tenant.as_str())
    );
    assert_eq!(
        payload.get("tier").and_then(Value::as_str),
        claims.tier.as_deref()
    );
    let exp = payload
        .get("exp")
        .and_then(Value::as_f64)
        .expect("accepted token has a numeric exp");
    assert!(exp + LEEWAY as f64 + 2.0 >= now, "accepted expired token");
    if let Some(nbf) = payload.get("nbf") {
        let nbf = nbf.as_f64().expect("accepted token has a numeric nbf");
        assert!(nbf - LEEWAY as f64 - 2.0 <= now, "accepted immature token");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = match mode % 4 {
        0 => None,
        1 => {
            let split = rest.iter().position(|&b| b == 0xFF).unwrap_or(rest.len());
            let payload = rest.get(split + 1..).unwrap_or_default();
            Some(sign(SECRET, &rest[..split], payload))
        }
        2 => Some(sign(SECRET, br#"{"alg":"HS256","typ":"JWT"}"#, rest)),
        _ => Some(sign(OTHER_SECRET, br#"{"alg":"HS256","typ":"JWT"}"#, rest)),
    };
    let value = match token {
        None => rest.to_vec(),
        Some(t) if mode & 4 != 0 => format!("  bearer   {t} ").into_bytes(),
        Some(t) => format!("Bearer {t}").into_bytes(),
    };
    let Ok(value) = HeaderValue::from_bytes(&value) else {
        return;
    };

    let got = SOURCE.verify(&value);
    let now = jsonwebtoken::get_current_timestamp() as f64;
    let framed = framed_token(value.as_bytes());

    if let Ok(claims) = &got {
        assert_ne!(mode % 4, 3, "accepted a token signed with another secret");
        let token = framed.expect("accepted a header that is not `Bearer <token>`");
        check_accepted(token, claims, now);
    }

    let Some(token) = framed else {
        return;
    };
    let payload = std::str::from_utf8(token)
        .ok()
        .and_then(|t| t.split('.').nth(1))
        .and_then(json_object);
    if payload.is_some_and(|p| near_boundary(&p, now)) {
        return;
    }
    let expected = oracle(token);
    assert_eq!(
        got.as_ref().ok(),
        expected.as_ref(),
        "tiergate says {got:?}, jsonwebtoken says {expected:?}"
    );

    // The request path says what `verify` says, the first time (verified,
    // then remembered) and the second (remembered).
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, value.clone());
    let want = match &got {
        Ok(c) => {
            TenantId::parse_claimed(&c.tenant).map(|t| (t.as_str().to_owned(), c.tier.clone()))
        }
        Err(e) => Err(IdentityError::InvalidToken(e.clone())),
    };
    for attempt in ["first", "second"] {
        let identity = IDENTIFIER
            .identify(&headers, IpAddr::from([127, 0, 0, 1]), None)
            .map(|id| {
                assert_eq!(id.source, IdentitySource::Jwt);
                (
                    id.tenant.as_str().to_owned(),
                    id.claimed_tier.map(|t| t.to_string()),
                )
            });
        assert_eq!(identity, want, "{attempt} identify disagrees with verify");
    }
});
