//! `cargo xtask bench` measures the paths it says it measures. Not a timing test: it runs the
//! real bench binary briefly (direct, hms-one-host and hms-one-host-sk-msg, 1 s runs, one
//! repetition, the debug binaries next to this test) and checks from its JSON that
//! - every hms-one-host request reached the backend through the HMS proxy (the backend saw
//!   the proxy's `x-hms-trace-id` on each) and the agent's `hms-ctl tap` shows the run's
//!   requests;
//! - in the sk_msg scenario the bypass carried every request and response on both legs (the
//!   kernel program's counters moved by at least four sends per request: app -> proxy ->
//!   backend -> proxy -> app; none fell back to TCP), and in hms-one-host it carried nothing;
//! - every direct request reached the backend without the proxy, and the agent's tap has none
//!   of them;
//! - the bench cleaned up: no cgroup or pin dir of its own is left;
//! - and for two hosts (second test): the bypass carries only the local legs, and only in the
//!   default placement;
//! - and for the TLS rows (third test): every gateway-https request was answered 200 by the
//!   gateway's route (its `hms_gateway_requests_total` counted them), reached the backend
//!   through the mesh and shows in `hms-ctl tap gateway`; every haproxy-https request
//!   reached it through HAProxy; both over TLS 1.3 with the same cipher suite.

use vm_tests::bins;

fn runs(report: &serde_json::Value, scenario: &str) -> Vec<serde_json::Value> {
    let sc = report["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .find(|s| s["name"] == scenario)
        .unwrap_or_else(|| panic!("no {scenario} in {report}"));
    sc["rates"]
        .as_array()
        .expect("rates")
        .iter()
        .flat_map(|r| r["runs"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// `xtask bench --quick` of `scenarios` (1 s, one repetition, this build's binaries), as JSON.
fn quick_bench(scenarios: &[&str]) -> serde_json::Value {
    let xtask = bins::path("xtask");
    let bin_dir = xtask.parent().unwrap().to_path_buf();
    let mut cmd = vm_tests::tools::workspace_binary(&xtask);
    cmd.args(["bench", "--quick"]);
    for s in scenarios {
        cmd.args(["--scenario", s]);
    }
    let out = cmd
        .args(["--duration", "1s", "--reps", "1", "-o", "json", "--bin-dir"])
        .arg(&bin_dir)
        .output()
        .expect("running xtask bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "xtask bench failed:\n{stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bench -o json is not JSON ({e}):\n{stderr}"))
}

#[test]
fn bench_scenarios_go_through_the_paths_they_claim() {
    let report = quick_bench(&["hms-one-host", "hms-one-host-sk-msg"]);

    let plain = runs(&report, "hms-one-host");
    let bypass = runs(&report, "hms-one-host-sk-msg");
    let direct = runs(&report, "direct");
    for r in &plain {
        assert_eq!(r["sk_msg"]["redirected"], 0, "{r}");
        assert_eq!(r["sk_msg"]["passed"], 0, "{r}");
    }
    for r in &bypass {
        let completed = r["load"]["completed"].as_u64().unwrap();
        assert!(
            r["sk_msg"]["redirected"].as_u64().unwrap() >= 4 * completed,
            "the bypass carried every request and response on both legs: {r}"
        );
        assert_eq!(r["sk_msg"]["passed"], 0, "{r}");
    }
    let hms: Vec<_> = plain.iter().chain(&bypass).collect();
    // 1000 rps and max, one repetition each.
    assert_eq!(hms.len(), 4, "{report}");
    assert_eq!(direct.len(), 2, "{report}");
    for r in hms {
        let completed = r["load"]["completed"].as_u64().unwrap();
        assert!(completed > 0, "{r}");
        assert!(
            r["backend_saw"]["hms"].as_u64().unwrap() >= completed,
            "every request came through the proxy: {r}"
        );
        assert_eq!(r["backend_saw"]["direct"], 0, "{r}");
        assert!(
            r["tap_events"].as_u64().unwrap() > 0,
            "the agent's tap shows the bench's requests: {r}"
        );
        assert_eq!(r["path_ok"], true, "{r}");
        // The agent's cost was measured on the agent process.
        assert!(r["proxy_cpu_s"].as_f64().is_some(), "{r}");
        assert!(r["proxy_peak_rss_mb"].as_f64().unwrap() > 0.0, "{r}");
    }
    for r in &direct {
        let completed = r["load"]["completed"].as_u64().unwrap();
        assert!(completed > 0, "{r}");
        assert!(
            r["backend_saw"]["direct"].as_u64().unwrap() >= completed,
            "{r}"
        );
        assert_eq!(
            r["backend_saw"]["hms"], 0,
            "no direct request met the proxy: {r}"
        );
        assert_eq!(
            r["tap_events"], 0,
            "the agent's tap has none of the direct requests: {r}"
        );
        assert_eq!(r["path_ok"], true, "{r}");
    }
    vm_tests::bench_leftovers::assert_none_left(report["pid"].as_u64().unwrap());
}

/// Both two-host scenarios: `hms-two-hosts` keeps every leg on TCP (its agents run outside
/// their cgroups), `hms-two-hosts-sk-msg` is a host's default placement, where each host's
/// bypass carries its one local leg (client <-> agent A, agent B <-> backend: at least two
/// redirected sends per request on each agent, request and response) and the tunnel stays
/// TCP. Every request crossed the tunnel to B's backend, and both pairs of namespaces,
/// cgroups and pin dirs are gone afterwards.
#[test]
fn two_host_scenarios_bypass_only_the_local_legs_of_the_default_placement() {
    let report = quick_bench(&["hms-two-hosts", "hms-two-hosts-sk-msg"]);

    let plain = runs(&report, "hms-two-hosts");
    let default = runs(&report, "hms-two-hosts-sk-msg");
    assert_eq!(plain.len(), 2, "{report}");
    assert_eq!(default.len(), 2, "{report}");
    for r in &plain {
        for host in ["a", "b"] {
            assert_eq!(r["sk_msg"][host]["redirected"], 0, "{r}");
            assert_eq!(r["sk_msg"][host]["passed"], 0, "{r}");
        }
    }
    for r in &default {
        let completed = r["load"]["completed"].as_u64().unwrap();
        for host in ["a", "b"] {
            assert!(
                r["sk_msg"][host]["redirected"].as_u64().unwrap() >= 2 * completed,
                "agent {host}'s bypass carried every request and response of its local leg: {r}"
            );
            assert_eq!(r["sk_msg"][host]["passed"], 0, "{r}");
        }
    }
    for r in plain.iter().chain(&default) {
        let completed = r["load"]["completed"].as_u64().unwrap();
        assert!(completed > 0, "{r}");
        assert!(
            r["backend_saw"]["hms"].as_u64().unwrap() >= completed,
            "every request reached B's backend through the mesh: {r}"
        );
        assert_eq!(r["backend_saw"]["direct"], 0, "{r}");
        assert!(r["tap_events"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["path_ok"], true, "{r}");
        // Both agents' CPU was measured.
        assert!(r["proxy_cpu_s"].as_f64().is_some(), "{r}");
    }
    vm_tests::bench_leftovers::assert_none_left(report["pid"].as_u64().unwrap());
}

/// The gateway rows: `gateway-https` (TLS 1.3 to the agent's gateway listener, a route, the
/// mesh's HTTP path to `bench-svc.svc`) and `haproxy-https` (HAProxy terminating TLS with
/// the same certificate), both in front of the direct row's backend, measured by the same
/// load generator. Not a timing test: it checks that every request was answered 2xx, that
/// the gateway's own counter and tap saw the run, that the backend saw the gateway's
/// requests arrive through the mesh and HAProxy's through HAProxy, and that nothing is left.
#[test]
fn gateway_and_haproxy_https_rows_go_through_their_tls_servers() {
    let report = quick_bench(&["gateway-https", "haproxy-https"]);

    let gateway = runs(&report, "gateway-https");
    let haproxy = runs(&report, "haproxy-https");
    // 1000 rps and max, one repetition each; the direct baseline came along.
    assert_eq!(gateway.len(), 2, "{report}");
    assert_eq!(haproxy.len(), 2, "{report}");
    assert_eq!(runs(&report, "direct").len(), 2, "{report}");
    for r in gateway.iter().chain(&haproxy) {
        let load = &r["load"];
        let completed = load["completed"].as_u64().unwrap();
        assert!(completed > 0, "{r}");
        // Every answer was a 2xx and no connection broke. (Requests still unanswered when
        // the run's drain ended are a matter of speed on a busy machine, not checked here.)
        for k in ["errors", "non_2xx"] {
            assert_eq!(load[k], 0, "every request answered 2xx ({k}): {r}");
        }
        assert_eq!(load["tls"]["version"], "TLSv1_3", "{r}");
        assert_eq!(load["tls"]["alpn"], "http/1.1", "{r}");
        assert_eq!(r["backend_saw"]["direct"], 0, "{r}");
        assert_eq!(r["path_ok"], true, "{r}");
        assert!(r["proxy_cpu_s"].as_f64().is_some(), "{r}");
    }
    for r in &gateway {
        let completed = r["load"]["completed"].as_u64().unwrap();
        assert!(
            r["gateway_answered_2xx"].as_u64().unwrap() >= completed,
            "the gateway's hms_gateway_requests_total counted every request as 2xx: {r}"
        );
        assert!(
            r["backend_saw"]["hms"].as_u64().unwrap() >= completed,
            "every request reached the backend through the mesh: {r}"
        );
        assert_eq!(r["backend_saw"]["haproxy"], 0, "{r}");
        assert!(
            r["tap_events"].as_u64().unwrap() > 0,
            "hms-ctl tap gateway shows the run: {r}"
        );
    }
    for r in &haproxy {
        let completed = r["load"]["completed"].as_u64().unwrap();
        assert!(
            r["backend_saw"]["haproxy"].as_u64().unwrap() >= completed,
            "every request reached the backend through HAProxy: {r}"
        );
        assert_eq!(r["backend_saw"]["hms"], 0, "{r}");
    }
    // Measured the same way: the same negotiated suite on both servers.
    assert_eq!(
        gateway[0]["load"]["tls"]["cipher_suite"], haproxy[0]["load"]["tls"]["cipher_suite"],
        "{report}"
    );
    let g = &report["gateway_vs_haproxy"];
    assert_eq!(
        g["against_haproxy_https"].as_array().unwrap().len(),
        2,
        "{g}"
    );
    assert!(
        g["verdict"]
            .as_str()
            .is_some_and(|v| !v.starts_with("not measured")),
        "{g}"
    );

    vm_tests::bench_leftovers::assert_none_left(report["pid"].as_u64().unwrap());
}
