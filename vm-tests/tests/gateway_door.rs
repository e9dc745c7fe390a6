//! The gateway's door against tokens and certificates made by other people's tools: keys by
//! OpenSSL, JWTs and the JWKS by PyJWT (Debian's python3-jwt), checked by the agent's
//! `gateway::door` as the gateway's request path calls it (`RouteDoor::admit`). Every bad
//! token the issue names is here: expired, not yet valid, wrong audience, wrong issuer,
//! unsigned, `alg: none`, HS256 signed with the RSA public key, unknown kid, garbage; and a
//! JWKS that turns to garbage keeps the last good keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hms_ctl::gateway::door::{AuthenticatorSpec, RouteDoorSpec};
use hms_node_agent::gateway::door::{
    Authenticators, ConnInfo, DoorMetrics, DoorOptions, RouteDoor,
};
use hyper::Request;
use vm_tests::tools;

const ISSUER: &str = "https://id.example.test";
const AUDIENCE: &str = "shop";

fn run(mut cmd: std::process::Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Private keys made by OpenSSL: `rsa`, `rsa2` (never in the JWKS at first), `ec`, `ed`.
fn keys(dir: &Path) {
    for (name, args) in [
        (
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
        ),
        (
            "rsa2",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
        ),
        (
            "ec",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
        ),
        ("ed", &["-algorithm", "ED25519"][..]),
    ] {
        let mut c = tools::command("openssl");
        c.arg("genpkey")
            .args(args)
            .arg("-out")
            .arg(dir.join(format!("{name}.pem")));
        run(c);
        let mut c = tools::command("openssl");
        c.args(["pkey", "-pubout", "-in"])
            .arg(dir.join(format!("{name}.pem")))
            .arg("-out")
            .arg(dir.join(format!("{name}.pub.pem")));
        run(c);
    }
}

/// PyJWT mints every token and writes the JWKS; the one HS256 forgery is made by hand
/// with Python's `hmac` (PyJWT itself refuses to use a PEM key as an HMAC secret).
const MINT: &str = r#"
import base64, hashlib, hmac, json, sys, time
import jwt
from jwt.algorithms import RSAAlgorithm, ECAlgorithm, OKPAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key

d = sys.argv[1]
iss, aud = sys.argv[2], sys.argv[3]
def key(n): return load_pem_private_key(open(f"{d}/{n}.pem", "rb").read(), None)
def jwk(alg, n, kid):
    j = json.loads(alg.to_jwk(key(n).public_key()))
    j["kid"] = kid
    return j
jwks = {"keys": [jwk(RSAAlgorithm, "rsa", "r1"), jwk(ECAlgorithm, "ec", "e1"), jwk(OKPAlgorithm, "ed", "d1")]}
json.dump(jwks, open(f"{d}/jwks.json", "w"))
rotated = {"keys": jwks["keys"] + [jwk(RSAAlgorithm, "rsa2", "r2")]}
json.dump(rotated, open(f"{d}/jwks-rotated.json", "w"))

now = int(time.time())
good = {"iss": iss, "aud": aud, "sub": "alice", "email": "alice@example.test", "exp": now + 600, "iat": now}
def sign(claims, n="rsa", alg="RS256", kid="r1"):
    return jwt.encode(claims, key(n), algorithm=alg, headers={"kid": kid})
def b64(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

t = {}
t["rs256"] = sign(good)
t["es256"] = sign(good, "ec", "ES256", "e1")
t["eddsa"] = sign(good, "ed", "EdDSA", "d1")
t["no_kid"] = jwt.encode(good, key("ec"), algorithm="ES256")
t["expired"] = sign({**good, "exp": now - 3600})
t["not_yet"] = sign({**good, "nbf": now + 3600})
t["wrong_aud"] = sign({**good, "aud": "billing"})
t["wrong_iss"] = sign({**good, "iss": "https://evil.example.test"})
t["no_sub"] = sign({k: v for k, v in good.items() if k != "sub"})
t["no_exp"] = sign({k: v for k, v in good.items() if k != "exp"})
t["exp_string"] = sign({**good, "exp": "never"})
t["nbf_string"] = sign({**good, "nbf": "99999999999"})
t["unknown_kid"] = sign(good, "rsa2", "RS256", "r2")
t["wrong_key_same_kid"] = sign(good, "rsa2", "RS256", "r1")
t["alg_for_other_key"] = sign(good, "rsa", "RS256", "e1")
t["alg_none"] = jwt.encode(good, None, algorithm="none")
t["unsigned"] = t["alg_none"].rsplit(".", 1)[0] + "."
pub = open(f"{d}/rsa.pub.pem", "rb").read()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "r1"}).encode())
body = b64(json.dumps(good).encode())
mac = hmac.new(pub, f"{head}.{body}".encode(), hashlib.sha256).digest()
t["hs256_with_public_key"] = f"{head}.{body}.{b64(mac)}"
t["tampered"] = t["rs256"][:-6] + ("AAAAAA" if not t["rs256"].endswith("AAAAAA") else "BBBBBB")
json.dump(t, sys.stdout)
"#;

struct Fixture {
    dir: tempfile::TempDir,
    tokens: BTreeMap<String, String>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        keys(dir.path());
        let mut c = tools::command("python3");
        c.args(["-c", MINT])
            .arg(dir.path())
            .args([ISSUER, AUDIENCE]);
        let tokens: BTreeMap<String, String> = serde_json::from_str(&run(c)).unwrap();
        Fixture { dir, tokens }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn token(&self, name: &str) -> &str {
        &self.tokens[name]
    }
}

fn jwt_spec(jwks_file: PathBuf, refresh: Duration) -> AuthenticatorSpec {
    AuthenticatorSpec::Jwt {
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        jwks_file: Some(jwks_file),
        jwks_url: None,
        jwks_ca: None,
        leeway: Duration::from_secs(30),
        refresh,
        forward_claims: [("email".to_string(), "x-user-email".to_string())].into(),
    }
}

struct Door {
    door: RouteDoor,
    metrics: Arc<DoorMetrics>,
}

fn door(spec: AuthenticatorSpec, min_reload: Duration) -> Door {
    let specs: BTreeMap<String, AuthenticatorSpec> = [("users".to_string(), spec)].into();
    hms_ctl::gateway::door::validate_authenticators(&specs).unwrap();
    let metrics = Arc::new(DoorMetrics::default());
    let options = DoorOptions {
        jwks_min_reload: min_reload,
        ..DoorOptions::default()
    };
    let auths = Authenticators::compile(&specs, metrics.clone(), &options).unwrap();
    let route = RouteDoorSpec {
        auth: Some("users".into()),
        ..RouteDoorSpec::default()
    };
    Door {
        door: RouteDoor::compile("orders", &route, &auths).unwrap(),
        metrics,
    }
}

fn conn() -> ConnInfo {
    ConnInfo {
        client: "192.0.2.7:40000".parse().unwrap(),
        tls: true,
        sni: Some("shop.example.test".into()),
        client_chain: Vec::new(),
    }
}

fn bearer(token: &str) -> hyper::http::request::Parts {
    Request::get("/orders")
        .header("authorization", format!("Bearer {token}"))
        // A caller's own copy of a forwarded-claim header: must never reach the backend.
        .header("x-user-email", "mallory@example.test")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// The refusal's status, `x-hms-error` and `WWW-Authenticate`.
async fn refused(d: &Door, parts: &hyper::http::request::Parts) -> (u16, String, String) {
    let r = d.door.admit(parts, &conn()).await.expect_err("refused");
    let h = |n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (r.status().as_u16(), h("x-hms-error"), h("www-authenticate"))
}

#[tokio::test]
async fn tokens_signed_by_the_issuers_rsa_ec_and_ed25519_keys_are_admitted_with_claims_forwarded() {
    let f = Fixture::new();
    let d = door(
        jwt_spec(f.path("jwks.json"), Duration::from_secs(300)),
        Duration::from_secs(3600),
    );
    for name in ["rs256", "es256", "eddsa", "no_kid"] {
        let parts = bearer(f.token(name));
        let a = d
            .door
            .admit(&parts, &conn())
            .await
            .unwrap_or_else(|r| panic!("{name} refused: {} {:?}", r.status(), r.headers()));
        let s = a.subject.as_ref().unwrap();
        assert_eq!((s.method, s.name.as_str()), ("jwt", "alice"), "{name}");
        let mut headers = parts.headers.clone();
        a.apply(&mut headers);
        assert_eq!(
            headers["x-user-email"], "alice@example.test",
            "{name}: the claim, not the caller's copy"
        );
        assert_eq!(headers.get_all("x-user-email").iter().count(), 1);
        assert!(
            headers.get("authorization").is_none(),
            "{name}: the token stays at the door"
        );
    }
    // The set was loaded once for all of them.
    assert_eq!(d.metrics.jwks_load_count("users", true), 1);
}

#[tokio::test]
async fn every_bad_token_gets_401_invalid_token_with_a_bearer_challenge() {
    let f = Fixture::new();
    let d = door(
        jwt_spec(f.path("jwks.json"), Duration::from_secs(300)),
        Duration::from_secs(3600),
    );
    for (name, says) in [
        ("expired", "expired"),
        ("not_yet", "not valid yet"),
        ("wrong_aud", "audience"),
        ("wrong_iss", "issuer"),
        ("no_sub", "`sub`"),
        ("no_exp", "`exp`"),
        ("exp_string", "exp"),
        ("nbf_string", "nbf"),
        ("alg_none", "alg none"),
        ("unsigned", "alg none"),
        ("hs256_with_public_key", "HMAC"),
        ("unknown_kid", "kid"),
        ("wrong_key_same_kid", "signature"),
        ("alg_for_other_key", "algorithm"),
        ("tampered", ""),
    ] {
        let (status, reason, challenge) = refused(&d, &bearer(f.token(name))).await;
        assert_eq!((status, reason.as_str()), (401, "invalid-token"), "{name}");
        assert!(
            challenge.starts_with("Bearer realm=\"users\", error=\"invalid_token\""),
            "{name}: {challenge}"
        );
        assert!(challenge.contains(says), "{name}: {challenge}");
    }
    for garbage in [
        "",
        "abc",
        "a.b.c",
        "a.b",
        "....",
        "eyJhbGciOiJSUzI1NiJ9.e30.",
        "ü.ü.ü",
    ] {
        let (status, reason, _) = refused(&d, &bearer(garbage)).await;
        assert_eq!(status, 401, "{garbage:?}");
        assert!(
            reason == "invalid-token" || reason == "unauthenticated",
            "{garbage:?}: {reason}"
        );
    }
    // No credentials: a challenge without an error code (RFC 6750 §3.1).
    let none = Request::get("/").body(()).unwrap().into_parts().0;
    let (status, reason, challenge) = refused(&d, &none).await;
    assert_eq!(
        (status, reason.as_str(), challenge.as_str()),
        (401, "unauthenticated", "Bearer realm=\"users\"")
    );
    // Unknown kids never made the door fetch the set again within min_reload.
    assert_eq!(d.metrics.jwks_load_count("users", true), 1);
    // The gateway keeps admitting good tokens after all of that.
    d.door
        .admit(&bearer(f.token("rs256")), &conn())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_rotated_key_is_found_by_reloading_on_its_unknown_kid() {
    let f = Fixture::new();
    let jwks = f.path("live.json");
    std::fs::copy(f.path("jwks.json"), &jwks).unwrap();
    let d = door(
        jwt_spec(jwks.clone(), Duration::from_secs(300)),
        Duration::ZERO,
    );
    assert_eq!(refused(&d, &bearer(f.token("unknown_kid"))).await.0, 401);
    // The issuer publishes its new key: the next token with that kid reloads the set.
    std::fs::copy(f.path("jwks-rotated.json"), &jwks).unwrap();
    let a = d
        .door
        .admit(&bearer(f.token("unknown_kid")), &conn())
        .await
        .unwrap();
    assert_eq!(a.subject.unwrap().name, "alice");
}

#[tokio::test]
async fn a_jwks_turned_to_garbage_keeps_the_last_good_keys_and_says_so() {
    let f = Fixture::new();
    let jwks = f.path("live.json");
    std::fs::copy(f.path("jwks.json"), &jwks).unwrap();
    // A refresh of zero: every request loads the file again.
    let d = door(jwt_spec(jwks.clone(), Duration::ZERO), Duration::ZERO);
    d.door
        .admit(&bearer(f.token("rs256")), &conn())
        .await
        .unwrap();
    for garbage in [
        "{not json",
        "{\"keys\": []}",
        "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}",
    ] {
        std::fs::write(&jwks, garbage).unwrap();
        let before = d.metrics.jwks_load_count("users", false);
        d.door
            .admit(&bearer(f.token("es256")), &conn())
            .await
            .unwrap_or_else(|r| panic!("after {garbage:?}: {}", r.status()));
        assert_eq!(
            d.metrics.jwks_load_count("users", false),
            before + 1,
            "{garbage:?}"
        );
    }
    std::fs::remove_file(&jwks).unwrap();
    d.door
        .admit(&bearer(f.token("eddsa")), &conn())
        .await
        .unwrap();
    assert_eq!(d.metrics.jwks_load_count("users", true), 1);
}

#[tokio::test]
async fn a_jwks_that_never_loaded_answers_503_and_the_door_recovers_once_it_does() {
    let f = Fixture::new();
    let jwks = f.path("later.json");
    let d = door(
        jwt_spec(jwks.clone(), Duration::from_secs(300)),
        Duration::ZERO,
    );
    let (status, reason, _) = refused(&d, &bearer(f.token("rs256"))).await;
    assert_eq!((status, reason.as_str()), (503, "auth-unavailable"));
    std::fs::copy(f.path("jwks.json"), &jwks).unwrap();
    d.door
        .admit(&bearer(f.token("rs256")), &conn())
        .await
        .unwrap();
}
