//! Running it like production: an upgrade under steady load loses no request, and a crashed
//! agent (kill -9) leaves the redirect in the kernel and serves again right after restart.

use std::time::Duration;

use vm_tests::agent::TestAgent;
use vm_tests::backend::Backend;
use vm_tests::cgroup::TestCgroup;
use vm_tests::load::{finish_load, start_load};

#[test]
fn three_upgrades_in_a_row_under_steady_load_fail_no_request() {
    let cg = TestCgroup::new("upgrade").unwrap();
    let agent = TestAgent::start(cg.path()).unwrap();
    let backend = Backend::start("payments-svc", 0).unwrap();
    agent.deploy("payments-svc", backend.addr.port()).unwrap();
    let secs = if vm_tests::in_vm() { 12 } else { 20 };
    let load = start_load(&cg, "payments-svc", secs, 200);
    let mut pids = vec![agent.pid().unwrap()];
    let pause = Duration::from_secs(u64::from(secs) / 5);
    for _ in 0..3 {
        std::thread::sleep(pause);
        let out = agent.ctl(&["agent", "upgrade"]);
        assert!(
            out.status.success(),
            "upgrade failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        pids.push(agent.pid().unwrap());
    }
    let summary = finish_load(load);
    let ok = summary["ok"].as_u64().unwrap();
    let fails = summary["fails"].as_array().unwrap();
    let kept = summary["kept_alive_ok"].as_u64().unwrap();
    eprintln!(
        "MEASURED: {ok} requests succeeded ({kept} on the kept-alive connection), {} failed across 3 upgrades (agent pids {pids:?})",
        fails.len()
    );
    assert!(
        fails.is_empty(),
        "failed requests: {fails:?}\n{}",
        agent.log()
    );
    assert!(ok > u64::from(secs) * 50, "the load really ran: {ok}");
    assert!(
        kept > u64::from(secs) * 10,
        "the kept-alive connection really ran: {kept}"
    );
    let mut distinct = pids.clone();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        4,
        "each upgrade replaced the process: {pids:?}"
    );
    // The old agents drained and exited.
    std::thread::sleep(Duration::from_secs(1));
    for pid in &pids[..3] {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "old agent {pid} still running"
        );
    }
    assert_eq!(backend.seen_count() as u64, ok);
}

/// HTTP/2 callers through three upgrades: the old agent's GOAWAY names the last stream it
/// serves, and the client's next requests go over a new connection (to the successor).
#[test]
fn three_upgrades_under_http2_load_fail_no_request() {
    let cg = TestCgroup::new("upgrade-h2").unwrap();
    let agent = TestAgent::start(cg.path()).unwrap();
    // HTTP/2 callers are proxied as HTTP/2: the instance speaks it too.
    let backend = vm_tests::h2_backend::GracefulH2Backend::start("ledger-svc").unwrap();
    agent.deploy("ledger-svc", backend.addr.port()).unwrap();
    let secs: u64 = if vm_tests::in_vm() { 12 } else { 16 };
    // hyper-util's pooled HTTP/2 client, 4 tasks on one connection, 50 requests/s each.
    // (Not h2load: it never reconnects after a GOAWAY, even from a plain nginx rotating its
    // connections, and counts every request left as an error. Not Debian's httpx 0.23 with
    // h2 4.1 either: its state machine closes on the first GOAWAY and fails the PING that
    // a graceful two-step GOAWAY sends next.)
    let load = cg
        .binary(vm_tests::bins::path("h2-load"))
        .args([
            "http://ledger-svc.svc/entries",
            &secs.to_string(),
            "50",
            "4",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("h2-load (cargo build -p vm-tests --bins)");
    let pause = Duration::from_secs(secs / 5);
    for _ in 0..3 {
        std::thread::sleep(pause);
        let out = agent.ctl(&["agent", "upgrade"]);
        assert!(
            out.status.success(),
            "upgrade failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
    }
    let summary = finish_load(load);
    let ok = summary["ok"].as_u64().unwrap();
    let fails = summary["fails"].as_array().unwrap();
    eprintln!(
        "MEASURED: HTTP/2 through 3 upgrades: {ok} ok, {} failed",
        fails.len()
    );
    assert!(
        fails.is_empty(),
        "failed requests: {fails:?}\n{}",
        agent.log()
    );
    assert!(ok > secs * 100, "the load really ran: {ok}");
    assert_eq!(backend.served(), ok, "each request served once");
}

#[test]
fn after_kill_9_the_redirect_stays_and_a_restarted_agent_serves_within_a_second() {
    let cg = TestCgroup::new("crash").unwrap();
    let mut agent = TestAgent::start(cg.path()).unwrap();
    let backend = Backend::start("notify-svc", 0).unwrap();
    agent.deploy("notify-svc", backend.addr.port()).unwrap();
    let load = start_load(&cg, "notify-svc", 8, 200);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = now();
    agent.kill9().unwrap();
    // The redirect is pinned: nothing is left to clean up before starting again.
    std::thread::sleep(Duration::from_millis(500));
    agent.start_again().unwrap();
    let ready_at = now();
    let status = agent.ctl_json(&["status"]).unwrap();
    assert_eq!(status["redirect"]["adopted"], true, "{status}");
    let summary = finish_load(load);
    let fails: Vec<f64> = summary["fails"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f[0].as_f64().unwrap())
        .collect();
    let oks: Vec<f64> = summary["oks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    let first_ok_after = oks
        .iter()
        .copied()
        .find(|t| *t > ready_at)
        .expect("requests succeed after the restart");
    eprintln!(
        "MEASURED: agent down for {:.0} ms (kill -9 to ready again), the first request started after the restart succeeded {:.0} ms after it; {} requests failed (all between the kill and the restart), {} succeeded",
        (ready_at - killed_at) * 1000.0,
        (first_ok_after - ready_at) * 1000.0,
        fails.len(),
        oks.len()
    );
    let slack = if vm_tests::in_vm() { 1.0 } else { 0.2 };
    for f in &fails {
        assert!(
            *f >= killed_at - slack && *f <= ready_at + slack,
            "a request failed outside the gap: at {f}s (gap {killed_at}..{ready_at}): {fails:?}"
        );
    }
    assert!(
        first_ok_after - ready_at < vm_tests::slack(Duration::from_secs(1)).as_secs_f64(),
        "serving resumed {} s after the restart",
        first_ok_after - ready_at
    );
}
