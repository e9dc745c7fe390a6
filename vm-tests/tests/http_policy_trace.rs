//! User stories of access policy by caller cgroup and of the mesh's trace id, through the
//! real kernel redirect and a real agent; callers are unmodified curl and bash.

use std::time::Duration;

use vm_tests::agent::TestAgent;
use vm_tests::backend::Backend;
use vm_tests::cgroup::TestCgroup;
use vm_tests::client::{ChildCgroup, curl, tail, wait_output};
use vm_tests::ports;

const CURL_MAX: Duration = Duration::from_secs(10);

#[test]
fn only_the_allowed_service_may_call_and_the_host_is_refused_on_http_and_raw_tcp() {
    let cg = TestCgroup::new("policy").expect("test cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    // Declared after `cg`, so it is removed before its parent.
    let payments = ChildCgroup::new(cg.path(), "payments").unwrap();
    let ledger = Backend::start("ledger-svc", 0).unwrap();
    agent
        .deploy_yaml(&format!(
            "name: ledger-svc\nport: {}\npolicy: {{allow_from: [payments-svc]}}\n",
            ledger.addr.port()
        ))
        .unwrap();
    agent
        .deploy_yaml(&format!(
            "name: payments-svc\nport: {}\npolicy: allow_from_any\ncgroup: {}\n",
            ports::free_port(),
            payments.path().display()
        ))
        .unwrap();

    // The host (a process in the test cgroup, in no service's cgroup) is refused.
    let r = curl(
        cg.command("curl"),
        CURL_MAX,
        &["http://ledger-svc.svc/entries"],
    );
    assert_eq!(r.status, 403, "{r}\n{}", tail(&agent.log(), 20));
    assert_eq!(r.header("x-hms-error"), Some("denied"), "{r}");
    assert!(r.header("x-hms-trace-id").is_some(), "{r}");
    assert_eq!(ledger.seen_count(), 0);

    // payments-svc, running in its own cgroup, is let through.
    let r = curl(
        payments.command("curl"),
        CURL_MAX,
        &["http://ledger-svc.svc/entries"],
    );
    assert_eq!(r.status, 200, "{r}\n{}", tail(&agent.log(), 20));
    assert_eq!(r.body, "ledger-svc saw GET /entries\n");
    assert_eq!(ledger.seen_count(), 1);

    // Raw TCP from the host: closed without reaching the service.
    let child = cg
        .command("bash")
        .args([
            "-c",
            "exec 3<>/dev/tcp/ledger-svc.svc/80 && echo hi >&3 && timeout 5 cat <&3",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_output(child, Duration::from_secs(10)).unwrap();
    assert!(
        o.stdout.is_empty(),
        "denied raw TCP got an answer: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_ne!(o.status.code(), Some(124), "the connection was not closed");
    assert_eq!(
        ledger.seen_count(),
        1,
        "raw TCP from the host reached the service"
    );
    assert!(
        agent.log().contains("may not call ledger-svc"),
        "{}",
        tail(&agent.log(), 20)
    );
}

fn is_lower_hex_32(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[test]
fn every_request_carries_a_trace_id_and_a_callers_own_ids_pass_unchanged() {
    let cg = TestCgroup::new("trace").expect("test cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    let backend = Backend::start("trace-svc", 0).unwrap();
    agent.deploy("trace-svc", backend.addr.port()).unwrap();

    // No id from the client: the mesh mints one, the backend and the client see the same.
    let r = curl(cg.command("curl"), CURL_MAX, &["http://trace-svc.svc/a"]);
    assert_eq!(r.status, 200, "{r}\n{}", tail(&agent.log(), 20));
    let seen = backend.seen();
    let minted = seen[0].headers_named("x-hms-trace-id");
    assert_eq!(minted.len(), 1, "{seen:?}");
    assert!(is_lower_hex_32(minted[0]), "{minted:?}");
    assert_eq!(r.header("x-hms-trace-id"), Some(minted[0]), "{r}");

    // The client's own id and W3C trace context pass untouched.
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = curl(
        cg.command("curl"),
        CURL_MAX,
        &[
            "-H",
            "x-hms-trace-id: abc123",
            "-H",
            &format!("traceparent: {parent}"),
            "-H",
            "tracestate: congo=t61rcWkgMzE",
            "http://trace-svc.svc/b",
        ],
    );
    assert_eq!(r.status, 200, "{r}");
    let seen = backend.seen();
    let b = &seen[1];
    assert_eq!(b.path, "/b");
    assert_eq!(b.headers_named("x-hms-trace-id"), ["abc123"], "{b:?}");
    assert_eq!(b.headers_named("traceparent"), [parent], "{b:?}");
    assert_eq!(
        b.headers_named("tracestate"),
        ["congo=t61rcWkgMzE"],
        "{b:?}"
    );
    assert_eq!(r.header("x-hms-trace-id"), Some("abc123"), "{r}");

    // Two requests without an id get two different ids.
    let r = curl(cg.command("curl"), CURL_MAX, &["http://trace-svc.svc/c"]);
    let third = r.header("x-hms-trace-id").unwrap_or_default().to_string();
    assert!(is_lower_hex_32(&third) && third != minted[0], "{r}");
    assert_eq!(
        backend.seen()[2].header("x-hms-trace-id"),
        Some(third.as_str())
    );
}
