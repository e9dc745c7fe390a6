//! User stories of the gateway, the mesh's door: a real agent serving a gateway spec applied
//! with `hms-ctl gateway apply`, real outside clients (curl, openssl s_client, Python) on
//! its https and http listeners, and backends that are `.svc` services reached through the
//! mesh's own HTTP path as the caller `gateway`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use vm_tests::agent::TestAgent;
use vm_tests::backend::{Backend, Behavior};
use vm_tests::cgroup::TestCgroup;
use vm_tests::client::{Reply, curl, tail, wait_output};
use vm_tests::{ports, tools};

const CURL_MAX: Duration = Duration::from_secs(10);

/// A test CA (its certificate at `pem`) issuing the gateway's certificates.
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: PathBuf,
}

impl TestCa {
    fn new(dir: &Path, name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("gateway test CA {name}"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for `names` (PEM chain and key written under `dir`).
    fn issue(&self, dir: &Path, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let c = dir.join(format!("{file}.pem"));
        let k = dir.join(format!("{file}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// curl to the gateway on 127.0.0.1:`port` as `host`, trusting `ca`.
fn https(port: u16, host: &str, ca: &Path, path: &str, extra: &[&str]) -> Reply {
    let url = format!("https://{host}:{port}{path}");
    let resolve = format!("{host}:{port}:127.0.0.1");
    let mut args = vec!["--resolve", &resolve, "--cacert", ca.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(tools::command("curl"), CURL_MAX, &args)
}

/// `openssl s_client` with `flags`: whether the handshake completed.
fn s_client(port: u16, sni: &str, flags: &[&str]) -> (bool, String) {
    let child = tools::command("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", sni])
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_output(child, Duration::from_secs(10)).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let done = text.contains("Protocol: TLSv1.3") || text.contains("New, TLSv1.3");
    (done, text)
}

struct Setup {
    _cg: TestCgroup,
    agent: TestAgent,
    dir: tempfile::TempDir,
    stable: Backend,
    canary: Backend,
    locked: Backend,
    https: u16,
    http: u16,
    shop_ca: PathBuf,
    api_ca: PathBuf,
    /// The shop.test certificate and key files the https listener serves.
    shop_cert: (PathBuf, PathBuf),
    /// Backends only held until the test ends.
    _more: Vec<Backend>,
}

fn gateway_yaml(
    https: u16,
    http: u16,
    shop: &(PathBuf, PathBuf),
    api: &(PathBuf, PathBuf),
) -> String {
    format!(
        "\
name: public
listeners:
  - name: web
    address: 127.0.0.1
    port: {https}
    protocol: https
    certificates:
      - {{cert: {}, key: {}}}
      - {{cert: {}, key: {}}}
  - name: plain
    address: 127.0.0.1
    port: {http}
    protocol: http
    redirect_https: true
authenticators:
  partners:
    api_key:
      keys: {{acme: {partner_hash}}}
routes:
  - name: partner
    hostnames: [shop.test]
    matches: [{{path: {{prefix: /partner}}}}]
    auth: partners
    max_body: 1KiB
    rate_limit: {{rate: 1rpm, burst: 2, by: key}}
    backends: [{{service: stable-svc}}]
  - name: pay
    hostnames: [shop.test]
    matches:
      - path: {{prefix: /pay}}
    filters:
      request_headers: {{set: {{x-from: gateway}}, remove: [x-secret]}}
      response_headers: {{set: {{x-served-by: hms}}}}
      prefix_rewrite: /v2
    backends:
      - {{service: stable-svc, weight: 90}}
      - {{service: canary-svc.svc, weight: 10}}
  - name: beta
    hostnames: [shop.test]
    matches:
      - path: {{prefix: /pay}}
        headers: {{x-beta: \"1\"}}
    backends: [{{service: canary-svc}}]
  - name: exact
    hostnames: [shop.test]
    matches:
      - path: {{exact: /health}}
        method: GET
      - path: {{prefix: /q}}
        query: {{v: \"2\"}}
    backends: [{{service: stable-svc}}]
  - name: old
    hostnames: [shop.test]
    matches: [{{path: {{prefix: /old}}}}]
    filters: {{redirect: {{path: /new, status: 301}}}}
  - name: slow
    hostnames: [shop.test]
    matches: [{{path: {{prefix: /slow}}}}]
    timeout: 300ms
    backends: [{{service: slow-svc}}]
  - name: broken
    hostnames: [shop.test]
    matches: [{{path: {{prefix: /broken}}}}]
    retries: 0
    backends: [{{service: broken-svc}}]
  - name: locked
    hostnames: [api.test]
    backends: [{{service: locked-svc}}]
",
        shop.0.display(),
        shop.1.display(),
        api.0.display(),
        api.1.display(),
        partner_hash = hms_ctl::gateway::door::KeyHash::of(PARTNER_KEY),
    )
}

/// The API key of the `partners` authenticator (its hash is in the spec).
const PARTNER_KEY: &str = "k3y-of-acme-0123456789";

fn setup(name: &str) -> Setup {
    let cg = TestCgroup::new(name).expect("test cgroup");
    let agent = TestAgent::start_with(cg.path(), None, vec!["--gateway".into(), "all".into()])
        .expect("agent");
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let shop = ca.issue(dir.path(), "shop", &["shop.test"]);
    let api = ca.issue(dir.path(), "api", &["api.test"]);
    let stable = Backend::start("stable-svc", 0).unwrap();
    let canary = Backend::start("canary-svc", 0).unwrap();
    let locked = Backend::start("locked-svc", 0).unwrap();
    let slow = Backend::start_with("slow-svc", 0, Behavior::delay(Duration::from_secs(5))).unwrap();
    let broken = Backend::start_with("broken-svc", 0, Behavior::reset_first(1000)).unwrap();
    agent.deploy("slow-svc", slow.addr.port()).unwrap();
    agent.deploy("broken-svc", broken.addr.port()).unwrap();
    agent.deploy("stable-svc", stable.addr.port()).unwrap();
    agent.deploy("canary-svc", canary.addr.port()).unwrap();
    agent
        .deploy_yaml(&format!(
            "name: locked-svc\nport: {}\npolicy: {{allow_from: [payments-svc]}}\n",
            locked.addr.port()
        ))
        .unwrap();
    let (https, http) = (ports::free_port(), ports::free_port());
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, gateway_yaml(https, http, &shop, &api)).unwrap();
    let out = agent.ctl(&["gateway", "apply", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = Setup {
        _cg: cg,
        agent,
        dir,
        stable,
        canary,
        locked,
        https,
        http,
        shop_ca: ca.pem.clone(),
        api_ca: ca.pem.clone(),
        shop_cert: shop,
        _more: vec![slow, broken],
    };
    wait_serving(&s);
    s
}

/// Bounded wait until the https listener answers.
fn wait_serving(s: &Setup) {
    let deadline = std::time::Instant::now() + vm_tests::slack(Duration::from_secs(10));
    loop {
        let r = https(s.https, "shop.test", &s.shop_ca, "/health", &[]);
        if r.status == 200 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gateway never served: {r}\n{}",
            s.agent
                .log()
                .lines()
                .filter(|l| !l.contains("circuit-open") && !l.contains("status=503"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_outside_client_reaches_svc_backends_over_https_by_route_with_filters_and_errors() {
    let s = setup("gw-routes");
    let log = || tail(&s.agent.log(), 30);

    // Prefix route, request filters and prefix rewrite: the backend sees /v2/x, our header,
    // not the removed one; the client sees the response header and a trace id.
    let r = https(
        s.https,
        "shop.test",
        &s.shop_ca,
        "/pay/x?a=1",
        &["-H", "x-secret: s", "-H", "x-beta: 0"],
    );
    assert_eq!(r.status, 200, "{r}\n{}", log());
    assert!(r.body.ends_with("saw GET /v2/x?a=1\n"), "{r}");
    assert_eq!(r.header("x-served-by"), Some("hms"), "{r}");
    assert!(r.header("x-hms-trace-id").is_some(), "{r}");
    let seen: Vec<_> = s.stable.seen().into_iter().chain(s.canary.seen()).collect();
    let last = seen.last().unwrap();
    assert_eq!(last.headers_named("x-from"), vec!["gateway"], "{seen:?}");
    assert!(last.headers_named("x-secret").is_empty(), "{seen:?}");
    assert_eq!(last.headers_named("x-forwarded-proto"), vec!["https"]);

    // A header match beats the plain prefix; exact path with method; query match.
    let before = s.canary.seen_count();
    let r = https(
        s.https,
        "shop.test",
        &s.shop_ca,
        "/pay/y",
        &["-H", "x-beta: 1"],
    );
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(s.canary.seen_count(), before + 1);
    assert!(
        r.body.ends_with("saw GET /pay/y\n"),
        "no rewrite on beta: {r}"
    );
    let r = https(s.https, "shop.test", &s.shop_ca, "/health", &["-X", "POST"]);
    assert_eq!(r.status, 404, "{r}");
    assert_eq!(r.header("x-hms-error"), Some("no-route"), "{r}");
    let r = https(s.https, "shop.test", &s.shop_ca, "/q/1?v=2", &[]);
    assert_eq!(r.status, 200, "{r}");
    let r = https(s.https, "shop.test", &s.shop_ca, "/q/1?v=3", &[]);
    assert_eq!(r.status, 404, "{r}");

    // HTTP/2 by ALPN (curl's default with TLS) and HTTP/1.1 when asked.
    let version = tools::command("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            "--cacert",
        ])
        .arg(&s.shop_ca)
        .args(["--resolve", &format!("shop.test:{}:127.0.0.1", s.https)])
        .arg(format!("https://shop.test:{}/health", s.https))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout), "2", "{version:?}");
    let r = https(s.https, "shop.test", &s.shop_ca, "/health", &["--http1.1"]);
    assert_eq!(r.status, 200, "{r}");

    // The redirect filter, and the http listener's redirect to https.
    let r = https(s.https, "shop.test", &s.shop_ca, "/old/a?k=1", &[]);
    assert_eq!(r.status, 301, "{r}");
    assert_eq!(
        r.header("location"),
        Some(format!("https://shop.test:{}/new?k=1", s.https).as_str()),
        "{r}"
    );
    let r = curl(
        tools::command("curl"),
        CURL_MAX,
        &[
            "-H",
            "host: shop.test",
            &format!("http://127.0.0.1:{}/pay/x", s.http),
        ],
    );
    assert_eq!(r.status, 308, "{r}");
    assert_eq!(
        r.header("location"),
        Some(format!("https://shop.test:{}/pay/x", s.https).as_str()),
        "{r}"
    );

    // The mesh's policy applies to the gateway as caller `gateway`: locked-svc allows only
    // payments-svc, so 403 denied; allowing `gateway` lets it through.
    let r = https(s.https, "api.test", &s.api_ca, "/", &[]);
    assert_eq!(r.status, 403, "{r}\n{}", log());
    assert_eq!(r.header("x-hms-error"), Some("denied"), "{r}");
    assert_eq!(s.locked.seen_count(), 0);
    s.agent
        .deploy_yaml(&format!(
            "name: locked-svc\nport: {}\npolicy: {{allow_from: [gateway]}}\n",
            s.locked.addr.port()
        ))
        .unwrap();
    let r = https(s.https, "api.test", &s.api_ca, "/", &[]);
    assert_eq!(r.status, 200, "{r}\n{}", log());

    // The route's timeout: 504 timeout; a backend that resets (no retries): 502.
    let r = https(s.https, "shop.test", &s.shop_ca, "/slow", &[]);
    assert_eq!(r.status, 504, "{r}");
    assert_eq!(r.header("x-hms-error"), Some("timeout"), "{r}");
    assert!(r.elapsed < Duration::from_secs(4), "{r}");
    let r = https(s.https, "shop.test", &s.shop_ca, "/broken", &[]);
    assert_eq!(r.status, 502, "{r}");
    assert!(r.header("x-hms-error").is_some(), "{r}");

    // A backend with no instance: 503 no-endpoint in the mesh's style.
    s.agent.ctl(&["undeploy", "canary-svc"]);
    let r = https(
        s.https,
        "shop.test",
        &s.shop_ca,
        "/pay/z",
        &["-H", "x-beta: 1"],
    );
    assert_eq!(r.status, 503, "{r}");
    assert_eq!(r.header("x-hms-error"), Some("no-endpoint"), "{r}");

    // The door: no key 401, a wrong one 401, acme's key lets in with its name as the subject
    // (in the tap); a chunked body over max_body 413; acme's rate limit 429 + Retry-After.
    let r = https(s.https, "shop.test", &s.shop_ca, "/partner/a", &[]);
    assert_eq!(r.status, 401, "{r}\n{}", log());
    assert!(r.header("www-authenticate").is_some(), "{r}");
    let r = https(
        s.https,
        "shop.test",
        &s.shop_ca,
        "/partner/a",
        &["-H", "x-api-key: nope"],
    );
    assert_eq!(r.status, 401, "{r}");
    // A POST with a body refused over HTTP/2: the 401 arrives whole (curl sees no stream
    // error), as the survivor's form without a key does in the demo.
    let r = https(
        s.https,
        "shop.test",
        &s.shop_ca,
        "/partner/a",
        &["-X", "POST", "-d", r#"{"userId":"HUD123","amount":500}"#],
    );
    assert_eq!(r.status, 401, "{r}");
    assert_eq!(r.exit, Some(0), "{r}");
    let key = format!("x-api-key: {PARTNER_KEY}");
    let r = https(
        s.https,
        "shop.test",
        &s.shop_ca,
        "/partner/a",
        &["-H", &key],
    );
    assert_eq!(r.status, 200, "{r}\n{}", log());
    let events = s.agent.http_tap_events("gateway", "/partner/a", 1);
    assert!(
        events.iter().any(|e| e["subject"] == "api-key:acme"),
        "{events:?}"
    );
    let big = "b".repeat(4096);
    let r = https(
        s.https,
        "shop.test",
        &s.shop_ca,
        "/partner/upload",
        &[
            "-H",
            &key,
            "-H",
            "transfer-encoding: chunked",
            "--data-binary",
            &big,
        ],
    );
    assert_eq!(r.status, 413, "{r}\n{}", log());
    let r = https(
        s.https,
        "shop.test",
        &s.shop_ca,
        "/partner/b",
        &["-H", &key],
    );
    assert_eq!(r.status, 429, "{r}");
    assert!(r.header("retry-after").is_some(), "{r}");

    // The tap shows the gateway's requests with the outside client's address.
    let events = s.agent.http_tap_events("gateway", "/v2/x", 1);
    assert!(!events.is_empty(), "{}", log());
    assert!(
        events[0]["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{events:?}"
    );
    assert_eq!(events[0]["caller_process"], "public/pay", "{events:?}");
}

#[test]
fn a_90_10_split_sends_about_100_of_1000_to_the_canary() {
    let s = setup("gw-canary");
    let url = format!("https://shop.test:{}/pay/c", s.https);
    let resolve = format!("shop.test:{}:127.0.0.1", s.https);
    // One curl, 1000 requests on its kept-alive connection(s).
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--resolve".into(),
        resolve,
        "--cacert".into(),
        s.shop_ca.display().to_string(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}\\n".into(),
    ];
    for _ in 0..1000 {
        args.push(url.clone());
    }
    let before = (s.stable.seen_count(), s.canary.seen_count());
    let out = tools::command("curl").args(&args).output().unwrap();
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        codes.lines().filter(|l| *l == "200").count(),
        1000,
        "{codes}"
    );
    let canary = s.canary.seen_count() - before.1;
    let stable = s.stable.seen_count() - before.0;
    assert_eq!(canary + stable, 1000);
    assert!((70..=130).contains(&canary), "canary got {canary} of 1000");
}

#[test]
fn bad_input_gets_a_clear_answer_and_the_gateway_keeps_serving() {
    let s = setup("gw-bad");
    let log = || tail(&s.agent.log(), 30);

    // TLS 1.3 works; a TLS 1.2-only client gets a handshake failure.
    let (ok, text) = s_client(s.https, "shop.test", &["-tls1_3"]);
    assert!(ok, "{text}");
    let (ok, text) = s_client(s.https, "shop.test", &["-tls1_2"]);
    assert!(!ok, "TLS 1.2 accepted: {text}");
    assert!(text.contains("alert") || text.contains("error"), "{text}");

    // An SNI no certificate covers: the handshake fails, nothing else does.
    let resolve = format!("nope.test:{}:127.0.0.1", s.https);
    let r = curl(
        tools::command("curl"),
        CURL_MAX,
        &[
            "--resolve",
            &resolve,
            "-k",
            &format!("https://nope.test:{}/", s.https),
        ],
    );
    assert_eq!(r.status, 0, "{r}");
    assert_ne!(r.exit, Some(0), "{r}");

    // Garbage instead of a ClientHello, and a client that connects and says nothing.
    let garbage = format!(
        "import socket\ns=socket.create_connection(('127.0.0.1',{}))\ns.sendall(b'\\x16\\x03\\x01\\xff\\xff'+b'A'*4000)\ns.settimeout(5)\ntry:\n  print(s.recv(100))\nexcept Exception as e:\n  print(e)\n",
        s.https
    );
    let o = tools::command("python3")
        .args(["-c", &garbage])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Oversized request headers: 431 (HTTP/1.1).
    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    let r = https(
        s.https,
        "shop.test",
        &s.shop_ca,
        "/health",
        &["--http1.1", "-H", &big],
    );
    assert_eq!(r.status, 431, "{r}");

    // A spec with errors names field and line, and changes nothing.
    let bad = s.dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: public\nlisteners:\n  - name: web\n    port: 1\n    protocol: http\nroutes:\n  - name: r\n    listeners: [nope]\n    backends: [{service: stable-svc}]\n",
    )
    .unwrap();
    let out = s.agent.ctl(&["gateway", "apply", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":8:") && err.contains("routes[0].listeners"),
        "{err}"
    );

    // Still serving, with the first spec.
    let r = https(s.https, "shop.test", &s.shop_ca, "/health", &[]);
    assert_eq!(r.status, 200, "{r}\n{}", log());
    let metrics = s
        .agent
        .ctl_json(&["gateway", "describe", "public"])
        .unwrap();
    assert_eq!(metrics["listeners"][0]["state"], "serving", "{metrics}");
}

/// New TLS connection per request (each handshake gets the certificate served at that
/// moment) for 6 s; prints `ok failed`.
const LOAD_CLIENT: &str = r#"
import ssl, socket, time, sys
ctx = ssl.create_default_context(cafile='CAFILE')
ok = fail = 0
end = time.time() + SECONDS
while time.time() < end:
    try:
        s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', PORT), timeout=5), server_hostname='shop.test')
        s.sendall(b'GET /health HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n')
        data = b''
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
        s.close()
        if data.startswith(b'HTTP/1.1 200'):
            ok += 1
        else:
            fail += 1
            print(data[:200], file=sys.stderr)
    except Exception as e:
        fail += 1
        print(repr(e), file=sys.stderr)
print(ok, fail)
"#;

/// Python's http.client on one kept-alive HTTPS connection, reconnecting only when a
/// response says `Connection: close` (as http.client does): prints ok, failed, and how many
/// responses told it to reconnect.
const KEEPALIVE_CLIENT: &str = r#"
import ssl, socket, http.client, time, sys
ctx = ssl.create_default_context(cafile='CAFILE')
class Conn(http.client.HTTPSConnection):
    def connect(self):
        raw = socket.create_connection(('127.0.0.1', PORT), timeout=5)
        self.sock = ctx.wrap_socket(raw, server_hostname='shop.test')
c = Conn('shop.test', PORT, context=ctx, timeout=5)
ok = fail = closes = 0
end = time.time() + SECONDS
while time.time() < end:
    try:
        c.request('GET', '/health')
        r = c.getresponse()
        r.read()
        if r.status == 200:
            ok += 1
        else:
            fail += 1
            print(r.status, file=sys.stderr)
        if r.will_close:
            closes += 1
    except Exception as e:
        fail += 1
        print(repr(e), file=sys.stderr)
        c.close()
    time.sleep(0.005)
print(ok, fail, closes)
"#;

/// The numbers a load client printed last, and its stderr for the failure message.
fn load_counts(child: std::process::Child, within: Duration) -> (Vec<u64>, String) {
    let o = wait_output(child, within).unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let counts = out
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    (
        counts,
        format!("{out} {}", String::from_utf8_lossy(&o.stderr)),
    )
}

/// Running it like production: `hms-ctl agent upgrade` on a gateway host under steady HTTPS
/// load, twice. The successor accepts on the gateway sockets the old agent handed over (no
/// connection refused while both run), and the old agent's kept-alive connections end with
/// `Connection: close` on a response, so clients move over without an error.
#[test]
fn upgrades_of_a_gateway_host_under_steady_https_load_fail_no_request() {
    let s = setup("gw-upgrade");
    let secs = if vm_tests::in_vm() { 14 } else { 10 };
    let fill = |script: &str| {
        script
            .replace("CAFILE", &s.shop_ca.display().to_string())
            .replace("PORT", &s.https.to_string())
            .replace("SECONDS", &secs.to_string())
    };
    let spawn = |script: String| {
        tools::command("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // New connections (a TLS handshake each) and one kept-alive connection, at once.
    let fresh = spawn(fill(LOAD_CLIENT));
    let kept = spawn(fill(KEEPALIVE_CLIENT));
    let mut pids = vec![s.agent.pid().unwrap()];
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(secs / 4));
        let out = s.agent.ctl(&["agent", "upgrade"]);
        assert!(
            out.status.success(),
            "upgrade failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&s.agent.log(), 30)
        );
        pids.push(s.agent.pid().unwrap());
    }
    let within = Duration::from_secs(secs + 30);
    let (fresh_counts, fresh_out) = load_counts(fresh, within);
    let (kept_counts, kept_out) = load_counts(kept, within);
    eprintln!(
        "MEASURED: through 2 upgrades: new connections {fresh_counts:?} (ok, failed), kept-alive {kept_counts:?} (ok, failed, told to reconnect); pids {pids:?}"
    );
    assert_eq!(fresh_counts.len(), 2, "{fresh_out}");
    assert_eq!(kept_counts.len(), 3, "{kept_out}");
    assert_eq!(
        fresh_counts[1],
        0,
        "requests on new connections failed: {fresh_out}\n{}",
        tail(&s.agent.log(), 40)
    );
    assert_eq!(
        kept_counts[1],
        0,
        "kept-alive requests failed: {kept_out}\n{}",
        tail(&s.agent.log(), 40)
    );
    assert!(
        fresh_counts[0] > secs * 5,
        "the load on new connections really ran: {fresh_out}"
    );
    assert!(
        kept_counts[0] > secs * 20,
        "the kept-alive load really ran: {kept_out}"
    );
    // Each old agent ended its kept-alive connection with `Connection: close`, not a cut.
    assert!(
        kept_counts[2] >= 2,
        "the old agents told the kept-alive client to reconnect: {kept_out}"
    );
    let mut distinct = pids.clone();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        3,
        "each upgrade replaced the process: {pids:?}"
    );
    // The successors served the sockets they were handed, not new ones bound after a gap.
    let log = s.agent.log();
    assert!(
        log.matches("gateway listeners handed over by the previous agent")
            .count()
            >= 2,
        "{}",
        tail(&log, 40)
    );
    assert!(
        log.lines()
            .any(|l| l.contains("gateway listener serving") && l.contains("hand-over")),
        "{}",
        tail(&log, 40)
    );
    // And the gateway still serves after the last upgrade.
    let r = https(s.https, "shop.test", &s.shop_ca, "/health", &[]);
    assert_eq!(r.status, 200, "{r}");
}

#[test]
fn a_replaced_certificate_is_served_without_failing_requests_and_garbage_keeps_the_last_good_one() {
    let s = setup("gw-reload");
    let (shop_pem, shop_key) = s.shop_cert.clone();
    // Steady load from Python (requests through http.client over TLS, new connection each
    // time so every request does a handshake with the current certificate).
    let ca_both = s.dir.path().join("both.pem");
    let load = LOAD_CLIENT
        .replace("CAFILE", &ca_both.display().to_string())
        .replace("PORT", &s.https.to_string())
        .replace("SECONDS", "6");
    // The new certificate comes from another CA; the client trusts both.
    let ca2 = TestCa::new(s.dir.path(), "ca2");
    let (new_pem, new_key) = ca2.issue(s.dir.path(), "shop-new", &["shop.test"]);
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&s.shop_ca).unwrap(),
        std::fs::read_to_string(&ca2.pem).unwrap()
    );
    std::fs::write(&ca_both, both).unwrap();
    let child = tools::command("python3")
        .args(["-c", &load])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // Replace atomically (rename), as certificate tools do.
    let tmp_c = s.dir.path().join("tmp.pem");
    let tmp_k = s.dir.path().join("tmp.key");
    std::fs::copy(&new_pem, &tmp_c).unwrap();
    std::fs::copy(&new_key, &tmp_k).unwrap();
    std::fs::rename(&tmp_k, &shop_key).unwrap();
    std::fs::rename(&tmp_c, &shop_pem).unwrap();
    let o = wait_output(child, Duration::from_secs(30)).unwrap();
    let summary = String::from_utf8_lossy(&o.stdout);
    let counts: Vec<u64> = summary
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(
        counts.len(),
        2,
        "load client: {summary} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (ok, fail) = (counts[0], counts[1]);
    assert_eq!(fail, 0, "{summary} {}", String::from_utf8_lossy(&o.stderr));
    assert!(ok > 10, "{summary}");

    // The new certificate is the one served now: only it verifies.
    let deadline = std::time::Instant::now() + vm_tests::slack(Duration::from_secs(5));
    loop {
        let r = https(s.https, "shop.test", &ca2.pem, "/health", &[]);
        if r.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new certificate not served: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Garbage in the file: the last good one stays, describe and the log say so.
    std::fs::write(&shop_pem, "not a certificate\n").unwrap();
    let deadline = std::time::Instant::now() + vm_tests::slack(Duration::from_secs(5));
    loop {
        let d = s
            .agent
            .ctl_json(&["gateway", "describe", "public"])
            .unwrap();
        if d["listeners"][0]["certificates"][0]
            .as_str()
            .is_some_and(|c| c.contains("reload failed"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{d}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = https(s.https, "shop.test", &new_pem, "/health", &[]);
    assert_eq!(r.status, 200, "{r}");
    assert!(
        s.agent.log().contains("did not reload"),
        "{}",
        tail(&s.agent.log(), 20)
    );
}

#[test]
fn two_gateway_hosts_serve_the_same_routes_from_the_registry_and_only_the_operator_writes_them() {
    use vm_tests::mesh::{Backend as HostBackend, Mesh, NAMES, text};
    let m = Mesh::with_args(&|i| {
        if i > 0 {
            vec!["--gateway".into(), "all".into()]
        } else {
            Vec::new()
        }
    });
    // shop-svc runs on host A only and lets only the gateway call it.
    let port = ports::free_port();
    let backend = HostBackend::start(&m.net, 0, "shop-svc", port, m.dir.path());
    m.deploy(
        0,
        &format!("name: shop-svc\nport: {port}\npolicy: {{allow_from: [gateway]}}\n"),
    );
    m.wait_for_instances(1, "shop-svc", 1);
    m.wait_for_instances(2, "shop-svc", 1);
    // The operator lets hosts B and C speak as the gateway inside the mesh.
    // Right after shop-svc's placement granted roles: etcd may answer "revision of auth
    // store is old" to a request that raced an auth change; the agent sends it again.
    let out = m.agents[0].ctl(&["place", "gateway", "--on", "host-b,host-c"]);
    assert!(out.status.success(), "place gateway: {}", text(&out));

    let ca = TestCa::new(m.dir.path(), "ca");
    let (cert, key) = ca.issue(m.dir.path(), "shop", &["shop.test"]);
    let gw_port = ports::free_port();
    let file = m.dir.path().join("gateway.yaml");
    std::fs::write(
        &file,
        format!(
            "name: shop\nlisteners:\n  - name: web\n    port: {gw_port}\n    protocol: https\n    certificates: [{{cert: {}, key: {}}}]\nroutes:\n  - name: all\n    hostnames: [shop.test]\n    backends: [{{service: shop-svc}}]\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();

    // A host that is not the operator may not write gateway specs.
    let out = m.agents[1].ctl(&["gateway", "apply", file.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "host-b applied a gateway: {}",
        text(&out)
    );
    assert!(text(&out).contains("CA host"), "{}", text(&out));
    let out = m.agents[0].ctl(&["gateway", "apply", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));

    // An outside client (no mesh cgroup, on host A's link) reaches shop-svc through either
    // gateway host, which calls it across the mesh as `gateway`.
    let client = |host: usize| {
        let resolve = format!("shop.test:{gw_port}:{}", m.net.hosts[host].addr);
        curl(
            tools::in_netns(&m.net.hosts[0].netns, "curl"),
            CURL_MAX,
            &[
                "--resolve",
                &resolve,
                "--cacert",
                ca.pem.to_str().unwrap(),
                &format!("https://shop.test:{gw_port}/x"),
            ],
        )
    };
    for host in [1, 2] {
        let deadline = std::time::Instant::now() + vm_tests::slack(Duration::from_secs(15));
        loop {
            let r = client(host);
            if r.status == 200 {
                assert_eq!(r.body, "shop-svc on host-a saw GET /x\n", "{r}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never served: {r}\n{}",
                NAMES[host],
                tail(&m.agents[host].log(), 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(backend.seen().lines().count(), 2, "{}", backend.seen());
    let list = m.agents[2].ctl_json(&["gateway", "list"]).unwrap();
    assert_eq!(list[0]["spec"]["name"], "shop", "{list}");
    assert_eq!(list[0]["served_here"], true, "{list}");
    assert_eq!(list[0]["listeners"][0]["state"], "serving", "{list}");
    // Host A does not serve gateways: it says so.
    let list = m.agents[0].ctl_json(&["gateway", "list"]).unwrap();
    assert_eq!(list[0]["served_here"], false, "{list}");

    // Deleted by the operator: both gateway hosts close the listener.
    let out = m.agents[0].ctl(&["gateway", "delete", "shop"]);
    assert!(out.status.success(), "{}", text(&out));
    for host in [1, 2] {
        let deadline = std::time::Instant::now() + vm_tests::slack(Duration::from_secs(10));
        loop {
            let r = client(host);
            if r.status == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} still serves: {r}",
                NAMES[host]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// grpcio over TLS (ALPN h2) through the gateway, unary and server-streaming, with the
/// gateway's certificate from the test CA and the route chosen by `:authority`.
const GRPCIO_TLS_CLIENT: &str = r#"
import sys, grpc
port, ca = sys.argv[1], open(sys.argv[2], 'rb').read()
creds = grpc.ssl_channel_credentials(root_certificates=ca)
options = [('grpc.ssl_target_name_override', 'grpc.test'), ('grpc.default_authority', 'grpc.test')]
with grpc.secure_channel('127.0.0.1:' + port, creds, options=options) as channel:
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    print("check", check(b"", timeout=10).hex())
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
    print("watch", [m.hex() for m in watch(b"", timeout=10)])
    try:
        channel.unary_unary("/no.such.Service/Call")(b"", timeout=10)
    except grpc.RpcError as e:
        print("unrouted", e.code().name)
"#;

/// gRPC is HTTP/2 only (its status travels in trailers): a gRPC call reaching the gateway
/// over HTTP/2 goes on to the backend as HTTP/2, so an unmodified grpcio client gets its
/// unary answer and every streamed message; a call no route matches gets the gateway's 404,
/// which gRPC reads as UNIMPLEMENTED.
#[test]
fn grpcio_calls_a_grpc_backend_through_the_https_gateway() {
    let cg = TestCgroup::new("gw-grpc").expect("test cgroup");
    let agent = TestAgent::start_with(cg.path(), None, vec!["--gateway".into(), "all".into()])
        .expect("agent");
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let (cert, key) = ca.issue(dir.path(), "grpc", &["grpc.test"]);
    let backend = vm_tests::grpc::GrpcBackend::start(0).unwrap();
    agent.deploy("grpc-svc", backend.addr.port()).unwrap();
    let port = ports::free_port();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(
        &file,
        format!(
            "name: rpc\nlisteners:\n  - name: tls\n    port: {port}\n    protocol: https\n    certificates: [{{cert: {}, key: {}}}]\nroutes:\n  - name: health\n    hostnames: [grpc.test]\n    matches: [{{path: {{prefix: /grpc.health.v1.Health/}}}}]\n    backends: [{{service: grpc-svc}}]\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let out = agent.ctl(&["gateway", "apply", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + vm_tests::slack(Duration::from_secs(10));
    while !s_client(port, "grpc.test", &[]).0 {
        assert!(std::time::Instant::now() < deadline, "gateway never served");
        std::thread::sleep(Duration::from_millis(100));
    }
    let child = tools::command("python3")
        .args([
            "-c",
            GRPCIO_TLS_CLIENT,
            &port.to_string(),
            ca.pem.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_output(child, Duration::from_secs(60)).unwrap();
    let watch = ["'0801'"; vm_tests::grpc::WATCH_MESSAGES].join(", ");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("check 0801\nwatch [{watch}]\nunrouted UNIMPLEMENTED\n"),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        tail(&agent.log(), 30)
    );
    assert_eq!(backend.calls(), 2, "both calls reached the backend");
}
