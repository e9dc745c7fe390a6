//! User stories of the HTTP layer's retries, route timeouts and circuit breakers, through the
//! real kernel redirect, a real agent and unmodified curl inside the agent's cgroup. Every
//! assertion counts what the backend saw, not only what the client got.

use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::backend::{Backend, Behavior};
use vm_tests::cgroup::TestCgroup;
use vm_tests::client::{Reply, curl, tail};

const CURL_MAX: Duration = Duration::from_secs(10);

fn setup(hint: &str) -> (TestCgroup, TestAgent) {
    let cg = TestCgroup::new(hint).expect("test cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    (cg, agent)
}

fn get(cg: &TestCgroup, url: &str) -> Reply {
    curl(cg.command("curl"), CURL_MAX, &[url])
}

fn ctl_ok(agent: &TestAgent, args: &[&str]) {
    let o = agent.ctl(args);
    assert!(
        o.status.success(),
        "hms-ctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_failed_get_is_retried_exactly_once_by_default() {
    let (cg, agent) = setup("retry-once");
    let flaky = Backend::start_with("flaky-svc", 0, Behavior::fail_first(1, 503)).unwrap();
    let broken = Backend::start_with("broken-svc", 0, Behavior::always(503)).unwrap();
    agent.deploy("flaky-svc", flaky.addr.port()).unwrap();
    agent.deploy("broken-svc", broken.addr.port()).unwrap();

    let r = get(&cg, "http://flaky-svc.svc/once");
    let log = || tail(&agent.log(), 30);
    assert_eq!(r.status, 200, "{r}\n{}", log());
    assert_eq!(r.body, "flaky-svc saw GET /once\n");
    let paths: Vec<String> = flaky.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/once", "/once"], "first attempt 503, one retry");

    let r = get(&cg, "http://broken-svc.svc/always");
    assert_eq!(r.status, 503, "{r}\n{}", log());
    assert_eq!(
        r.header("x-hms-error"),
        None,
        "the service's own 503 is passed on, not a mesh error: {r}"
    );
    assert_eq!(r.body, "broken-svc saw GET /always\n");
    assert_eq!(
        broken.seen_count(),
        2,
        "one GET = first attempt + one retry"
    );
}

#[test]
fn a_reset_connection_is_retried_for_a_get() {
    let (cg, agent) = setup("retry-reset");
    let backend = Backend::start_with("resetting-svc", 0, Behavior::reset_first(1)).unwrap();
    agent.deploy("resetting-svc", backend.addr.port()).unwrap();
    let r = get(&cg, "http://resetting-svc.svc/r");
    assert_eq!(r.status, 200, "{r}\n{}", tail(&agent.log(), 30));
    assert_eq!(backend.seen_count(), 2);
}

#[test]
fn a_post_that_was_sent_is_not_retried_but_a_put_is() {
    let (cg, agent) = setup("post-once");
    let broken = Backend::start_with("orders-svc", 0, Behavior::always(503)).unwrap();
    agent.deploy("orders-svc", broken.addr.port()).unwrap();

    let r = curl(
        cg.command("curl"),
        CURL_MAX,
        &[
            "-X",
            "POST",
            "--data",
            "item=42",
            "http://orders-svc.svc/orders",
        ],
    );
    assert_eq!(r.status, 503, "{r}\n{}", tail(&agent.log(), 30));
    let seen = broken.seen();
    assert_eq!(seen.len(), 1, "a POST is sent once: {seen:?}");
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].body, b"item=42");

    // An idempotent method with a small body is replayed.
    let r = curl(
        cg.command("curl"),
        CURL_MAX,
        &[
            "-X",
            "PUT",
            "--data",
            "item=43",
            "http://orders-svc.svc/orders/43",
        ],
    );
    assert_eq!(r.status, 503, "{r}");
    let seen = broken.seen();
    assert_eq!(seen.len(), 3, "PUT: attempt + retry: {seen:?}");
    assert!(
        seen[1..]
            .iter()
            .all(|s| s.method == "PUT" && s.body == b"item=43"),
        "the retry carries the same body: {seen:?}"
    );
}

#[test]
fn a_2s_route_timeout_fires_between_2_and_3_seconds() {
    let (cg, agent) = setup("timeout");
    let slow =
        Backend::start_with("slow-svc", 0, Behavior::delay(Duration::from_secs(10))).unwrap();
    agent.deploy("slow-svc", slow.addr.port()).unwrap();
    ctl_ok(
        &agent,
        &["route", "set", "slow-svc", "/slow", "--timeout", "2s"],
    );

    let r = get(&cg, "http://slow-svc.svc/slow/report");
    assert_eq!(r.status, 504, "{r}\n{}", tail(&agent.log(), 30));
    assert_eq!(r.header("x-hms-error"), Some("timeout"), "{r}");
    assert!(
        r.elapsed >= Duration::from_secs(2) && r.elapsed < vm_tests::slack(Duration::from_secs(3)),
        "answered after {:?}",
        r.elapsed
    );
    assert_eq!(
        slow.seen_count(),
        1,
        "the timeout bounds the whole exchange: no retry after it"
    );
    // The trace id of the mesh's answer is there too.
    assert!(r.header("x-hms-trace-id").is_some(), "{r}");
}

#[test]
fn a_route_timeout_bounds_the_wait_for_headers_not_a_slow_body() {
    let (cg, agent) = setup("slowbody");
    // Headers at once, then the body in 4 pieces over 1.5 s.
    let backend = Backend::start_with(
        "stream-svc",
        0,
        Behavior::slow_body(4, Duration::from_millis(500)),
    )
    .unwrap();
    agent.deploy("stream-svc", backend.addr.port()).unwrap();
    ctl_ok(
        &agent,
        &["route", "set", "stream-svc", "/", "--timeout", "1s"],
    );
    let r = get(&cg, "http://stream-svc.svc/feed");
    assert_eq!(r.status, 200, "{r}\n{}", tail(&agent.log(), 30));
    assert_eq!(r.body, "stream-svc saw GET /feed\n", "{r}");
    assert!(r.elapsed >= Duration::from_millis(1400), "{r}");
}

/// The instance's breaker as `describe -o json` shows it.
fn health_of(agent: &TestAgent, service: &str, addr: &str) -> serde_json::Value {
    let d = agent.ctl_json(&["describe", service]).unwrap();
    d["health"]
        .as_array()
        .and_then(|h| h.iter().find(|i| i["addr"] == addr).cloned())
        .unwrap_or_else(|| panic!("no health for {addr}: {d}"))
}

/// Sends `n` sequential GETs on one keep-alive connection; returns their status codes.
fn burst_of_gets(cg: &TestCgroup, service: &str, n: usize) -> Vec<u16> {
    let urls: Vec<String> = (0..n)
        .map(|i| format!("http://{service}.svc/req/{i}"))
        .collect();
    let mut cmd = cg.command("curl");
    cmd.args(["-s", "--max-time", "10", "-w", "\nCODE %{http_code}\n"])
        .args(&urls);
    let out = cmd.output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("CODE "))
        .map(|c| c.trim().parse().unwrap_or(0))
        .collect()
}

#[test]
fn after_5_failures_the_bad_instance_stops_receiving_traffic_and_gets_one_probe_after_the_backoff()
{
    let (cg, agent) = setup("breaker");
    let good = Backend::start("shaky-svc", 0).unwrap();
    let bad = Backend::start_with("shaky-svc-bad", 0, Behavior::always(503)).unwrap();
    agent
        .deploy_yaml(&format!(
            "name: shaky-svc\nport: {}\nreplicas: [{}]\npolicy: allow_from_any\n",
            good.addr.port(),
            bad.addr.port()
        ))
        .unwrap();
    // No retries, so every failure reaches the client and the counts are exact.
    ctl_ok(
        &agent,
        &["route", "set", "shaky-svc", "/", "--retries", "0"],
    );
    let bad_addr = bad.addr.to_string();

    // Until the bad instance has failed 5 times (normally the first batch of 40).
    let mut codes = Vec::new();
    // Small bursts, so the count is checked soon after the 5th failure even on a slow
    // machine (the first ejection lasts only 0.5-1 s).
    for _ in 0..100 {
        codes.extend(burst_of_gets(&cg, "shaky-svc", 4));
        if bad.seen_count() >= 5 {
            break;
        }
    }
    let log = || tail(&agent.log(), 40);
    assert_eq!(
        bad.seen_count(),
        5,
        "exactly 5 failures reach the bad instance before it is ejected\n{}",
        log()
    );
    assert_eq!(codes.iter().filter(|c| **c == 503).count(), 5, "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 503), "{codes:?}");
    let h = health_of(&agent, "shaky-svc", &bad_addr);
    assert_eq!(h["state"], "open", "{h}");
    assert_eq!(h["ejections_total"], 1, "{h}");
    let left = h["ejected_for_ms"].as_u64().expect("open has a deadline");
    assert!(left <= 1000, "first backoff is 0.5-1 s: {h}");

    // While ejected (at least another 200 ms): all traffic goes to the good instance.
    // (Under the VM's emulation 20 requests can outlast the ejection; the count below still
    // proves the instance got nothing while ejected.)
    if left >= 200 && !vm_tests::in_vm() {
        let codes = burst_of_gets(&cg, "shaky-svc", 20);
        assert_eq!(codes, vec![200; 20]);
        assert_eq!(bad.seen_count(), 5, "ejected instance got traffic");
    }

    // Once the backoff has passed, exactly one probe goes to it.
    let waited = Instant::now();
    loop {
        let h = health_of(&agent, "shaky-svc", &bad_addr);
        if h["ejected_for_ms"] == 0 {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(2),
            "backoff never passed: {h}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut probe_codes = Vec::new();
    // Small bursts: stop as soon as the probe went, before a later backoff could end.
    for _ in 0..100 {
        probe_codes.extend(burst_of_gets(&cg, "shaky-svc", 2));
        if bad.seen_count() > 5 {
            break;
        }
    }
    assert_eq!(
        bad.seen_count(),
        6,
        "one probe after the backoff (clients got {probe_codes:?})\n{}",
        log()
    );
    assert_eq!(
        probe_codes.iter().filter(|c| **c == 503).count(),
        1,
        "{probe_codes:?}"
    );
    let h = health_of(&agent, "shaky-svc", &bad_addr);
    assert_eq!(h["state"], "open", "the failed probe ejects it again: {h}");
    assert_eq!(h["ejections_total"], 2, "{h}");
    let left = h["ejected_for_ms"].as_u64().unwrap();
    assert!(left > 0 && left <= 2000, "second backoff is 1-2 s: {h}");
    let good_h = health_of(&agent, "shaky-svc", &good.addr.to_string());
    assert_eq!(good_h["state"], "closed", "{good_h}");
}

/// A route timeout counts against the instance that caused it: the hung instance is
/// charged a failure (and its slowness) each time, so it is ejected after 5.
#[test]
fn an_instance_that_never_answers_is_ejected_after_5_timeouts() {
    let (cg, agent) = setup("hang");
    let good = Backend::start("hang-svc", 0).unwrap();
    let hung =
        Backend::start_with("hang-svc-hung", 0, Behavior::delay(Duration::from_secs(30))).unwrap();
    agent
        .deploy_yaml(&format!(
            "name: hang-svc\nport: {}\nreplicas: [{}]\npolicy: allow_from_any\n",
            good.addr.port(),
            hung.addr.port()
        ))
        .unwrap();
    ctl_ok(
        &agent,
        &[
            "route",
            "set",
            "hang-svc",
            "/",
            "--timeout",
            "200ms",
            "--retries",
            "0",
        ],
    );
    let mut timeouts = 0;
    for i in 0..30 {
        let r = get(&cg, &format!("http://hang-svc.svc/n/{i}"));
        if r.status == 504 {
            timeouts += 1;
        }
    }
    let h = health_of(&agent, "hang-svc", &hung.addr.to_string());
    eprintln!(
        "MEASURED: hung instance got {} of 30 requests ({timeouts} timeouts); breaker {h}",
        hung.seen_count()
    );
    assert!(
        hung.seen_count() <= 6,
        "a black-holed instance keeps getting traffic: {} of 30 requests, breaker {h}",
        hung.seen_count()
    );
}
