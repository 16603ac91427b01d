//! Tenant identity end to end (SPEC §3, §5): the real binary with a JWT
//! source followed by a header source, in front of a recording upstream.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Tiergate, Upstream, client, raw_http, run_tiergate};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

/// The HMAC secret handed to tiergate through `TIERGATE_JWT_SECRET`.
const SECRET: &str = "integration-test-secret-0123456789abcdef";
/// The configured issuer.
const ISSUER: &str = "https://auth.tiergate.test";
/// The configured audience.
const AUDIENCE: &str = "api";

/// Absolute path of a JWT fixture (tiergate runs in a temp dir).
fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Seconds since the Unix epoch.
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Tiers with slow rates and large bursts: nothing here should be throttled.
const TIERS: &str = r#"
tiers:
  free:       { rate: 1/m, burst: 100 }
  starter:    { rate: 1/m, burst: 200 }
  enterprise: { rate: 1/m, burst: 300 }
default_tier: free
tenants:
  acme: { tier: enterprise }
"#;

/// A config in front of `upstream` with identity `sources` (YAML list
/// items, indented four spaces) and anonymous requests rejected.
fn config_with_sources(upstream: &str, sources: &str) -> String {
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
admin:
  listen: "127.0.0.1:0"
upstream:
  url: "{upstream}"
identity:
  sources:
{sources}
  anonymous: reject
{TIERS}"#
    )
}

/// HS256 JWT source (issuer + audience, tier claim) then an `x-tenant-id`
/// header source; anonymous requests rejected.
fn hs256_config(upstream: &str) -> String {
    config_with_sources(
        upstream,
        &format!(
            r#"    - type: jwt
      header: authorization
      algorithms: [HS256]
      secret_env: TIERGATE_JWT_SECRET
      issuer: "{ISSUER}"
      audience: "{AUDIENCE}"
      tenant_claim: tenant_id
      tier_claim: tier
    - type: header
      name: x-tenant-id"#
        ),
    )
}

/// RS256 JWT source verifying with the fixture public key.
fn rs256_config(upstream: &str) -> String {
    config_with_sources(
        upstream,
        &format!(
            r#"    - type: jwt
      algorithms: [RS256]
      public_key_file: "{key}"
      tenant_claim: tenant_id
      tier_claim: tier
    - type: header
      name: x-tenant-id"#,
            key = fixture("rsa_public.pem")
        ),
    )
}

/// Starts the HS256 setup with the secret in the environment.
fn start_hs256(up: &Upstream) -> Tiergate {
    Tiergate::start_with_env(&hs256_config(&up.url()), &[("TIERGATE_JWT_SECRET", SECRET)])
}

/// Valid claims for `tenant`, optionally with a tier claim.
fn claims(tenant: &str, tier: Option<&str>) -> Value {
    let mut c = json!({
        "tenant_id": tenant,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now(),
        "exp": now() + 3600,
    });
    if let Some(t) = tier {
        c["tier"] = json!(t);
    }
    c
}

/// Signs `claims` with `alg` and an HMAC `secret`.
fn sign_hmac(alg: Algorithm, claims: &Value, secret: &[u8]) -> String {
    encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).expect("sign hmac token")
}

/// Signs `claims` with HS256 and the configured secret.
fn hs256(claims: &Value) -> String {
    sign_hmac(Algorithm::HS256, claims, SECRET.as_bytes())
}

/// Base64url without padding (RFC 7515), for hand-built tokens.
fn b64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An unsigned `alg: none` token carrying otherwise valid claims.
fn alg_none(claims: &Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// Status, headers and parsed JSON body (Null when not JSON) of a GET.
async fn get(
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value, String) {
    let mut req = client().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request to tiergate");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("response body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, headers, body, text)
}

/// Value of header `name` as text, or "" when absent.
fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Checks a tiergate-generated JSON error; returns a description of what
/// is wrong, or `None` when it matches.
fn error_mismatch(
    status: u16,
    headers: &reqwest::header::HeaderMap,
    body: &Value,
    text: &str,
    want_status: u16,
    want_code: &str,
) -> Option<String> {
    let mut wrong = Vec::new();
    if status != want_status {
        wrong.push(format!("status {status} != {want_status}"));
    }
    if body["error"] != want_code {
        wrong.push(format!("body.error != {want_code:?}"));
    }
    if body["message"].as_str().is_none_or(|m| m.is_empty()) {
        wrong.push("no non-empty body.message".to_string());
    }
    if header(headers, "x-tiergate-error") != want_code {
        wrong.push(format!("x-tiergate-error != {want_code:?}"));
    }
    if !header(headers, "content-type").starts_with("application/json") {
        wrong.push("content-type is not application/json".to_string());
    }
    (!wrong.is_empty()).then(|| format!("{}; body: {text}", wrong.join(", ")))
}

/// A verified token decides the tenant, and its tier claim beats the
/// `tenants:` map — the upstream is told both by tiergate.
///
/// Why: the whole point of JWT identity is that the upstream can trust
/// `x-tenant-id`/`x-tenant-tier` instead of re-verifying tokens.
#[tokio::test]
async fn valid_token_sets_tenant_and_claimed_tier_for_upstream() {
    let up = Upstream::start();
    let tg = start_hs256(&up);
    let token = hs256(&claims("acme", Some("starter")));
    let auth = format!("Bearer {token}");

    // A spoofed header and tier from the client must not matter.
    let (status, headers, _, text) = get(
        &format!("{}/orders", tg.proxy_url()),
        &[
            ("authorization", &auth),
            ("x-tenant-id", "globex"),
            ("x-tenant-tier", "enterprise"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{text}\n{}", tg.dump());
    assert_eq!(header(&headers, "x-upstream"), "1");
    assert_eq!(
        header(&headers, "x-ratelimit-limit"),
        "200",
        "starter burst"
    );
    let seen = up.last().expect("upstream saw the request");
    assert_eq!(seen.path, "/orders");
    assert_eq!(seen.header_all("x-tenant-id"), vec!["acme"]);
    assert_eq!(seen.header_all("x-tenant-tier"), vec!["starter"]);
}

/// A verified token without a tier claim falls back to the `tenants:` map.
///
/// Why: tier resolution order (SPEC §3) is claim → tenants map → default.
#[tokio::test]
async fn token_without_tier_claim_uses_tenants_map() {
    let up = Upstream::start();
    let tg = start_hs256(&up);
    let auth = format!("Bearer {}", hs256(&claims("acme", None)));
    let (status, _, _, text) = get(
        &format!("{}/x", tg.proxy_url()),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let seen = up.last().expect("upstream saw the request");
    assert_eq!(seen.header("x-tenant-id"), Some("acme"));
    assert_eq!(seen.header("x-tenant-tier"), Some("enterprise"));
}

/// A tier claim naming a tier that is not configured is served on
/// `default_tier`, not refused.
///
/// Why: SPEC §3 — an unknown tier is never the client's error; an IdP that
/// invents a new plan name must not lock customers out.
#[tokio::test]
async fn unknown_tier_claim_falls_to_default_tier() {
    let up = Upstream::start();
    let tg = start_hs256(&up);
    let auth = format!("Bearer {}", hs256(&claims("newco", Some("platinum"))));
    let (status, headers, _, text) = get(
        &format!("{}/x", tg.proxy_url()),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(header(&headers, "x-ratelimit-limit"), "100", "free burst");
    let seen = up.last().expect("upstream saw the request");
    assert_eq!(seen.header("x-tenant-id"), Some("newco"));
    assert_eq!(seen.header("x-tenant-tier"), Some("free"));
}

/// Every kind of invalid token is a 401 `invalid_token` whose message says
/// why, and none of them reaches the upstream.
///
/// Why: SPEC §3/§5 — a token that is present but invalid is a hard 401;
/// each case here is a classic JWT verification bypass.
#[tokio::test]
async fn invalid_tokens_are_401_invalid_token_and_never_reach_upstream() {
    let up = Upstream::start();
    let tg = start_hs256(&up);
    let t = now();

    let mut expired = claims("acme", None);
    expired["exp"] = json!(t - 3600);
    expired["iat"] = json!(t - 7200);
    let mut not_yet = claims("acme", None);
    not_yet["nbf"] = json!(t + 3600);
    let mut wrong_iss = claims("acme", None);
    wrong_iss["iss"] = json!("https://evil.example.com");
    let mut wrong_aud = claims("acme", None);
    wrong_aud["aud"] = json!("other-api");
    let mut no_tenant = claims("acme", None);
    no_tenant.as_object_mut().unwrap().remove("tenant_id");
    let mut exp_string = claims("acme", None);
    exp_string["exp"] = json!((t + 3600).to_string());

    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", hs256(&expired), "expired"),
        ("nbf in the future", hs256(&not_yet), "not yet valid"),
        (
            "bad signature",
            sign_hmac(
                Algorithm::HS256,
                &claims("acme", None),
                b"some-other-secret-entirely-000000",
            ),
            "signature",
        ),
        ("alg none", alg_none(&claims("acme", None)), "algorithm"),
        (
            "HS384 when only HS256 is allowed",
            sign_hmac(Algorithm::HS384, &claims("acme", None), SECRET.as_bytes()),
            "algorithm",
        ),
        ("wrong issuer", hs256(&wrong_iss), "issuer"),
        ("wrong audience", hs256(&wrong_aud), "audience"),
        ("missing tenant claim", hs256(&no_tenant), "tenant"),
        ("exp as a string", hs256(&exp_string), "exp"),
        ("not a JWT", "not.a.jwt".to_string(), ""),
    ];

    let url = format!("{}/orders", tg.proxy_url());
    let mut failures = Vec::new();
    for (name, token, why) in &cases {
        let auth = format!("Bearer {token}");
        let (status, headers, body, text) = get(&url, &[("authorization", &auth)]).await;
        if let Some(m) = error_mismatch(status, &headers, &body, &text, 401, "invalid_token") {
            failures.push(format!("{name}: {m}"));
            continue;
        }
        let message = body["message"].as_str().unwrap_or("").to_lowercase();
        if !message.contains(why) {
            failures.push(format!("{name}: message {message:?} does not say {why:?}"));
        }
    }
    assert_eq!(
        up.count(),
        0,
        "upstream saw a request with an invalid token"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A forged token plus a spoofed `x-tenant-id` header is refused: the
/// header source later in the list is never consulted.
///
/// Why: SPEC §3 — no fall-through, or forging a token would be as good as
/// having one.
#[tokio::test]
async fn invalid_token_does_not_fall_through_to_header_source() {
    let up = Upstream::start();
    let tg = start_hs256(&up);
    let forged = sign_hmac(
        Algorithm::HS256,
        &claims("acme", Some("enterprise")),
        b"attacker-guessed-secret-000000000",
    );
    let auth = format!("Bearer {forged}");
    let (status, headers, body, text) = get(
        &format!("{}/x", tg.proxy_url()),
        &[("authorization", &auth), ("x-tenant-id", "acme")],
    )
    .await;
    if let Some(m) = error_mismatch(status, &headers, &body, &text, 401, "invalid_token") {
        panic!("{m}");
    }
    assert_eq!(up.count(), 0, "the spoofed header got through");

    // The header source alone still works (the refusal was the token's).
    let (status, _, _, text) =
        get(&format!("{}/x", tg.proxy_url()), &[("x-tenant-id", "acme")]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(up.count(), 1);
}

/// A token whose tenant claim is not a valid tenant id is a 400
/// `invalid_tenant`, like a bad header.
///
/// Why: SPEC §3 — bad tenant ids never reach Redis keys or metric labels,
/// whichever source they came from.
#[tokio::test]
async fn token_with_malformed_tenant_claim_is_400_invalid_tenant() {
    let up = Upstream::start();
    let tg = start_hs256(&up);
    let auth = format!("Bearer {}", hs256(&claims("{evil}", None)));
    let (status, headers, body, text) = get(
        &format!("{}/x", tg.proxy_url()),
        &[("authorization", &auth)],
    )
    .await;
    if let Some(m) = error_mismatch(status, &headers, &body, &text, 400, "invalid_tenant") {
        panic!("{m}");
    }
    assert_eq!(up.count(), 0);
}

/// An RS256 source accepts a token signed with the matching private key and
/// refuses an HS256 token whose HMAC secret is the public key PEM.
///
/// Why: RS/HS algorithm confusion is the best-known JWT bypass; the public
/// key is public, so accepting it as an HMAC secret would let anyone mint
/// tokens.
#[tokio::test]
async fn rs256_source_accepts_rs256_and_refuses_hs256_signed_with_public_key() {
    let up = Upstream::start();
    let tg = Tiergate::start(&rs256_config(&up.url()));
    let url = format!("{}/x", tg.proxy_url());

    let private = std::fs::read(fixture("rsa_private.pem")).expect("read rsa_private.pem");
    let key = EncodingKey::from_rsa_pem(&private).expect("parse rsa_private.pem");
    let good = encode(
        &Header::new(Algorithm::RS256),
        &claims("initech", Some("starter")),
        &key,
    )
    .expect("sign RS256");
    let auth = format!("Bearer {good}");
    let (status, _, _, text) = get(&url, &[("authorization", &auth)]).await;
    assert_eq!(status, 200, "{text}\n{}", tg.dump());
    let seen = up.last().expect("upstream saw the request");
    assert_eq!(seen.header("x-tenant-id"), Some("initech"));
    assert_eq!(seen.header("x-tenant-tier"), Some("starter"));

    let public = std::fs::read(fixture("rsa_public.pem")).expect("read rsa_public.pem");
    let confused = sign_hmac(Algorithm::HS256, &claims("initech", None), &public);
    let auth = format!("Bearer {confused}");
    let (status, headers, body, text) = get(&url, &[("authorization", &auth)]).await;
    if let Some(m) = error_mismatch(status, &headers, &body, &text, 401, "invalid_token") {
        panic!("RS/HS confusion: {m}");
    }
    assert_eq!(up.count(), 1, "the confused token reached the upstream");
}

/// Verified tokens are remembered (so a client's next request skips the
/// signature check), but never across a reload: when a key leaves the
/// JWKS file, the tokens it signed are refused from the reload on, even the
/// ones that verified a moment before.
///
/// Why: key rotation is how an identity provider revokes a leaked key; a
/// cache that outlived it would keep the leaked key's tokens working.
#[tokio::test]
async fn a_key_removed_from_the_jwks_at_reload_stops_its_remembered_tokens() {
    let keys = tempfile::tempdir().expect("temp dir");
    let jwks_path = keys.path().join("jwks.json");
    let full: Value = serde_json::from_slice(&std::fs::read(fixture("jwks.json")).unwrap())
        .expect("jwks.json is JSON");
    std::fs::write(&jwks_path, full.to_string()).unwrap();

    let up = Upstream::start();
    let yaml = config_with_sources(
        &up.url(),
        &format!(
            r#"    - type: jwt
      algorithms: [RS256, ES256]
      jwks_file: "{}"
      tenant_claim: tenant_id"#,
            jwks_path.display()
        ),
    );
    let tg = Tiergate::start(&yaml);
    let url = format!("{}/x", tg.proxy_url());
    let signed = |alg: Algorithm, kid: &str, key: EncodingKey| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_string());
        format!(
            "Bearer {}",
            encode(&header, &claims("acme", None), &key).expect("sign")
        )
    };
    let pem = |name: &str| std::fs::read(fixture(name)).expect("fixture key");
    let rsa = signed(
        Algorithm::RS256,
        "rsa-1",
        EncodingKey::from_rsa_pem(&pem("rsa_private.pem")).unwrap(),
    );
    let ec = signed(
        Algorithm::ES256,
        "ec-1",
        EncodingKey::from_ec_pem(&pem("ec_private.pem")).unwrap(),
    );
    for _ in 0..3 {
        let (status, _, _, text) = get(&url, &[("authorization", &rsa)]).await;
        assert_eq!(status, 200, "{text}\n{}", tg.dump());
    }
    assert_eq!(up.count(), 3);

    // The identity provider retires `rsa-1`.
    let mut rotated = full.clone();
    rotated["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["kid"] == "ec-1");
    let tmp = keys.path().join("jwks.json.tmp");
    std::fs::write(&tmp, rotated.to_string()).unwrap();
    std::fs::rename(&tmp, &jwks_path).unwrap();
    tg.reload_by_sighup();

    let (status, headers, body, text) = get(&url, &[("authorization", &rsa)]).await;
    if let Some(m) = error_mismatch(status, &headers, &body, &text, 401, "invalid_token") {
        panic!("a token of the retired key: {m}");
    }
    assert_eq!(body["message"], "invalid token: unknown key id", "{text}");
    assert_eq!(
        up.count(),
        3,
        "the retired key's token reached the upstream"
    );
    let (status, _, _, text) = get(&url, &[("authorization", &ec)]).await;
    assert_eq!(status, 200, "{text}\n{}", tg.dump());
}

/// With no token and no tenant header, `anonymous: reject` answers 401
/// `unauthenticated` with `WWW-Authenticate: Bearer`.
///
/// Why: SPEC §5 — clients need the challenge to know a bearer token is
/// expected.
#[tokio::test]
async fn no_identity_is_401_unauthenticated_with_bearer_challenge() {
    let up = Upstream::start();
    let tg = start_hs256(&up);
    let (status, headers, body, text) = get(&format!("{}/x", tg.proxy_url()), &[]).await;
    if let Some(m) = error_mismatch(status, &headers, &body, &text, 401, "unauthenticated") {
        panic!("{m}");
    }
    let challenge = header(&headers, "www-authenticate");
    assert!(
        challenge.to_ascii_lowercase().starts_with("bearer"),
        "WWW-Authenticate: {challenge:?}"
    );
    assert_eq!(up.count(), 0);
}

/// Tenant ids outside 1..=128 bytes of `[A-Za-z0-9._:@-]` are 400
/// `invalid_tenant` and never reach the upstream.
///
/// Why: SPEC §3 — braces would break the Redis hash tag, and arbitrary
/// bytes would pollute metric labels and logs.
#[test]
fn malformed_tenant_header_is_400_invalid_tenant() {
    let up = Upstream::start();
    let tg = start_hs256(&up);
    let long = "a".repeat(129);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("braces", b"{x}".to_vec()),
        ("star", b"a*".to_vec()),
        ("129 bytes", long.clone().into_bytes()),
        ("non-ASCII é", "é".as_bytes().to_vec()),
        ("space", b"a b".to_vec()),
        ("slash", b"a/b".to_vec()),
    ];
    let mut failures = Vec::new();
    for (name, value) in &cases {
        let mut req =
            b"GET /x HTTP/1.1\r\nHost: tiergate\r\nConnection: close\r\nx-tenant-id: ".to_vec();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n\r\n");
        let resp = raw_http(tg.proxy_addr(), &req, Duration::from_secs(5));
        let lower = resp.to_ascii_lowercase();
        if !resp.starts_with("HTTP/1.1 400") {
            failures.push(format!("{name}: {resp}"));
        } else if !resp.contains(r#""error":"invalid_tenant""#)
            || !lower.contains("x-tiergate-error: invalid_tenant")
        {
            failures.push(format!("{name}: not invalid_tenant: {resp}"));
        }
    }
    // The longest valid id is accepted.
    let ok = "a".repeat(128);
    let req =
        format!("GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nx-tenant-id: {ok}\r\n\r\n");
    let resp = raw_http(tg.proxy_addr(), req.as_bytes(), Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 200"), "128 bytes: {resp}");
    assert_eq!(up.count(), 1, "only the valid id reaches the upstream");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `tiergate serve` refuses to start when the env var named by
/// `secret_env` is unset, and says which variable and where in the YAML.
///
/// Why: SPEC §2 — a JWT source without its secret must fail loudly at
/// startup, not 401 every request.
#[test]
fn serve_without_jwt_secret_env_exits_naming_var_and_yaml_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tiergate.yaml");
    std::fs::write(&file, hs256_config("http://127.0.0.1:9")).expect("write config");
    let (code, stdout, stderr) = run_tiergate(
        &[
            "serve",
            "--config",
            file.to_str().expect("utf-8 path"),
            "--log-format",
            "json",
        ],
        &[],
    );
    assert_ne!(
        code, 0,
        "serve started without the secret\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("TIERGATE_JWT_SECRET"),
        "no env var name in: {stderr}"
    );
    assert!(
        stderr.contains("identity.sources[0]"),
        "no YAML path in: {stderr}"
    );
}
