//! Egress: an outside system gets a mesh name (`external: https://...` in a spec), and
//! unmodified apps in the meshed cgroup call it as `http://treasury-api.svc/` while the
//! mesh originates TLS, with its policy, retries, timeouts and taps. And the host setting
//! `--refuse-undeclared-egress`: off, a direct outside connection works; on, the kernel
//! refuses it (EPERM) while the declared name and address still work.
//!
//! The "outside" is a network namespace of its own on a test bridge (`TestNet`): the agent
//! and the apps run in host 1's namespace, the outside HTTPS servers (Python's http.server
//! with ssl, a CA made here, TLS 1.2-only for one) in hosts 2 and 3. The outside name
//! `api.treasury.example` is answered by a test resolver on loopback in host 1's namespace
//! (the agent's `--egress-resolver`): nothing leaves the machine.

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::cgroup::TestCgroup;
use vm_tests::mesh::in_netns;
use vm_tests::netns::TestNet;
use vm_tests::resolver::TestResolver;
use vm_tests::{slack, tools};

const OUTSIDE_NAME: &str = "api.treasury.example";
const OUTSIDE_PORT: u16 = 8443;
/// The test resolver's address inside host 1's namespace.
const RESOLVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

/// The outside HTTPS server: answers every request with what it saw (method, path, Host,
/// SNI, TLS version, client certificate), `/flaky/<id>` with 503 the first time per id,
/// `/slow` after 3 s. Counts requests per path in its stdout log.
const SERVER: &str = r#"
import http.server, json, ssl, sys, threading, time
cert, key, max_tls, client_ca, addr = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
if max_tls == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
if client_ca != "-":
    ctx.load_verify_locations(client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
snis = {}
def remember_sni(sock, name, _ctx):
    snis[id(sock)] = name
ctx.sni_callback = remember_sni
flaky_seen = set()
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.path.startswith("/flaky/"):
            with lock:
                first = self.path not in flaky_seen
                flaky_seen.add(self.path)
            if first:
                self.send_response(503)
                self.send_header("content-length", "0")
                self.end_headers()
                return
        if self.path == "/slow":
            time.sleep(3)
        peer = self.connection.getpeercert()
        out = json.dumps({
            "method": self.command, "path": self.path, "host": self.headers.get("host"),
            "sni": snis.get(id(self.connection)), "tls": self.connection.version(),
            "client": dict(x[0] for x in peer["subject"]).get("commonName") if peer else None,
            "body": body.decode(errors="replace"),
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
        print(self.command, self.path, flush=True)
    do_GET = answer
    do_POST = answer
    do_PUT = answer
srv = http.server.ThreadingHTTPServer((addr, 8443), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;

/// A CA made for the test and what it signed: the outside server's certificate (for
/// `api.treasury.example`) and a client certificate (CN treasury-client).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::Builder::new()
            .prefix("hms-egress-pki-")
            .tempdir()
            .unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "treasury test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca_cert.pem());
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec![OUTSIDE_NAME.to_string()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        write("server.pem", server.pem());
        write("server.key", server_key.serialize_pem());
        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client
            .distinguished_name
            .push(DnType::CommonName, "treasury-client");
        let client = client.signed_by(&client_key, &issuer).unwrap();
        write("client.pem", client.pem());
        write("client.key", client_key.serialize_pem());
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// One outside HTTPS server in a namespace of the test network.
struct Outside {
    child: Child,
    addr: SocketAddrV4,
}

impl Outside {
    /// `max_tls`: "1.2" for a TLS 1.2-only server, "1.3" otherwise; `client_ca`: require a
    /// client certificate from that CA.
    fn start(
        net: &TestNet,
        host: usize,
        pki: &Pki,
        max_tls: &str,
        client_ca: Option<&Path>,
    ) -> Outside {
        let h = &net.hosts[host];
        let ip = h.ipv4();
        let script = pki.path(&format!("server-{host}.py"));
        std::fs::write(&script, SERVER).unwrap();
        let child = tools::in_netns(&h.netns, "python3")
            .arg(&script)
            .arg(pki.path("server.pem"))
            .arg(pki.path("server.key"))
            .arg(max_tls)
            .arg(client_ca.map_or("-".to_string(), |p| p.display().to_string()))
            .arg(ip.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("starting the outside server (python3)");
        let addr = SocketAddrV4::new(ip, OUTSIDE_PORT);
        let deadline = Instant::now() + slack(Duration::from_secs(10));
        while !in_netns(&h.netns, || TcpStream::connect(addr).is_ok()) {
            assert!(
                Instant::now() < deadline,
                "outside server {addr} did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Outside { child, addr }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Host 1's agent and meshed cgroup, the resolver that names the outside, the CA.
struct World {
    net: TestNet,
    cg: TestCgroup,
    agent: TestAgent,
    pki: Pki,
    _resolver: TestResolver,
}

impl World {
    /// `hosts`: namespaces in the test network (host 1 is the agent's, the rest outside);
    /// `answer`: what `api.treasury.example` resolves to.
    fn new(hosts: usize, extra: &[&str]) -> World {
        let net = TestNet::new(hosts).unwrap();
        let answer = net.hosts[1].ipv4();
        let resolver = TestResolver::start_in_netns(&net.hosts[0].netns, RESOLVER_IP, answer)
            .expect("test resolver");
        let cg = TestCgroup::new("egress").unwrap();
        let mut args = vec!["--egress-resolver".to_string(), format!("{RESOLVER_IP}:53")];
        args.extend(extra.iter().map(|s| s.to_string()));
        let agent = TestAgent::start_with(cg.path(), Some(&net.hosts[0].netns), args).unwrap();
        World {
            net,
            cg,
            agent,
            pki: Pki::new(),
            _resolver: resolver,
        }
    }

    /// The treasury spec, with `extra` lines appended (policy, routes, tls options).
    fn deploy_treasury(&self, tls_extra: &str, extra: &str) {
        let yaml = format!(
            "name: treasury-api\nexternal: https://{OUTSIDE_NAME}:{OUTSIDE_PORT}\ntls:\n  ca_file: {}\n{tls_extra}{extra}",
            self.pki.p("ca.pem")
        );
        self.agent.deploy_yaml(&yaml).expect("deploy treasury-api");
    }

    /// An unmodified program from the tool list inside the meshed cgroup and host 1's
    /// namespace.
    fn client(&self, name: &str) -> std::process::Command {
        let mut cmd = self.cg.command("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.net.hosts[0].netns))
            .arg("--")
            .arg(tools::path_of(name));
        cmd
    }

    fn curl(&self, args: &[&str]) -> Output {
        self.client("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .output()
            .unwrap()
    }

    /// `(status, x-hms-error, body)` of one curl call through the mesh.
    fn call(&self, url: &str) -> (u16, Option<String>, String) {
        let out = self.curl(&["-i", url]);
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
        let status = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no HTTP answer from {url}: {text} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let error = head.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-hms-error:")
                .map(|v| v.trim().to_string())
        });
        (status, error, body.to_string())
    }

    /// A plain TCP connect to `addr` from the cgroup, not through the mesh: `ok` or the
    /// errno's name.
    fn direct_connect(&self, addr: SocketAddrV4) -> String {
        self.direct(addr, "s = socket.socket()\ns.settimeout(5)\ns.connect(to)")
    }

    /// An unconnected UDP datagram (`sendto` with the address) to `addr` from the cgroup:
    /// `ok` or the errno's name.
    fn direct_sendto(&self, addr: SocketAddrV4) -> String {
        self.direct(
            addr,
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', to)",
        )
    }

    /// Runs `send` (Python, with `to` the address) in the cgroup: `ok` or the errno's name.
    fn direct(&self, addr: SocketAddrV4, send: &str) -> String {
        let body: String = send.lines().map(|l| format!("    {l}\n")).collect();
        let script = format!(
            "import socket, sys, errno\nto = (sys.argv[1], int(sys.argv[2]))\ntry:\n{body}    print('ok')\nexcept OSError as e:\n    print(errno.errorcode.get(e.errno, str(e)))\n"
        );
        let out = self
            .client("python3")
            .args([
                "-c",
                &script,
                &addr.ip().to_string(),
                &addr.port().to_string(),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits (bounded) until a direct connect to `addr` from the cgroup gives `want`: the
    /// agent writes the declared set into the kernel a moment after a deploy.
    fn wait_direct(&self, addr: SocketAddrV4, want: &str) {
        let deadline = Instant::now() + slack(Duration::from_secs(10));
        loop {
            let got = self.direct_connect(addr);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "direct connect to {addr}: {got}, expected {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("not the outside server's JSON ({e}): {body}"))
}

#[test]
fn unmodified_curl_and_python_requests_reach_an_outside_https_system_by_its_mesh_name() {
    let w = World::new(2, &[]);
    let _outside = Outside::start(&w.net, 1, &w.pki, "1.3", None);
    w.deploy_treasury("", "");

    let (status, error, body) = w.call("http://treasury-api.svc/pay?id=7");
    assert_eq!((status, error), (200, None), "{body}");
    let seen = json(&body);
    // The outside system saw TLS the mesh originated, for its own name, not `.svc`.
    assert_eq!(seen["path"], "/pay?id=7");
    assert_eq!(seen["host"], format!("{OUTSIDE_NAME}:{OUTSIDE_PORT}"));
    assert_eq!(seen["sni"], OUTSIDE_NAME);
    assert_eq!(seen["tls"], "TLSv1.3");

    // Python requests (urllib3), a POST with a body.
    let script = "import requests, sys\nr = requests.post('http://treasury-api.svc/transfer', data=b'amount=500', timeout=10)\nprint(r.status_code)\nprint(r.text)\n";
    let out = w.client("python3").args(["-c", script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (code, body) = text.split_once('\n').unwrap_or_else(|| {
        panic!(
            "python requests: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(code, "200", "{text}");
    let seen = json(body.trim());
    assert_eq!(
        (seen["method"].as_str(), seen["body"].as_str()),
        (Some("POST"), Some("amount=500"))
    );

    // Taps show the external calls with the outside system as their upstream.
    let taps = w.agent.http_tap_events("treasury-api", "/pay", 1);
    assert_eq!(taps.len(), 1, "{taps:?}");
    assert_eq!(taps[0]["status"], 200);
    assert_eq!(
        taps[0]["upstream"],
        format!("https://{OUTSIDE_NAME}:{OUTSIDE_PORT}")
    );
    assert_eq!(
        w.agent
            .http_tap_events("treasury-api", "/transfer", 1)
            .len(),
        1
    );
}

#[test]
fn a_tls12_only_outside_system_is_reached_unless_the_spec_asks_for_tls13() {
    let w = World::new(2, &[]);
    let _outside = Outside::start(&w.net, 1, &w.pki, "1.2", None);
    w.deploy_treasury("", "");
    let (status, _, body) = w.call("http://treasury-api.svc/old");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["tls"], "TLSv1.2");

    // The same system, with the spec's floor at TLS 1.3: the handshake fails, the mesh says so.
    w.deploy_treasury(
        "  min_version: \"1.3\"\n",
        "routes:\n  - path: /\n    retries: 0\n",
    );
    let (status, error, body) = w.call("http://treasury-api.svc/old");
    assert_eq!(status, 502, "{body}");
    assert!(error.is_some(), "a mesh error carries x-hms-error");
    let log = w.agent.log();
    assert!(
        log.contains("TLS handshake with https://api.treasury.example:8443 failed"),
        "the agent's log names the failed handshake"
    );
}

#[test]
fn the_spec_s_client_certificate_is_presented_to_a_system_that_requires_one() {
    let w = World::new(2, &[]);
    let _outside = Outside::start(&w.net, 1, &w.pki, "1.3", Some(&w.pki.path("ca.pem")));
    // Without a client certificate the outside system refuses the handshake.
    w.deploy_treasury("", "routes:\n  - path: /\n    retries: 0\n");
    let (status, error, _) = w.call("http://treasury-api.svc/mtls");
    assert_eq!((status, error.is_some()), (502, true));
    w.deploy_treasury(
        &format!(
            "  client_cert: {}\n  client_key: {}\n",
            w.pki.p("client.pem"),
            w.pki.p("client.key")
        ),
        "",
    );
    let (status, _, body) = w.call("http://treasury-api.svc/mtls");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["client"], "treasury-client");
}

#[test]
fn allow_from_decides_who_may_call_the_outside_system() {
    let w = World::new(2, &[]);
    let outside = Outside::start(&w.net, 1, &w.pki, "1.3", None);
    w.agent
        .deploy_yaml("name: payments-svc\nport: 7000\n")
        .unwrap();
    w.deploy_treasury("", "policy: {allow_from: [payments-svc]}\n");
    // The cgroup itself is the host, not payments-svc.
    let (status, error, _) = w.call("http://treasury-api.svc/pay");
    assert_eq!((status, error.as_deref()), (403, Some("denied")));
    // payments-svc's own cgroup may.
    let out = w.agent.ctl(&[
        "run",
        "payments-svc",
        "--",
        tools::path_of("nsenter").to_str().unwrap(),
        &format!("--net=/run/netns/{}", w.net.hosts[0].netns),
        "--",
        tools::path_of("curl").to_str().unwrap(),
        "-sS",
        "--max-time",
        "10",
        "http://treasury-api.svc/pay",
    ]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&body)["path"], "/pay");
    drop(outside);
}

#[test]
fn retries_and_timeouts_apply_to_external_calls() {
    let w = World::new(2, &[]);
    let _outside = Outside::start(&w.net, 1, &w.pki, "1.3", None);
    w.deploy_treasury(
        "",
        "routes:\n  - path: /flaky\n    retries: 1\n  - path: /slow\n    timeout: 500ms\n",
    );
    // The outside system answers 503 once: the mesh retries the GET and the app sees 200.
    let (status, _, body) = w.call("http://treasury-api.svc/flaky/a");
    assert_eq!(status, 200, "{body}");
    let taps = w.agent.http_tap_events("treasury-api", "/flaky/a", 1);
    assert_eq!(taps[0]["retries"], 1, "{taps:?}");
    // A system slower than the route's timeout: 504 from the mesh, long before it answers.
    let started = Instant::now();
    let (status, error, _) = w.call("http://treasury-api.svc/slow");
    assert_eq!((status, error.as_deref()), (504, Some("timeout")));
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn undeclared_outside_connections_work_by_default() {
    let w = World::new(3, &[]);
    let declared = Outside::start(&w.net, 1, &w.pki, "1.3", None);
    let undeclared = Outside::start(&w.net, 2, &w.pki, "1.3", None);
    w.deploy_treasury("", "");
    assert_eq!(w.direct_connect(undeclared.addr), "ok");
    assert_eq!(w.direct_connect(declared.addr), "ok");
    assert_eq!(w.direct_sendto(undeclared.addr), "ok");
    let status = w.agent.ctl_json(&["status"]).unwrap();
    assert_eq!(status["egress"]["refuse_undeclared"], false);
}

#[test]
fn with_refusal_on_undeclared_outside_connections_are_refused_and_the_declared_name_works() {
    let w = World::new(3, &["--refuse-undeclared-egress"]);
    let declared = Outside::start(&w.net, 1, &w.pki, "1.3", None);
    let undeclared = Outside::start(&w.net, 2, &w.pki, "1.3", None);
    // Nothing declared yet: every outside address is refused, loopback is not.
    w.wait_direct(declared.addr, "EPERM");
    assert_eq!(w.direct_connect(undeclared.addr), "EPERM");
    w.deploy_treasury("", "");
    // The declared system's address becomes reachable directly, the other stays refused.
    w.wait_direct(declared.addr, "ok");
    assert_eq!(w.direct_connect(undeclared.addr), "EPERM");
    // Unconnected UDP too: a datagram to the undeclared address is refused at sendto(), one
    // to the declared address leaves; a DNS query to any resolver is still answered (the
    // hook sends port 53 to the agent's responder before the refusal is asked).
    assert_eq!(w.direct_sendto(undeclared.addr), "EPERM");
    assert_eq!(w.direct_sendto(declared.addr), "ok");
    let dig = w
        .client("dig")
        .args([
            &format!("@{}", undeclared.addr.ip()),
            "treasury-api.svc",
            "A",
            "+short",
            "+time=2",
            "+tries=2",
        ])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&dig.stdout);
    assert!(
        answer.trim().parse::<std::net::Ipv4Addr>().is_ok(),
        "a lookup through an outside resolver address is answered by the agent: {answer} {}",
        String::from_utf8_lossy(&dig.stderr)
    );
    // curl directly to the undeclared system: refused by the kernel at connect().
    let out = w.curl(&["-k", &format!("https://{}/", undeclared.addr)]);
    assert!(!out.status.success());
    // The declared name through the mesh works.
    let (status, _, body) = w.call("http://treasury-api.svc/pay");
    assert_eq!(status, 200, "{body}");
    // Visible: status, /metrics, and a tap line under the caller (the host).
    let status = w.agent.ctl_json(&["status"]).unwrap();
    assert_eq!(status["egress"]["refuse_undeclared"], true);
    assert!(
        status["egress"]["refused_total"].as_u64().unwrap() >= 3,
        "{}",
        status["egress"]
    );
    let deadline = Instant::now() + slack(Duration::from_secs(10));
    let refused_line = loop {
        let out = w.agent.ctl(&["tap", "host", "--last", "200", "-o", "json"]);
        let line = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|e| {
                e["mesh_error"] == "egress-refused" && e["callee"] == undeclared.addr.to_string()
            });
        if let Some(l) = line {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no egress-refused tap line: {} {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            w.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        refused_line["caller_process"]
            .as_str()
            .unwrap()
            .starts_with("python3["),
        "{refused_line}"
    );
    let out = tools::in_netns(&w.net.hosts[0].netns, "curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{}/metrics", w.agent.metrics),
        ])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hms_egress_refused_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
}
