//! The gateway's door against tokens and certificates made by other people's tools: keys and
//! certificates by OpenSSL, JWTs and the JWKS by PyJWT (Debian's python3-jwt), clients curl
//! and Python requests.
//!
//! - The JWT tests drive `RouteDoor::admit` directly, as the gateway's request path calls
//!   it: every bad token the issue names (expired, not yet valid, wrong audience, wrong
//!   issuer, unsigned, `alg: none`, HS256 signed with the RSA public key, unknown kid,
//!   garbage), key rotation, a JWKS that turns to garbage or whose URL goes away.
//! - The `through_the_gateway_*` tests run an agent with `--gateway all` and a spec applied
//!   with `hms-ctl gateway apply`: API keys, JWTs, per-key limits, CORS, body size over
//!   HTTP, and client certificates from each route's CA over HTTPS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hms_ctl::gateway::door::{AuthenticatorSpec, RouteDoorSpec};
use hms_node_agent::gateway::door::{
    Authenticators, ConnInfo, DoorMetrics, DoorOptions, RouteDoor,
};
use http_body_util::BodyExt;
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

// ---- Certificates made by OpenSSL, for TLS servers and clients ----

/// A CA: `NAME.pem`, `NAME.key`.
fn openssl_ca(dir: &Path, name: &str) {
    let mut c = tools::command("openssl");
    c.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ])
    .arg("-keyout")
    .arg(dir.join(format!("{name}.key")))
    .arg("-out")
    .arg(dir.join(format!("{name}.pem")))
    .args(["-days", "2", "-subj", &format!("/CN={name}")])
    .args(["-addext", "basicConstraints=critical,CA:TRUE"])
    .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    run(c);
}

/// A leaf `NAME.pem`/`NAME.key` issued by `ca` with subject `cn` and these extensions.
fn openssl_leaf(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    let ext_file = dir.join(format!("{name}.ext"));
    std::fs::write(&ext_file, ext).unwrap();
    let mut c = tools::command("openssl");
    c.args([
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ])
    .arg("-keyout")
    .arg(dir.join(format!("{name}.key")))
    .arg("-out")
    .arg(dir.join(format!("{name}.csr")))
    .args(["-subj", &format!("/CN={cn}")]);
    run(c);
    let mut c = tools::command("openssl");
    c.args(["x509", "-req", "-in"])
        .arg(dir.join(format!("{name}.csr")))
        .arg("-CA")
        .arg(dir.join(format!("{ca}.pem")))
        .arg("-CAkey")
        .arg(dir.join(format!("{ca}.key")))
        .args([
            "-set_serial",
            &format!("{}", vm_tests::ports::unique() + 1000),
        ])
        .args(["-days", "2", "-extfile"])
        .arg(&ext_file)
        .arg("-out")
        .arg(dir.join(format!("{name}.pem")));
    run(c);
}

const SERVER_EXT: &str = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
const CLIENT_EXT: &str = "extendedKeyUsage=clientAuth\n";

/// A process the test started, killed (by its handle) when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Python's http.server over TLS (ssl module) serving `dir`, on `port`; returns once it
/// says it listens.
fn https_file_server(dir: &Path, port: u16, cert: &Path, key: &Path) -> Running {
    use std::io::BufRead;
    const SERVE: &str = r#"
import functools, http.server, ssl, sys
d, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=d)
srv = http.server.HTTPServer(("127.0.0.1", port), handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("listening", flush=True)
srv.serve_forever()
"#;
    let mut c = tools::command("python3");
    c.args(["-c", SERVE])
        .arg(dir)
        .arg(port.to_string())
        .arg(cert)
        .arg(key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "listening");
    Running(child)
}

#[tokio::test]
async fn keys_from_an_https_jwks_url_with_a_given_ca_and_the_last_good_kept_when_it_goes_away() {
    let f = Fixture::new();
    let d = f.dir.path();
    openssl_ca(d, "idp-ca");
    openssl_leaf(d, "idp-ca", "idp", "idp", SERVER_EXT);
    let port = vm_tests::ports::free_port();
    let server = https_file_server(d, port, &d.join("idp.pem"), &d.join("idp.key"));
    let spec = AuthenticatorSpec::Jwt {
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        jwks_file: None,
        jwks_url: Some(format!("https://127.0.0.1:{port}/jwks.json")),
        jwks_ca: Some(d.join("idp-ca.pem")),
        leeway: Duration::from_secs(30),
        refresh: Duration::ZERO,
        forward_claims: BTreeMap::new(),
    };
    let from_url = door(spec, Duration::ZERO);
    from_url
        .door
        .admit(&bearer(f.token("es256")), &conn())
        .await
        .unwrap();
    assert_eq!(from_url.metrics.jwks_load_count("users", true), 1);
    drop(server);
    // The issuer is gone: every request tries again (refresh 0), fails, and keeps the keys.
    from_url
        .door
        .admit(&bearer(f.token("rs256")), &conn())
        .await
        .unwrap();
    assert!(from_url.metrics.jwks_load_count("users", false) >= 1);

    // Without the CA the system's roots do not vouch for the test issuer: never loaded.
    let server = https_file_server(d, port, &d.join("idp.pem"), &d.join("idp.key"));
    let spec = AuthenticatorSpec::Jwt {
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        jwks_file: None,
        jwks_url: Some(format!("https://127.0.0.1:{port}/jwks.json")),
        jwks_ca: None,
        leeway: Duration::from_secs(30),
        refresh: Duration::from_secs(300),
        forward_claims: BTreeMap::new(),
    };
    let untrusted = door(spec, Duration::ZERO);
    let r = untrusted
        .door
        .admit(&bearer(f.token("rs256")), &conn())
        .await
        .unwrap_err();
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["x-hms-error"].to_str().unwrap()
        ),
        (503, "auth-unavailable")
    );
    let body =
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(body.contains("UnknownIssuer"), "{body}");
    drop(server);
}

// ---- Through the real gateway: an agent serving `hms-ctl gateway apply` ----

/// curl against the gateway: status and the named response headers (lower case), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

fn gw_curl(args: &[&str], url: &str) -> Answer {
    let mut c = tools::command("curl");
    c.args(["-sS", "-i", "--max-time", "20"])
        .args(args)
        .arg(url);
    let out = run(c);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

#[test]
fn through_the_gateway_keys_tokens_limits_cors_and_body_size_are_enforced_for_curl() {
    use vm_tests::agent::TestAgent;
    use vm_tests::backend::Backend;
    use vm_tests::cgroup::TestCgroup;

    let f = Fixture::new();
    let cg = TestCgroup::new("gwdoor").expect("test cgroup");
    let agent = TestAgent::start_with(cg.path(), None, vec!["--gateway".into(), "all".into()])
        .expect("agent");
    let backend = Backend::start("orders-svc", 0).unwrap();
    agent.deploy("orders-svc", backend.addr.port()).unwrap();

    let port = vm_tests::ports::free_port();
    // The key and its spec line as the operator makes them.
    let made = agent.ctl(&["gateway", "key", "new", "acme"]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let made = String::from_utf8(made.stdout).unwrap();
    let field = |label: &str| {
        made.lines()
            .find_map(|l| l.strip_prefix(label))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no `{label}` in {made}"))
    };
    let key = field("key:");
    let spec_line = field("spec line:");
    assert_eq!(
        spec_line,
        format!("acme: {}", hms_ctl::gateway::door::KeyHash::of(&key))
    );
    let spec = format!(
        r#"name: door-e2e
listeners:
  - {{name: web, address: 127.0.0.1, port: {port}, protocol: http}}
authenticators:
  partners:
    api_key:
      keys:
        {spec_line}
  users:
    jwt:
      issuer: {ISSUER}
      audiences: [{AUDIENCE}]
      jwks_file: {jwks}
      forward_claims: {{email: x-user-email}}
routes:
  - name: keys
    matches: [{{path: {{prefix: /keys}}}}]
    backends: [{{service: orders-svc}}]
    auth: partners
    rate_limit: {{rate: 1rpm, burst: 3, by: key}}
  - name: tokens
    matches: [{{path: {{prefix: /tokens}}}}]
    backends: [{{service: orders-svc}}]
    auth: users
  - name: web
    matches: [{{path: {{prefix: /web}}}}]
    backends: [{{service: orders-svc}}]
    cors:
      allow_origins: ["https://shop.example.test"]
      allow_methods: [GET, POST]
      allow_headers: [content-type]
      max_age: 10m
    max_body: 1KiB
"#,
        jwks = f.path("jwks.json").display(),
    );
    let file = f.path("gateway.yaml");
    std::fs::write(&file, &spec).unwrap();
    let o = agent.ctl(&["gateway", "apply", file.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let base = format!("http://127.0.0.1:{port}");
    // The listener starts when the agent sees the spec: poll (bounded) until it answers.
    let deadline = std::time::Instant::now() + vm_tests::slack(Duration::from_secs(20));
    loop {
        let mut c = tools::command("curl");
        c.args(["-s", "-o", "/dev/null", "--max-time", "2"])
            .arg(format!("{base}/web"));
        if c.status().unwrap().success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gateway listener never answered\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // API key: none is 401 with the ApiKey challenge; a wrong one too; the right one reaches
    // the backend without the key.
    let a = gw_curl(&[], &format!("{base}/keys/a"));
    assert_eq!(
        (a.status, a.header("x-hms-error")),
        (401, "unauthenticated"),
        "{}",
        a.body
    );
    assert!(
        a.header("www-authenticate")
            .starts_with("ApiKey realm=\"partners\"")
    );
    let a = gw_curl(&["-H", "x-api-key: wrong"], &format!("{base}/keys/a"));
    assert_eq!((a.status, a.header("x-hms-error")), (401, "invalid-key"));
    let before = backend.seen_count();
    for i in 0..3 {
        let a = gw_curl(
            &["-H", &format!("x-api-key: {key}")],
            &format!("{base}/keys/{i}"),
        );
        assert_eq!(a.status, 200, "{i}: {}", a.body);
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), before + 3);
    assert!(
        seen[before..]
            .iter()
            .all(|r| r.header("x-api-key").is_none()),
        "the key never reaches the backend"
    );
    // Burst 3 at 1rpm: the fourth is 429 with Retry-After.
    let a = gw_curl(
        &["-H", &format!("x-api-key: {key}")],
        &format!("{base}/keys/4"),
    );
    assert_eq!(
        (a.status, a.header("x-hms-error")),
        (429, "rate-limited"),
        "{}",
        a.body
    );
    let retry: u64 = a.header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");

    // Re-applying the spec to change something else keeps every client's bucket (no fresh
    // burst for whoever was limited); changing the route's limit starts a new table.
    let reapply = |spec: String, new_route: &str| {
        let extra = format!(
            "  - name: {new_route}\n    matches: [{{path: {{prefix: /{new_route}}}}}]\n    backends: [{{service: orders-svc}}]\n"
        );
        std::fs::write(&file, format!("{spec}{extra}")).unwrap();
        let o = agent.ctl(&["gateway", "apply", file.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // Applied once the new route answers.
        let deadline = std::time::Instant::now() + vm_tests::slack(Duration::from_secs(10));
        while gw_curl(&[], &format!("{base}/{new_route}/x")).status != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "{new_route} never served"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    reapply(spec.clone(), "extra");
    let a = gw_curl(
        &["-H", &format!("x-api-key: {key}")],
        &format!("{base}/keys/5"),
    );
    assert_eq!(
        a.status, 429,
        "the bucket survived the re-apply: {}",
        a.body
    );
    reapply(spec.replace("burst: 3", "burst: 4"), "extra2");
    let a = gw_curl(
        &["-H", &format!("x-api-key: {key}")],
        &format!("{base}/keys/6"),
    );
    assert_eq!(
        a.status, 200,
        "a changed limit starts a new table: {}",
        a.body
    );

    // JWT: a good token passes with its claim forwarded and the caller's forged copy gone.
    let a = gw_curl(
        &[
            "-H",
            &format!("authorization: Bearer {}", f.token("rs256")),
            "-H",
            "x-user-email: mallory@example.test",
        ],
        &format!("{base}/tokens/me"),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let last = backend.seen().pop().unwrap();
    assert_eq!(last.headers_named("x-user-email"), ["alice@example.test"]);
    assert!(last.header("authorization").is_none());
    for (name, error) in [
        ("expired", "invalid_token"),
        ("alg_none", "invalid_token"),
        ("hs256_with_public_key", "invalid_token"),
        ("wrong_aud", "invalid_token"),
    ] {
        let a = gw_curl(
            &["-H", &format!("authorization: Bearer {}", f.token(name))],
            &format!("{base}/tokens/me"),
        );
        assert_eq!(a.status, 401, "{name}: {}", a.body);
        assert!(
            a.header("www-authenticate")
                .contains(&format!("error=\"{error}\"")),
            "{name}"
        );
    }
    // A forged claim header on a token-less request does not get through either.
    let a = gw_curl(
        &["-H", "x-user-email: mallory@example.test"],
        &format!("{base}/tokens/me"),
    );
    assert_eq!(a.status, 401);

    // CORS: the preflight is answered at the door; another origin gets no allow headers.
    let a = gw_curl(
        &[
            "-X",
            "OPTIONS",
            "-H",
            "origin: https://shop.example.test",
            "-H",
            "access-control-request-method: POST",
        ],
        &format!("{base}/web/form"),
    );
    assert_eq!(a.status, 204);
    assert_eq!(
        a.header("access-control-allow-origin"),
        "https://shop.example.test"
    );
    assert_eq!(a.header("access-control-allow-methods"), "GET, POST");
    assert_eq!(a.header("access-control-max-age"), "600");
    let a = gw_curl(
        &[
            "-X",
            "OPTIONS",
            "-H",
            "origin: https://evil.example.test",
            "-H",
            "access-control-request-method: POST",
        ],
        &format!("{base}/web/form"),
    );
    assert_eq!((a.status, a.header("x-hms-error")), (403, "cors-denied"));
    assert!(
        a.headers
            .iter()
            .all(|(k, _)| !k.starts_with("access-control-"))
    );
    let a = gw_curl(
        &["-H", "origin: https://shop.example.test"],
        &format!("{base}/web/page"),
    );
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("access-control-allow-origin"),
        "https://shop.example.test"
    );

    // Body size: a declared body over 1 KiB is 413 before the backend sees it.
    let before = backend.seen_count();
    let big = "x".repeat(1025);
    let a = gw_curl(&["--data-binary", &big], &format!("{base}/web/form"));
    assert_eq!(
        (a.status, a.header("x-hms-error")),
        (413, "body-too-large"),
        "{}",
        a.body
    );
    let a = gw_curl(
        &["--data-binary", &big[..1024]],
        &format!("{base}/web/form"),
    );
    assert_eq!(a.status, 200);
    assert_eq!(backend.seen_count(), before + 1);

    // And the door's counters are on /metrics.
    let mut c = tools::command("curl");
    c.args(["-s"])
        .arg(format!("http://{}/metrics", agent.metrics));
    let metrics = run(c);
    assert!(
        metrics
            .contains("hms_gateway_door_refused_total{route=\"keys\",reason=\"rate-limited\"} 2"),
        "{metrics}"
    );
}

#[test]
fn through_the_gateway_client_certificates_from_each_routes_ca_over_https() {
    use vm_tests::agent::TestAgent;
    use vm_tests::backend::Backend;
    use vm_tests::cgroup::TestCgroup;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for ca in ["gw-ca", "staff-ca", "partners-ca", "stranger-ca"] {
        openssl_ca(d, ca);
    }
    openssl_leaf(
        d,
        "gw-ca",
        "gw",
        "gw.test",
        "subjectAltName=DNS:gw.test\nextendedKeyUsage=serverAuth\n",
    );
    openssl_leaf(d, "staff-ca", "alice", "alice", CLIENT_EXT);
    openssl_leaf(d, "partners-ca", "acme", "acme", CLIENT_EXT);
    openssl_leaf(d, "stranger-ca", "mallory", "mallory", CLIENT_EXT);

    let cg = TestCgroup::new("gwcert").expect("test cgroup");
    let agent = TestAgent::start_with(cg.path(), None, vec!["--gateway".into(), "all".into()])
        .expect("agent");
    let backend = Backend::start("staff-svc", 0).unwrap();
    agent.deploy("staff-svc", backend.addr.port()).unwrap();
    let port = vm_tests::ports::free_port();
    let p = |n: &str| d.join(n).display().to_string();
    let spec = format!(
        r#"name: door-certs
listeners:
  - name: tls
    address: 127.0.0.1
    port: {port}
    protocol: https
    certificates: [{{cert: {gw_cert}, key: {gw_key}}}]
authenticators:
  staff: {{client_cert: {{ca: {staff}}}}}
  partners: {{client_cert: {{ca: {partners}}}}}
routes:
  - {{name: staff, matches: [{{path: {{prefix: /staff}}}}], backends: [{{service: staff-svc}}], auth: staff}}
  - {{name: partners, matches: [{{path: {{prefix: /partners}}}}], backends: [{{service: staff-svc}}], auth: partners}}
  - {{name: open, matches: [{{path: {{prefix: /open}}}}], backends: [{{service: staff-svc}}]}}
"#,
        gw_cert = p("gw.pem"),
        gw_key = p("gw.key"),
        staff = p("staff-ca.pem"),
        partners = p("partners-ca.pem"),
    );
    let file = d.join("gateway.yaml");
    std::fs::write(&file, spec).unwrap();
    let o = agent.ctl(&["gateway", "apply", file.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let resolve = format!("gw.test:{port}:127.0.0.1");
    let https = |route: &str, cert: Option<&str>| -> Option<Answer> {
        let mut c = tools::command("curl");
        // HTTP/1.1: an h2 request at the gateway is sent to this HTTP/1.1 backend as h2
        // today (502 upstream-failed), the gateway path's issue, not the door's.
        c.args([
            "-sS",
            "-i",
            "--http1.1",
            "--max-time",
            "20",
            "--resolve",
            &resolve,
            "--cacert",
        ])
        .arg(d.join("gw-ca.pem"));
        if let Some(name) = cert {
            c.arg("--cert").arg(d.join(format!("{name}.pem")));
            c.arg("--key").arg(d.join(format!("{name}.key")));
        }
        c.arg(format!("https://gw.test:{port}/{route}"));
        let out = c.output().unwrap();
        out.status.success().then(|| {
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
            let headers = text
                .split("\r\n\r\n")
                .next()
                .unwrap()
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            Answer {
                status,
                headers,
                body: String::new(),
            }
        })
    };
    let deadline = std::time::Instant::now() + vm_tests::slack(Duration::from_secs(20));
    while https("open", None).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "gateway listener never answered\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = |route: &str, cert: Option<&str>| {
        https(route, cert).map(|a| (a.status, a.header("x-hms-error").to_string()))
    };
    assert_eq!(
        status("open", None),
        Some((200, String::new())),
        "plain routes work without a certificate"
    );
    assert_eq!(status("open", Some("alice")), Some((200, String::new())));
    assert_eq!(status("staff", Some("alice")), Some((200, String::new())));
    assert_eq!(
        status("staff", None),
        Some((401, "client-cert-required".into()))
    );
    assert_eq!(
        status("staff", Some("acme")),
        Some((403, "client-cert-untrusted".into())),
        "the partners' CA is not the staff's"
    );
    assert_eq!(status("partners", Some("acme")), Some((200, String::new())));
    assert_eq!(
        status("open", Some("mallory")),
        None,
        "a CA no route names fails the handshake"
    );
    assert_eq!(
        status("open", None),
        Some((200, String::new())),
        "and the gateway keeps serving"
    );
    let a = https("staff", None).unwrap();
    assert!(
        a.header("www-authenticate")
            .starts_with("ClientCertificate realm=\"staff\"")
    );

    // Python requests (urllib3 over Python's ssl) with a client certificate; gw.test is
    // sent to loopback by replacing urllib3's connect (no DNS in the test).
    let mut c = tools::command("python3");
    c.args([
        "-c",
        r#"
import sys, requests, urllib3.util.connection as conn
real = conn.create_connection
def to_loopback(addr, *a, **k):
    return real(("127.0.0.1", addr[1]), *a, **k)
conn.create_connection = to_loopback
for cert in (sys.argv[2], None):
    kw = {"cert": (cert, cert.replace(".pem", ".key"))} if cert else {}
    r = requests.get(sys.argv[1], verify=sys.argv[3], timeout=20, **kw)
    print(r.status_code, r.headers.get("x-hms-error"))
"#,
    ])
    .arg(format!("https://gw.test:{port}/staff"))
    .arg(d.join("alice.pem"))
    .arg(d.join("gw-ca.pem"));
    assert_eq!(run(c).trim(), "200 None\n401 client-cert-required");
    assert!(backend.seen_count() >= 4);
}
