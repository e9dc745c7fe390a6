//! User stories of gRPC through the mesh: a real tonic client (`grpc-probe`) inside the
//! cgroup calls `http://grpc-svc.svc` over h2c; the real tonic server behind it counts calls.

use std::process::Stdio;
use std::time::Duration;

use vm_tests::agent::TestAgent;
use vm_tests::bins;
use vm_tests::cgroup::TestCgroup;
use vm_tests::client::{tail, wait_output};
use vm_tests::grpc::GrpcBackend;

fn probe(cg: &TestCgroup, url: &str) -> (bool, String) {
    let child = cg
        .binary(bins::path("grpc-probe"))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("grpc-probe");
    let out = wait_output(child, Duration::from_secs(20)).expect("grpc-probe finished");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_grpc_call_over_h2c_reaches_the_server_through_the_mesh() {
    let cg = TestCgroup::new("grpc").expect("test cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    let server = GrpcBackend::start(0).unwrap();
    agent.deploy("grpc-svc", server.addr.port()).unwrap();
    let (ok, out) = probe(&cg, "http://grpc-svc.svc");
    assert!(ok, "{out}\n{}", tail(&agent.log(), 30));
    assert_eq!(out.trim(), "SERVING");
    assert_eq!(server.calls(), 1);
    // On the service's own port too, and again on a new connection.
    let (ok, out) = probe(&cg, &format!("http://grpc-svc.svc:{}", server.addr.port()));
    assert!(ok, "{out}");
    assert_eq!(server.calls(), 2);
}

#[test]
fn a_grpc_call_answered_unavailable_is_retried_once() {
    let cg = TestCgroup::new("grpc-retry").expect("test cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    let server = GrpcBackend::start(1).unwrap();
    agent.deploy("grpc-svc", server.addr.port()).unwrap();
    let (ok, out) = probe(&cg, "http://grpc-svc.svc");
    assert!(ok, "{out}\n{}", tail(&agent.log(), 30));
    assert_eq!(
        out.trim(),
        "SERVING",
        "the retry's answer reached the client"
    );
    assert_eq!(server.calls(), 2, "first call UNAVAILABLE, one retry");
}

#[test]
fn a_grpc_call_the_server_keeps_refusing_gets_its_status_after_one_retry() {
    let cg = TestCgroup::new("grpc-down").expect("test cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    let server = GrpcBackend::start(usize::MAX).unwrap();
    agent.deploy("grpc-svc", server.addr.port()).unwrap();
    let (ok, out) = probe(&cg, "http://grpc-svc.svc");
    assert!(!ok, "{out}");
    assert!(
        out.starts_with("ERROR Unavailable warming up"),
        "the server's own status reaches the client: {out}\n{}",
        tail(&agent.log(), 30)
    );
    assert_eq!(server.calls(), 2);
}
