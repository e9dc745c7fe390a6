//! User stories of bad input on the HTTP layer: malformed requests, oversized headers,
//! slow-loris clients and a backend that dies mid-answer get a clear answer or a bounded
//! close, and the agent keeps serving everyone else. Raw bytes are sent from INSIDE the
//! cgroup to `NAME.svc`, since only redirected connections reach the HTTP layer.

use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::backend::{Backend, Behavior};
use vm_tests::cgroup::TestCgroup;
use vm_tests::client::{RawEnd, curl, raw_exchange, tail};

const CURL_MAX: Duration = Duration::from_secs(10);

fn setup(service: &str, behavior: Behavior) -> (TestCgroup, TestAgent, Backend) {
    let cg = TestCgroup::new("badinput").expect("test cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    let backend = Backend::start_with(service, 0, behavior).unwrap();
    agent.deploy(service, backend.addr.port()).unwrap();
    (cg, agent, backend)
}

fn still_serving(cg: &TestCgroup, agent: &TestAgent, service: &str, path: &str) {
    let r = curl(
        cg.command("curl"),
        CURL_MAX,
        &[&format!("http://{service}.svc{path}")],
    );
    assert_eq!(r.status, 200, "{r}\n{}", tail(&agent.log(), 20));
    assert_eq!(r.body, format!("{service} saw GET {path}\n"));
}

#[test]
fn a_malformed_request_gets_400_and_the_agent_keeps_serving() {
    let (cg, agent, backend) = setup("parse-svc", Behavior::ok());
    for payload in [
        &b"GET / HTTP/1.1\r\nHost x\r\n\r\n"[..],
        b"GET /\x01\x02 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    ] {
        let r = raw_exchange(
            cg.command("python3"),
            "parse-svc.svc",
            80,
            payload,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            r.status(),
            Some(400),
            "{payload:?} -> {r:?}: {}\n{}",
            r.text(),
            tail(&agent.log(), 20)
        );
        assert_ne!(r.end, RawEnd::TimedOut, "connection left open: {r:?}");
    }
    assert_eq!(backend.seen_count(), 0, "nothing malformed was forwarded");
    still_serving(&cg, &agent, "parse-svc", "/after");
    let status = agent.ctl_json(&["status"]).unwrap();
    assert_eq!(
        status["http"]["bad_requests"], 3,
        "each one counted: {status}"
    );
}

#[test]
fn a_100_kib_header_gets_431() {
    let (cg, agent, backend) = setup("big-svc", Behavior::ok());
    let mut payload = b"GET / HTTP/1.1\r\nHost: big-svc.svc\r\nX-Big: ".to_vec();
    payload.extend(std::iter::repeat_n(b'a', 100 * 1024));
    payload.extend_from_slice(b"\r\n\r\n");
    let r = raw_exchange(
        cg.command("python3"),
        "big-svc.svc",
        80,
        &payload,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(
        r.status(),
        Some(431),
        "{r:?}: {}\n{}",
        r.text(),
        tail(&agent.log(), 20)
    );
    assert_eq!(backend.seen_count(), 0);
    still_serving(&cg, &agent, "big-svc", "/after");
}

#[test]
fn a_slow_loris_is_closed_within_12s_while_others_are_served() {
    let (cg, agent, backend) = setup("loris-svc", Behavior::ok());
    let cmd = cg.command("python3");
    let loris = std::thread::spawn(move || {
        raw_exchange(
            cmd,
            "loris-svc.svc",
            80,
            b"GET /slow HTTP/1.1\r\nHost: loris-svc.svc\r\nX-Half: ",
            Duration::from_secs(20),
        )
    });
    // Meanwhile, others are served at once.
    std::thread::sleep(Duration::from_secs(1));
    for i in 0..3 {
        let t = Instant::now();
        still_serving(&cg, &agent, "loris-svc", &format!("/other/{i}"));
        assert!(
            t.elapsed() < vm_tests::slack(Duration::from_secs(2)),
            "took {:?}",
            t.elapsed()
        );
    }
    let r = loris.join().unwrap().unwrap();
    assert!(
        matches!(r.end, RawEnd::Closed | RawEnd::Reset),
        "slow-loris connection not closed: {r:?}"
    );
    assert!(
        r.elapsed >= Duration::from_secs(9)
            && r.elapsed <= vm_tests::slack(Duration::from_secs(12)),
        "closed after {:?} (header read timeout is 10 s)",
        r.elapsed
    );
    assert!(
        backend.seen().iter().all(|s| s.path != "/slow"),
        "the half request was forwarded"
    );
    still_serving(&cg, &agent, "loris-svc", "/after");
}

#[test]
fn a_backend_that_closes_mid_response_gives_the_client_an_error_not_a_hang() {
    let (cg, agent, backend) = setup("torn-svc", Behavior::close_mid_body_first(1));
    let r = curl(cg.command("curl"), CURL_MAX, &["http://torn-svc.svc/torn"]);
    assert_ne!(r.exit, Some(0), "a torn body must be an error: {r}");
    assert_ne!(r.exit, Some(28), "the client hung until its timeout: {r}");
    assert!(r.elapsed < Duration::from_secs(5), "{r}");
    assert_eq!(backend.seen_count(), 1, "headers had arrived: no retry");
    still_serving(&cg, &agent, "torn-svc", "/next");
    assert_eq!(backend.seen_count(), 2);
}
