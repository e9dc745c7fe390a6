//! User stories of connection rotation: backends that close or rotate their connections
//! (nginx's `keepalive_requests`, a hyper service shutting down gracefully) cause no failed
//! request through the mesh, for any method. Real nginx, real h2load (nghttp2) inside the
//! agent's cgroup, real kernel redirect.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::cgroup::TestCgroup;
use vm_tests::client::tail;
use vm_tests::h2_backend::GracefulH2Backend;
use vm_tests::nginx::{Listen, Nginx};

/// What h2load reported.
#[derive(Debug, Default)]
struct Load {
    done: u64,
    succeeded: u64,
    failed: u64,
    errored: u64,
    status_2xx: u64,
    raw: String,
}

fn parse_h2load(stdout: &str) -> Load {
    let mut load = Load {
        raw: stdout.to_string(),
        ..Default::default()
    };
    // "requests: 10000 total, 10000 started, 10000 done, 10000 succeeded, 0 failed, 0 errored, 0 timeout"
    // "status codes: 10000 2xx, 0 3xx, 0 4xx, 0 5xx"
    let count = |line: &str, what: &str| -> u64 {
        line.split(',')
            .map(str::trim)
            .find_map(|part| {
                let part = part.rsplit(':').next().unwrap_or(part).trim();
                let (n, label) = part.split_once(' ')?;
                (label.trim() == what).then(|| n.parse().ok()).flatten()
            })
            .unwrap_or(0)
    };
    for line in stdout.lines() {
        if line.starts_with("requests:") {
            load.done = count(line, "done");
            load.succeeded = count(line, "succeeded");
            load.failed = count(line, "failed");
            load.errored = count(line, "errored");
        } else if line.starts_with("status codes:") {
            load.status_2xx = count(line, "2xx");
        }
    }
    load
}

/// h2load inside the cgroup: `requests` requests over 4 connections x 8 streams (HTTP/2
/// prior knowledge, or `--h1`), a POST of `body` when given.
fn h2load_command(
    cg: &TestCgroup,
    url: &str,
    requests: u32,
    h1: bool,
    body: Option<&std::path::Path>,
) -> Command {
    let mut cmd = cg.command("h2load");
    cmd.args(["-n", &requests.to_string(), "-c", "4", "-T", "30"]);
    if h1 {
        cmd.arg("--h1");
    } else {
        cmd.args(["-m", "8"]);
    }
    if let Some(b) = body {
        cmd.arg("-d").arg(b);
    }
    cmd.arg(url).stdin(Stdio::null()).stdout(Stdio::piped());
    cmd
}

fn run_load(cmd: Command) -> Load {
    let child = { cmd }
        .spawn()
        .expect("h2load (apt-get install nghttp2-client)");
    let out = vm_tests::client::wait_output(child, vm_tests::slack(Duration::from_secs(240)))
        .expect("h2load finished");
    parse_h2load(&String::from_utf8_lossy(&out.stdout))
}

fn post_body() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(f.path(), "order=42&".repeat(100)).expect("write body");
    f
}

fn assert_all_ok(load: &Load, requests: u32, agent: &TestAgent) {
    let n = u64::from(requests);
    assert!(
        load.done == n && load.succeeded == n && load.failed == 0 && load.errored == 0,
        "{}\n{}",
        load.raw,
        notable(agent)
    );
    assert_eq!(load.status_2xx, n, "{}", load.raw);
    assert_no_orphans(agent);
}

/// No request reached the proxy's safety net for requests an ended HTTP/2 connection never
/// answered (it would have turned a lost request into a 502 instead of a hang): every
/// request refused by a connection's rotation was answered and sent again.
fn assert_no_orphans(agent: &TestAgent) {
    assert_eq!(
        agent.orphaned_requests(),
        0,
        "requests lost by a closing connection\n{}",
        notable(agent)
    );
}

/// The agent's log without its per-request debug lines.
fn notable(agent: &TestAgent) -> String {
    let log = agent.log();
    let kept: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("DEBUG") || l.contains("upstream failed"))
        .collect();
    tail(&kept.join("\n"), 40)
}

fn unprocessed(agent: &TestAgent) -> u64 {
    let s = agent.ctl_json(&["status"]).expect("status");
    s["http"]["unprocessed"].as_u64().unwrap_or(0)
}

#[test]
fn nginx_rotating_its_http2_connections_every_100_requests_fails_no_get_or_post() {
    let cg = TestCgroup::new("rot-h2").expect("cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    let nginx = Nginx::start("h2-nginx", Listen::H2c, 100).expect("nginx");
    agent.deploy("h2-nginx", nginx.addr.port()).unwrap();
    let url = "http://h2-nginx.svc/orders";

    let gets = run_load(h2load_command(&cg, url, 10_000, false, None));
    assert_all_ok(&gets, 10_000, &agent);
    let body = post_body();
    let posts = run_load(h2load_command(&cg, url, 10_000, false, Some(body.path())));
    assert_all_ok(&posts, 10_000, &agent);

    let seen = nginx.wait_for_requests(20_000);
    let connections: std::collections::BTreeSet<u64> = seen.iter().map(|r| r.0).collect();
    let posts_seen = seen.iter().filter(|r| r.2 == "POST").count();
    eprintln!(
        "MEASURED: nginx saw {} requests ({posts_seen} POST) on {} connections; agent sent {} again after rotation",
        seen.len(),
        connections.len(),
        unprocessed(&agent)
    );
    // nginx closes each connection after 100 requests: 20,000 need at least 200.
    assert!(
        connections.len() >= 200,
        "{} connections",
        connections.len()
    );
    let odd: Vec<_> = seen.iter().filter(|r| r.1 > 100 || r.3 != 200).collect();
    assert!(
        odd.is_empty(),
        "nginx kept its limit and answered all: {odd:?}"
    );
    // Every request reached nginx exactly once: the refused ones were not processed there.
    assert_eq!(seen.len(), 20_000, "requests nginx processed");
    assert_eq!(posts_seen, 10_000, "POSTs nginx processed");
    let h = agent.ctl_json(&["describe", "h2-nginx"]).unwrap();
    assert_eq!(h["health"][0]["ejections_total"], 0, "never ejected: {h}");
}

#[test]
fn nginx_closing_http1_keepalive_connections_fails_no_post() {
    let cg = TestCgroup::new("rot-h1").expect("cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    let nginx = Nginx::start("h1-nginx", Listen::Http1, 10).expect("nginx");
    agent.deploy("h1-nginx", nginx.addr.port()).unwrap();
    let body = post_body();
    let load = run_load(h2load_command(
        &cg,
        "http://h1-nginx.svc/orders",
        5_000,
        true,
        Some(body.path()),
    ));
    assert_all_ok(&load, 5_000, &agent);
    let seen = nginx.wait_for_requests(5_000);
    let connections: std::collections::BTreeSet<u64> = seen.iter().map(|r| r.0).collect();
    eprintln!(
        "MEASURED: nginx saw {} POSTs on {} connections",
        seen.len(),
        connections.len()
    );
    assert_eq!(seen.len(), 5_000, "each POST processed exactly once");
    assert!(
        connections.len() >= 500,
        "{} connections",
        connections.len()
    );
}

#[test]
fn a_hyper_backend_shutting_down_gracefully_mid_load_fails_no_request() {
    let cg = TestCgroup::new("rot-goaway").expect("cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    let mut leaving = GracefulH2Backend::start("goaway-svc").expect("backend");
    let staying = GracefulH2Backend::start("goaway-svc").expect("backend");
    agent
        .deploy_yaml(&format!(
            "name: goaway-svc\nport: {}\nreplicas: [{}]\npolicy: allow_from_any\n",
            leaving.addr.port(),
            staying.addr.port()
        ))
        .unwrap();
    let body = post_body();
    let child = h2load_command(
        &cg,
        "http://goaway-svc.svc/pay",
        10_000,
        false,
        Some(body.path()),
    )
    .spawn()
    .expect("h2load");
    // Mid-load: once the leaving instance has answered a good share.
    let started = Instant::now();
    while leaving.served() < 1_000 {
        assert!(
            started.elapsed() < vm_tests::slack(Duration::from_secs(60)),
            "load never reached the instance: {} served\n{}",
            leaving.served(),
            tail(&agent.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    leaving.shutdown_gracefully();
    let at_shutdown = staying.served();
    let out = vm_tests::client::wait_output(child, vm_tests::slack(Duration::from_secs(240)))
        .expect("h2load finished");
    let load = parse_h2load(&String::from_utf8_lossy(&out.stdout));
    eprintln!(
        "MEASURED: leaving instance served {}, staying {} ({} after the shutdown); agent sent {} again",
        leaving.served(),
        staying.served(),
        staying.served() - at_shutdown,
        unprocessed(&agent)
    );
    assert_all_ok(&load, 10_000, &agent);
    assert!(
        staying.served() > at_shutdown,
        "the rest went to the other instance"
    );
    // Every POST was processed exactly once.
    assert_eq!(leaving.served() + staying.served(), 10_000);
}

#[test]
fn a_broken_http2_connection_under_16_streams_counts_once_against_the_instance() {
    let cg = TestCgroup::new("rot-break").expect("cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    // Holds the first 16 requests; then the connection under them breaks.
    let backend = GracefulH2Backend::start_holding("break-svc", 16).expect("backend");
    agent.deploy("break-svc", backend.addr.port()).unwrap();
    // 16 concurrent GETs on one client connection: one shared upstream connection.
    let mut cmd = cg.command("h2load");
    cmd.args(["-n", "16", "-c", "1", "-m", "16", "-T", "30"])
        .arg("http://break-svc.svc/hold")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let child = cmd.spawn().expect("h2load");
    let started = Instant::now();
    while backend.received() < 16 {
        assert!(
            started.elapsed() < vm_tests::slack(Duration::from_secs(30)),
            "only {} requests arrived\n{}",
            backend.received(),
            notable(&agent)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    backend.break_connections();
    let out = vm_tests::client::wait_output(child, vm_tests::slack(Duration::from_secs(60)))
        .expect("h2load finished");
    let load = parse_h2load(&String::from_utf8_lossy(&out.stdout));
    let h = agent.ctl_json(&["describe", "break-svc"]).unwrap();
    let health = &h["health"][0];
    eprintln!(
        "MEASURED: after the break: {health}; backend answered {}",
        backend.served()
    );
    // 16 failures would have ejected it (5 trip the breaker) and failed the retries with
    // circuit-open; counted once, the GETs are retried on a new connection and succeed.
    assert_eq!(
        health["ejections_total"],
        0,
        "{health}\n{}",
        notable(&agent)
    );
    assert_all_ok(&load, 16, &agent);
    assert_eq!(backend.served(), 16, "every GET retried once and answered");
}

#[test]
fn a_post_on_an_http2_connection_that_breaks_under_it_gets_a_prompt_502_not_a_hang() {
    let cg = TestCgroup::new("rot-post-break").expect("cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    // Holds the first request; then the connection under it breaks (no GOAWAY).
    let backend = GracefulH2Backend::start_holding("post-break-svc", 1).expect("backend");
    agent.deploy("post-break-svc", backend.addr.port()).unwrap();
    let curl = cg.command("curl");
    // curl gives up after 30 s: a hang shows as its timeout (exit 28), not as a 502.
    let client = std::thread::spawn(move || {
        vm_tests::client::curl(
            curl,
            Duration::from_secs(30),
            &[
                "--http2-prior-knowledge",
                "--data",
                "order=42",
                "http://post-break-svc.svc/pay",
            ],
        )
    });
    let started = Instant::now();
    while backend.received() < 1 {
        assert!(
            started.elapsed() < vm_tests::slack(Duration::from_secs(30)),
            "the POST never arrived\n{}",
            notable(&agent)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    backend.break_connections();
    let reply = client.join().expect("curl thread");
    eprintln!(
        "MEASURED: POST on a broken HTTP/2 connection: {} after {:?}",
        reply.status, reply.elapsed
    );
    // It may have been processed: not sent again (not idempotent), answered at once.
    assert_eq!(reply.exit, Some(0), "{reply}\n{}", notable(&agent));
    assert_eq!(reply.status, 502, "{reply}\n{}", notable(&agent));
    assert_eq!(
        reply.header("x-hms-error"),
        Some("upstream-failed"),
        "{reply}"
    );
    assert_eq!(backend.served(), 0, "the POST was not sent again");
    assert_no_orphans(&agent);
}

#[test]
fn h2load_output_is_parsed() {
    let l = parse_h2load(
        "finished in 1.2s\nrequests: 100 total, 100 started, 100 done, 99 succeeded, 1 failed, 1 errored, 0 timeout\nstatus codes: 99 2xx, 0 3xx, 0 4xx, 0 5xx\n",
    );
    assert_eq!(
        (l.done, l.succeeded, l.failed, l.errored, l.status_2xx),
        (100, 99, 1, 1, 99)
    );
}
