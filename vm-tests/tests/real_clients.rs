//! The real-client matrix: programs other people wrote, with their defaults, inside the
//! meshed cgroup, calling `.svc` names through the real kernel hooks and a real agent. Each
//! case checks the body the backend answered and that the call shows in `hms-ctl tap`.
//!
//! Several of these clients open dual-stack `AF_INET6` sockets for IPv4 addresses (the JVM,
//! gRPC C-core) and so run the `connect6` hook; the others use `AF_INET`. Heavy runtimes
//! (JDK, grpcio, Go, Node, nghttp2) are host-only; the VM covers the mapped-address and IPv6
//! hooks with python3/curl/dig in `dual_stack.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::backend::Backend;
use vm_tests::cgroup::TestCgroup;
use vm_tests::grpc::{GrpcBackend, WATCH_MESSAGES};

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(mut cmd: Command, limit: Duration) -> Output {
    let program = format!("{:?}", cmd.get_program());
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (run `cargo xtask setup`)"));
    vm_tests::client::wait_output(child, vm_tests::slack(limit)).expect("client finished")
}

/// Asserts the tap shows exactly `n` calls to `path` answered `status`, made by `process`.
fn assert_tapped(agent: &TestAgent, service: &str, path: &str, n: usize, process: &str) {
    let events = agent.http_tap_events(service, path, n);
    assert_eq!(events.len(), n, "tap of {service} {path}: {events:#?}");
    for e in &events {
        assert_eq!(e["status"], 200, "{e}");
        assert_eq!(e["caller"], "host", "{e}");
        assert!(
            e["caller_process"]
                .as_str()
                .is_some_and(|p| p.starts_with(process)),
            "caller_process of {e} should start with {process}"
        );
    }
}

struct World {
    cg: TestCgroup,
    agent: TestAgent,
    backend: Backend,
    dir: tempfile::TempDir,
}

fn world(service: &str) -> World {
    let cg = TestCgroup::new("clients").expect("test cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    let backend = Backend::start(service, 0).expect("backend");
    agent.deploy(service, backend.addr.port()).expect("deploy");
    let dir = tempfile::tempdir().expect("temp dir");
    World {
        cg,
        agent,
        backend,
        dir,
    }
}

impl World {
    fn fail(&self, o: &Output) -> String {
        format!(
            "{}\nagent log:\n{}",
            text(o),
            vm_tests::client::tail(&self.agent.log(), 40)
        )
    }
}

const JAVA_CLIENT: &str = r#"
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class MeshPost {
    public static void main(String[] args) throws Exception {
        // JVM defaults: dual-stack AF_INET6 sockets, HTTP/2 preferred (so the first plain-HTTP
        // request carries Upgrade: h2c).
        HttpClient client = HttpClient.newHttpClient();
        for (int i = 0; i < 2; i++) {
            HttpRequest req = HttpRequest.newBuilder(URI.create(args[0]))
                .POST(HttpRequest.BodyPublishers.ofString("amount=" + i))
                .build();
            HttpResponse<String> resp = client.send(req, HttpResponse.BodyHandlers.ofString());
            System.out.print(resp.statusCode() + " " + resp.body());
        }
    }
}
"#;

#[test]
fn java_http_client_with_jvm_defaults_posts_to_a_svc_name() {
    let w = world("payments-svc");
    let src = w.dir.path().join("MeshPost.java");
    std::fs::write(&src, JAVA_CLIENT).unwrap();
    let mut javac = vm_tests::tools::command("javac");
    javac.arg("-d").arg(w.dir.path()).arg(&src);
    let o = run(javac, Duration::from_secs(120));
    assert!(o.status.success(), "javac: {}", text(&o));
    let mut java = w.cg.command("java");
    java.arg("-cp")
        .arg(w.dir.path())
        .args(["MeshPost", "http://payments-svc.svc/pay"]);
    let o = run(java, Duration::from_secs(60));
    assert!(o.status.success(), "{}", w.fail(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "200 payments-svc saw POST /pay\n200 payments-svc saw POST /pay\n",
        "{}",
        w.fail(&o)
    );
    // Both requests reached the backend as ordinary HTTP/1.1 requests (the h2c offer was
    // declined, not spliced), with the offer's headers gone.
    let seen = w.backend.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    for r in &seen {
        assert_eq!(r.header("upgrade"), None, "{r:#?}");
        assert_eq!(r.header("http2-settings"), None, "{r:#?}");
    }
    assert_tapped(&w.agent, "payments-svc", "/pay", 2, "java[");
}

const GRPCIO_CLIENT: &str = r#"
import sys, grpc
target = sys.argv[1]
with grpc.insecure_channel(target) as channel:
    # grpc.health.v1.Health, without generated stubs: an empty HealthCheckRequest is b"", a
    # SERVING HealthCheckResponse is b"\x08\x01".
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    print("check", check(b"", timeout=10).hex())
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
    print("watch", [m.hex() for m in watch(b"", timeout=10)])
"#;

#[test]
fn grpcio_unary_and_server_streaming_reach_a_svc_name() {
    let cg = TestCgroup::new("grpcio").unwrap();
    let agent = TestAgent::start(cg.path()).unwrap();
    let backend = GrpcBackend::start(0).unwrap();
    agent.deploy("grpc-svc", backend.addr.port()).unwrap();
    let mut py = cg.command("python3");
    py.args(["-c", GRPCIO_CLIENT])
        .arg(format!("grpc-svc.svc:{}", backend.addr.port()));
    let o = run(py, Duration::from_secs(60));
    assert!(
        o.status.success(),
        "{}\nagent log:\n{}",
        text(&o),
        vm_tests::client::tail(&agent.log(), 40)
    );
    let watch = ["'0801'"; WATCH_MESSAGES].join(", ");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("check 0801\nwatch [{watch}]\n"),
        "{}",
        text(&o)
    );
    assert_eq!(backend.calls(), 2);
    assert_tapped(
        &agent,
        "grpc-svc",
        "/grpc.health.v1.Health/Check",
        1,
        "python3",
    );
    assert_tapped(
        &agent,
        "grpc-svc",
        "/grpc.health.v1.Health/Watch",
        1,
        "python3",
    );
}

/// Runs `cmd` (a client inside the cgroup) and checks its stdout, the backend and the tap.
fn check_client(w: &World, cmd: Command, path: &str, expected_stdout: &str, process: &str) {
    let before = w.backend.seen_count();
    let o = run(cmd, Duration::from_secs(60));
    assert!(o.status.success(), "{}", w.fail(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        expected_stdout,
        "{}",
        w.fail(&o)
    );
    assert_eq!(
        w.backend.seen_count(),
        before + 1,
        "{:#?}",
        w.backend.seen()
    );
    assert_tapped(&w.agent, &w.backend.name, path, 1, process);
}

#[test]
fn curl_over_ipv4_and_ipv6_reaches_a_svc_name() {
    let w = world("curl-svc");
    for (flag, path) in [("-4", "/curl4"), ("-6", "/curl6")] {
        let mut curl = w.cg.command("curl");
        curl.args([flag, "-sS", "--max-time", "10"])
            .arg(format!("http://curl-svc.svc{path}"));
        check_client(
            &w,
            curl,
            path,
            &format!("curl-svc saw GET {path}\n"),
            "curl[",
        );
    }
}

const REQUESTS_CLIENT: &str = r#"
import sys, requests
r = requests.post(sys.argv[1], data=b"amount=5", timeout=10)
print(r.status_code, r.text, end="")
"#;

#[test]
fn python_requests_posts_to_a_svc_name() {
    let w = world("requests-svc");
    let mut py = w.cg.command("python3");
    py.args(["-c", REQUESTS_CLIENT, "http://requests-svc.svc/pay"]);
    check_client(
        &w,
        py,
        "/pay",
        "200 requests-svc saw POST /pay\n",
        "python3[",
    );
}

const GO_CLIENT: &str = r#"package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	resp, err := http.Get(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("%d %s", resp.StatusCode, body)
}
"#;

/// Where `go build` keeps its cache between runs: under the workspace's target/.
fn go_cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/go-cache")
}

#[test]
fn a_go_net_http_client_from_the_standard_library_gets_a_svc_name() {
    let w = world("go-svc");
    let src = w.dir.path().join("main.go");
    std::fs::write(&src, GO_CLIENT).unwrap();
    let bin = w.dir.path().join("meshget");
    let mut go = vm_tests::tools::command("go");
    go.arg("build")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .current_dir(w.dir.path())
        .env("GOCACHE", go_cache().join("build"))
        .env("GOPATH", go_cache().join("path"))
        .env("GO111MODULE", "off")
        // The pure-Go resolver: Go's own DNS client, not glibc's.
        .env("CGO_ENABLED", "0");
    let o = run(go, Duration::from_secs(300));
    assert!(o.status.success(), "go build: {}", text(&o));
    // Built here from source, like the workspace's own binaries: no package provides it.
    let mut client = w.cg.binary(&bin);
    client.arg("http://go-svc.svc/get");
    check_client(&w, client, "/get", "200 go-svc saw GET /get\n", "meshget[");
}

#[test]
fn node_fetch_gets_a_svc_name() {
    let w = world("node-svc");
    let mut node = w.cg.command("node");
    node.args([
        "-e",
        "fetch(process.argv[1]).then(async r => process.stdout.write(`${r.status} ${await r.text()}`))\
         .catch(e => { console.error(e); process.exit(1) })",
        "http://node-svc.svc/fetch",
    ]);
    check_client(&w, node, "/fetch", "200 node-svc saw GET /fetch\n", "node[");
}

/// nghttpd (nghttp2's own server) serving `dir` over h2c on 127.0.0.1:`port`: the mesh
/// forwards HTTP/2 to instances as HTTP/2, so the instance must speak it.
struct Nghttpd(std::process::Child);

impl Nghttpd {
    fn start(dir: &Path, port: u16) -> Nghttpd {
        let child = vm_tests::tools::command("nghttpd")
            .args(["--no-tls", "-d"])
            .arg(dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nghttpd (run `cargo xtask setup`)");
        let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(10));
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nghttpd did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nghttpd(child)
    }
}

impl Drop for Nghttpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn http2_with_prior_knowledge_from_nghttp2_reaches_a_svc_name() {
    let cg = TestCgroup::new("h2").unwrap();
    let agent = TestAgent::start(cg.path()).unwrap();
    let docs = tempfile::tempdir().unwrap();
    std::fs::write(docs.path().join("h2body"), "h2-svc says hello\n").unwrap();
    std::fs::write(docs.path().join("h2load"), "ok\n").unwrap();
    let port = vm_tests::ports::free_port();
    let _server = Nghttpd::start(docs.path(), port);
    agent.deploy("h2-svc", port).unwrap();
    let fail = |o: &Output| {
        format!(
            "{}\nagent log:\n{}",
            text(o),
            vm_tests::client::tail(&agent.log(), 40)
        )
    };
    // nghttp: one request (HTTP/2 prior knowledge is its default for http://), body checked.
    let mut nghttp = cg.command("nghttp");
    nghttp.arg("http://h2-svc.svc/h2body");
    let o = run(nghttp, Duration::from_secs(60));
    assert!(o.status.success(), "{}", fail(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "h2-svc says hello\n",
        "{}",
        fail(&o)
    );
    assert_tapped(&agent, "h2-svc", "/h2body", 1, "nghttp[");
    // h2load: several concurrent streams on one connection, all answered.
    let mut h2load = cg.command("h2load");
    h2load.args(["-n", "6", "-c", "1", "-m", "3", "http://h2-svc.svc/h2load"]);
    let o = run(h2load, Duration::from_secs(60));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", fail(&o));
    assert!(out.contains("6 succeeded, 0 failed"), "{}", fail(&o));
    assert!(out.contains("status codes: 6 2xx"), "{}", fail(&o));
    assert!(out.contains("Application protocol: h2c"), "{}", fail(&o));
    assert_tapped(&agent, "h2-svc", "/h2load", 6, "h2load[");
}
