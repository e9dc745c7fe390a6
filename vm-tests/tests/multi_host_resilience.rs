//! Many hosts, when things go wrong: the cross-host listener (:15008) refuses every caller
//! without a valid node certificate of the mesh; an etcd outage leaves running services
//! untouched and, once etcd is back, a new deploy is everywhere within a second; and a CA
//! rotation under steady traffic fails no request.

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hms_node_agent::identity::{
    CertificateAuthority, NodeIdentity, SpiffeId, TlsIdentity, TrustBundle,
};
use rustls::ClientConfig;
use rustls::sign::CertifiedKey;
use vm_tests::mesh::{Backend, Mesh, NAMES, TRUST_DOMAIN, in_netns, text};
use vm_tests::peer_probe::{certified, hand_made_config, try_peer_connection};

use vm_tests::peer_probe::IO_TIMEOUT;
const DAY: Duration = Duration::from_secs(24 * 3600);

// ---------------------------------------------------------------------------------------
// 1. :15008 refuses callers without a valid certificate

/// A key made by `NodeIdentity` in `dir`, a CSR for it, and the key's PEM.
fn node_key_and_csr(dir: &Path, trust_domain: &str, node: &str) -> (String, String) {
    let mut id = NodeIdentity::load_or_create(dir, trust_domain, node).unwrap();
    let csr = id.create_csr().unwrap();
    let key = std::fs::read_to_string(dir.join("identity/node.key")).unwrap();
    (csr, key)
}

/// A leaf signed directly with the key of host A's root `root_id`, carrying `uri` as its
/// only SAN: a certificate that chains to the real root but names whatever we like.
fn signed_by_real_root(ca_dir: &Path, root_id: u32, uri: &str) -> Arc<CertifiedKey> {
    let read = |f: String| std::fs::read_to_string(ca_dir.join(f)).unwrap();
    let root_key = rcgen::KeyPair::from_pem(&read(format!("root-{root_id}.key"))).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&read(format!("root-{root_id}.pem")), root_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let cert = vm_tests::mesh::node_leaf_params(uri)
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    certified(&cert.pem(), &leaf_key.serialize_pem())
}

#[test]
fn a_connection_to_15008_without_a_valid_certificate_is_refused() {
    let m = Mesh::new();
    let a_inbound = SocketAddrV4::new(m.net.hosts[0].ipv4(), 15008);
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let real_ca = CertificateAuthority::load(&m.agents[0].state_dir()).unwrap();
    let ca_dir = m.agents[0].state_dir().join("ca");
    let current_root = real_ca.roots().into_iter().find(|r| r.current).unwrap().id;
    let bundle = real_ca.trust_bundle();
    let host_a = SpiffeId::node(TRUST_DOMAIN, "host-a").unwrap();
    let now = SystemTime::now();

    // The positive control: a new node certificate properly issued by the real CA for a
    // member (host-c), used through the identity module's own dialer config (which also
    // checks that A is host-a).
    let (csr, key) = node_key_and_csr(&dir("valid"), TRUST_DOMAIN, "host-c");
    let issued = real_ca.sign_node_csr_at(&csr, "host-c", DAY, now).unwrap();
    let valid = TlsIdentity::new(
        SpiffeId::node(TRUST_DOMAIN, "host-c").unwrap(),
        certified(&issued.chain_pem, &key),
        &bundle,
    )
    .unwrap()
    .client_config(&host_a)
    .unwrap();
    // Properly issued by the real CA, but for a name that is not a member of the mesh (a
    // removed host, or one the CA never admitted).
    let (csr, key) = node_key_and_csr(&dir("stranger"), TRUST_DOMAIN, "host-x");
    let issued = real_ca.sign_node_csr_at(&csr, "host-x", DAY, now).unwrap();
    let stranger = TlsIdentity::new(
        SpiffeId::node(TRUST_DOMAIN, "host-x").unwrap(),
        certified(&issued.chain_pem, &key),
        &bundle,
    )
    .unwrap()
    .client_config(&host_a)
    .unwrap();

    // Expired: signed by the real CA, valid for a day, two days ago.
    let (csr, key) = node_key_and_csr(&dir("expired"), TRUST_DOMAIN, "host-x");
    let issued = real_ca
        .sign_node_csr_at(&csr, "host-x", DAY, now - 2 * DAY)
        .unwrap();
    assert!(issued.not_after < now, "{:?}", issued.not_after);
    let expired = TlsIdentity::new(
        SpiffeId::node(TRUST_DOMAIN, "host-x").unwrap(),
        certified(&issued.chain_pem, &key),
        &bundle,
    )
    .unwrap()
    .client_config(&host_a)
    .unwrap();

    // Another CA that calls its trust domain test.mesh too.
    let (_, impostor) =
        hms_node_agent::identity::bootstrap_local(&dir("impostor"), TRUST_DOMAIN, "host-x")
            .unwrap();
    // A genuine mesh of another trust domain.
    let (_, foreign) =
        hms_node_agent::identity::bootstrap_local(&dir("other"), "other.mesh", "host-x").unwrap();

    let cases: Vec<(&str, Arc<ClientConfig>, bool)> = vec![
        (
            "valid: issued by the real CA for member host-c",
            valid,
            true,
        ),
        (
            "control: signed with the real root's key, SPIFFE ID spiffe://test.mesh/node/host-b",
            hand_made_config(Some(signed_by_real_root(
                &ca_dir,
                current_root,
                "spiffe://test.mesh/node/host-b",
            ))),
            true,
        ),
        (
            "issued by the real CA for host-x, which is not a member",
            stranger,
            false,
        ),
        ("no client certificate", hand_made_config(None), false),
        (
            "a node certificate of another CA (same trust domain name test.mesh)",
            hand_made_config(Some(impostor.certified_key().unwrap())),
            false,
        ),
        (
            "an expired certificate signed by the real CA",
            expired,
            false,
        ),
        (
            "a node certificate of trust domain other.mesh (its own CA)",
            hand_made_config(Some(foreign.certified_key().unwrap())),
            false,
        ),
        (
            "signed by the real root, but SPIFFE ID spiffe://other.mesh/node/host-x",
            hand_made_config(Some(signed_by_real_root(
                &ca_dir,
                current_root,
                "spiffe://other.mesh/node/host-x",
            ))),
            false,
        ),
        (
            "signed by the real root, but SPIFFE ID spiffe://test.mesh/svc/payments (not a node)",
            hand_made_config(Some(signed_by_real_root(
                &ca_dir,
                current_root,
                "spiffe://test.mesh/svc/payments",
            ))),
            false,
        ),
    ];

    let results: Vec<(&str, bool, Result<String, String>)> =
        in_netns(&m.net.hosts[2].netns, || {
            cases
                .into_iter()
                .map(|(what, config, should_pass)| {
                    let started = Instant::now();
                    let r = try_peer_connection(a_inbound, config);
                    assert!(started.elapsed() < 3 * IO_TIMEOUT);
                    (what, should_pass, r)
                })
                .collect()
        });
    let mut wrong = Vec::new();
    for (what, should_pass, r) in &results {
        eprintln!(
            "MEASURED: from host C to {a_inbound}: {what}: {}",
            match r {
                Ok(s) => format!("ACCEPTED ({s})"),
                Err(e) => format!("REFUSED ({e})"),
            }
        );
        if r.is_ok() != *should_pass {
            wrong.push(format!("{what}: {r:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "unexpected outcomes:\n{}\nA's log:\n{}",
        wrong.join("\n"),
        m.agents[0].log()
    );
    // A still serves its real peers afterwards.
    let s = m.agents[0].ctl_json(&["status"]).unwrap();
    assert!(s["identity"]["spiffe_id"].is_string(), "{s}");
}

// ---------------------------------------------------------------------------------------
// 2. etcd outage

fn call(m: &Mesh, host: usize, url: &str) -> (String, std::process::Output) {
    let o = m.curl(host, &[url]);
    (String::from_utf8_lossy(&o.stdout).into_owned(), o)
}

#[test]
fn etcd_stopped_for_30_s_services_keep_working_and_a_deploy_after_it_returns_is_visible_everywhere_within_a_second()
 {
    let mut m = Mesh::new();
    let _orders = Backend::start(&m.net, 0, "orders-svc", 7300, m.dir.path());
    m.deploy(0, "name: orders-svc\nport: 7300\n");
    // Placing is the operator's act on A; B deploys (after the outage) what was placed on it.
    m.place("ledger-svc", 1);
    m.wait_for_instances(2, "orders-svc", 1);
    // Warm up (the backend may still be starting).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (body, o) = call(&m, 2, "http://orders-svc.svc/warm");
        if body.starts_with("orders-svc on host-a") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&o));
        std::thread::sleep(Duration::from_millis(100));
    }

    let outage = if vm_tests::in_vm() {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(30)
    };
    m.etcd.stop();
    let stopped = Instant::now();
    let (mut ok, mut failed) = (0u32, Vec::new());
    let mut c_saw_disconnected: Option<Duration> = None;
    while stopped.elapsed() < outage {
        let (body, o) = call(&m, 2, "http://orders-svc.svc/during-outage");
        if body.starts_with("orders-svc on host-a saw GET /during-outage") {
            ok += 1;
        } else {
            failed.push(format!("at {:?}: {}", stopped.elapsed(), text(&o)));
        }
        if c_saw_disconnected.is_none() {
            let s = m.agents[2].ctl_json(&["status"]).unwrap();
            if s["registry_health"]["connected"] == false {
                c_saw_disconnected = Some(stopped.elapsed());
                eprintln!(
                    "host C's status during the outage: {}",
                    s["registry_health"]
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "MEASURED: etcd down {} s: {ok} calls from C to orders-svc on A succeeded, {} failed; C's status showed the registry disconnected {} ms after etcd stopped",
        outage.as_secs(),
        failed.len(),
        c_saw_disconnected.map_or(-1, |d| d.as_millis() as i64)
    );
    assert!(
        failed.is_empty(),
        "calls failed during the outage: {failed:#?}"
    );
    assert!(ok >= 10, "too few calls made: {ok}");
    assert!(
        c_saw_disconnected.is_some(),
        "C's status never showed the registry disconnected"
    );

    let _ledger = Backend::start(&m.net, 1, "ledger-svc", 7400, m.dir.path());
    m.etcd.resume().unwrap();
    let resumed = Instant::now();
    m.agents[1]
        .deploy_yaml("name: ledger-svc\nport: 7400\n")
        .unwrap_or_else(|e| {
            panic!(
                "deploy on B after etcd returned: {e:#}\n{}",
                m.agents[1].log()
            )
        });
    let deployed = Instant::now();
    // Until the new service answers on A and on C (name resolution, registry, tunnel to B).
    let visible_after = |host: usize| {
        let deadline = deployed + Duration::from_secs(10);
        loop {
            let o = m.curl(host, &["--max-time", "1", "http://ledger-svc.svc/new"]);
            if String::from_utf8_lossy(&o.stdout).starts_with("ledger-svc on host-b") {
                return deployed.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "ledger-svc never answered on host {host}: {}\n{}",
                text(&o),
                m.agents[host].log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (on_a, on_c) = std::thread::scope(|s| {
        let a = s.spawn(|| visible_after(0));
        let c = s.spawn(|| visible_after(2));
        (a.join().unwrap(), c.join().unwrap())
    });
    let reconnected = |i: usize| {
        m.agents[i].ctl_json(&["status"]).unwrap()["registry_health"]["connected"] == true
    };
    eprintln!(
        "MEASURED: deploy on B returned {} ms after etcd was healthy again; ledger-svc answered on A {} ms and on C {} ms after the deploy returned",
        deployed.duration_since(resumed).as_millis(),
        on_a.as_millis(),
        on_c.as_millis()
    );
    assert!(
        on_a < Duration::from_secs(1) && on_c < Duration::from_secs(1),
        "visible on A after {on_a:?}, on C after {on_c:?}"
    );
    assert!((0..3).all(reconnected), "every host reconnected to etcd");
    // The old service still works too.
    let (body, o) = call(&m, 2, "http://orders-svc.svc/after");
    assert!(body.starts_with("orders-svc on host-a"), "{}", text(&o));
}

// ---------------------------------------------------------------------------------------
// 3. CA rotation under steady traffic

/// A steady HTTP client: a new connection per request, `rate` per second (five threads
/// share the schedule, so one slow answer does not stall the rest), until `stop`
/// exists (or `max_secs`). Writes one line per request to `log`: `<unix time> ok <body>` or
/// `<unix time> FAIL <error>`.
const STEADY_CLIENT: &str = r#"
import http.client, os, sys, threading, time
host, rate, stop, log, max_secs = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
workers = 5
start = time.time()
lock = threading.Lock()
f = open(log, 'w')
def work(w):
    n = 0
    while not os.path.exists(stop) and time.time() - start < max_secs:
        n += 1
        t = time.time()
        try:
            c = http.client.HTTPConnection(host, 80, timeout=5)
            c.request('GET', '/steady/%d/%d' % (w, n))
            r = c.getresponse()
            body = r.read().decode(errors='replace').strip()
            c.close()
            if r.status == 200 and body.startswith(host.split('.')[0] + ' on host-'):
                line = '%.3f ok %s\n' % (t, body)
            else:
                line = '%.3f FAIL status %d %s\n' % (t, r.status, body[:200].replace('\n', ' '))
        except Exception as e:
            line = '%.3f FAIL %r\n' % (t, e)
        with lock:
            f.write(line)
            f.flush()
        pause = start + w / rate + n * workers / rate - time.time()
        if pause > 0:
            time.sleep(pause)
ts = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
for t in ts:
    t.start()
for t in ts:
    t.join()
f.close()
"#;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The client config host `node`'s agent would use for a new dial to `peer` right now, from
/// its state dir: its certificate and key, verifying the peer with its trust bundle. Re-read
/// until key and certificate match (an install writes them one after the other).
fn dialer_of(state_dir: &Path, node: &str, peer: &str) -> Option<Arc<ClientConfig>> {
    let dir = state_dir.join("identity");
    for _ in 0..50 {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        if let (Some(chain), Some(key), Some(bundle)) =
            (read("node.pem"), read("node.key"), read("bundle.json"))
        {
            let cert = certified(&chain, &key);
            if cert.keys_match().is_ok() {
                let bundle: TrustBundle = serde_json::from_str(&bundle).ok()?;
                let id = SpiffeId::node(TRUST_DOMAIN, node).unwrap();
                let peer = SpiffeId::node(TRUST_DOMAIN, peer).unwrap();
                return TlsIdentity::new(id, cert, &bundle)
                    .ok()?
                    .client_config(&peer)
                    .ok();
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// New tunnel handshakes between every pair of hosts, as their agents would make them at
/// that moment, every `every` until `stop`: `(unix time, from, to, outcome)`.
fn probe_handshakes(
    m: &Mesh,
    every: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<(f64, usize, usize, Result<String, String>)> {
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..3)
            .map(|from| {
                s.spawn(move || {
                    in_netns(&m.net.hosts[from].netns, || {
                        let mut seen = Vec::new();
                        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                            for to in (0..3).filter(|&t| t != from) {
                                let t = unix_now();
                                let r = match dialer_of(
                                    &m.agents[from].state_dir(),
                                    NAMES[from],
                                    NAMES[to],
                                ) {
                                    Some(config) => try_peer_connection(
                                        SocketAddrV4::new(m.net.hosts[to].ipv4(), 15008),
                                        config,
                                    ),
                                    None => Err("no usable identity on disk".into()),
                                };
                                seen.push((t, from, to, r));
                            }
                            std::thread::sleep(every);
                        }
                        seen
                    })
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    })
}

#[test]
fn a_ca_rotation_while_a_client_makes_steady_requests_fails_zero_requests() {
    let m = Mesh::new();
    let _a = Backend::start(&m.net, 0, "quotes-svc", 7500, m.dir.path());
    let _b = Backend::start(&m.net, 1, "quotes-svc", 7500, m.dir.path());
    m.deploy(0, "name: quotes-svc\nport: 7500\n");
    m.deploy(1, "name: quotes-svc\nport: 7500\n");
    m.wait_for_instances(2, "quotes-svc", 2);
    // Both backends listen before the steady client starts.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(_a.seen().contains("/ready") && _b.seen().contains("/ready")) {
        let _ = call(&m, 2, "http://quotes-svc.svc/ready");
        assert!(Instant::now() < deadline, "the backends never answered");
    }
    let status = |i: usize| m.agents[i].ctl_json(&["status"]).unwrap();
    let not_after_before: Vec<serde_json::Value> = (0..3)
        .map(|i| status(i)["identity"]["cert_not_after_unix"].clone())
        .collect();
    assert!(
        not_after_before.iter().all(|v| v.is_u64()),
        "{not_after_before:?}"
    );

    let stop = m.dir.path().join("stop-steady");
    let log = m.dir.path().join("steady.log");
    let mut client: Child = m.cgs[2]
        .command("nsenter")
        .arg(format!("--net=/run/netns/{}", m.net.hosts[2].netns))
        .arg("--")
        .arg(vm_tests::tools::path_of("python3"))
        .args(["-c", STEADY_CLIENT, "quotes-svc.svc", "50"])
        .arg(&stop)
        .arg(&log)
        .arg("120")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Beside it, new tunnel handshakes between every pair of hosts, as each agent would
    // dial at that moment: the steady client's requests ride tunnels opened before the
    // rotation, so this is what shows that new connections work throughout too.
    let probe_stop = std::sync::atomic::AtomicBool::new(false);
    let (probes, rotate_at, done_at, done_after, new_root, saw_two_roots) = std::thread::scope(
        |s| {
            let probe = s.spawn(|| probe_handshakes(&m, Duration::from_millis(50), &probe_stop));
            // Warm up: the client is being served before the rotation starts.
            std::thread::sleep(Duration::from_secs(3));
            let rotate_at = unix_now();
            let rotated = Instant::now();
            let out = m.agents[0].ctl(&["ca", "rotate"]);
            assert!(out.status.success(), "{}", text(&out));

            // Until the rotation is complete: the CA has one root again (a new one), every host's
            // bundle has one root after two were seen, and every host has a new certificate.
            let ca_dir = m.agents[0].state_dir();
            let mut saw_two_roots = false;
            let (done_after, new_root) = loop {
                let roots = CertificateAuthority::load(&ca_dir)
                    .map(|ca| ca.roots())
                    .unwrap_or_default();
                let s: Vec<serde_json::Value> = (0..3).map(status).collect();
                if roots.len() == 2 || s.iter().any(|s| s["identity"]["trust_bundle_roots"] == 2) {
                    saw_two_roots = true;
                }
                let renewed = (0..3).all(|i| {
                    s[i]["identity"]["cert_not_after_unix"].is_u64()
                        && s[i]["identity"]["cert_not_after_unix"] != not_after_before[i]
                });
                let one_root = s.iter().all(|s| s["identity"]["trust_bundle_roots"] == 1);
                if saw_two_roots && renewed && one_root && roots.len() == 1 && roots[0].id != 1 {
                    break (rotated.elapsed(), roots[0].id);
                }
                assert!(
                    rotated.elapsed() < Duration::from_secs(30),
                    "the rotation did not complete: CA roots {roots:?}, identities {:?}\nA's log:\n{}",
                    s.iter().map(|s| &s["identity"]).collect::<Vec<_>>(),
                    m.agents[0].log()
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let done_at = unix_now();
            std::thread::sleep(Duration::from_secs(3));
            probe_stop.store(true, std::sync::atomic::Ordering::SeqCst);
            (
                probe.join().unwrap(),
                rotate_at,
                done_at,
                done_after,
                new_root,
                saw_two_roots,
            )
        },
    );
    std::fs::write(&stop, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = client.kill();
            let _ = client.wait();
            panic!("the steady client did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let lines: Vec<(f64, String)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (t, rest) = l.split_once(' ')?;
            Some((t.parse().ok()?, rest.to_string()))
        })
        .collect();
    let failures: Vec<&(f64, String)> = lines
        .iter()
        .filter(|(_, r)| !r.starts_with("ok "))
        .collect();
    let ok_in = |from: f64, to: f64| {
        lines
            .iter()
            .filter(|(t, r)| *t >= from && *t < to && r.starts_with("ok "))
            .count()
    };
    let during = ok_in(rotate_at, done_at);
    let served_by = |h: &str| lines.iter().filter(|(_, r)| r.contains(h)).count();
    // Served throughout: no 500 ms window from warm-up to the end without a success.
    let first = lines.iter().map(|l| l.0).fold(f64::MAX, f64::min);
    let last = lines.iter().map(|l| l.0).fold(0.0, f64::max);
    let mut gaps = Vec::new();
    let mut t = first;
    while t + 0.5 <= last {
        if ok_in(t, t + 0.5) == 0 {
            gaps.push(t - rotate_at);
        }
        t += 0.5;
    }
    let peers = status(2)["peers"].clone();
    eprintln!(
        "MEASURED: CA rotation (root 1 -> {}) completed {} ms after `ca rotate`; steady client on C: {} requests, {} failed, {} succeeded during the rotation, {} served on host-a, {} on host-b; C's peers afterwards: {peers}",
        new_root,
        done_after.as_millis(),
        lines.len(),
        failures.len(),
        during,
        served_by("on host-a"),
        served_by("on host-b"),
    );
    let probe_failures: Vec<String> = probes
        .iter()
        .filter(|p| p.3.is_err())
        .map(|(t, from, to, r)| {
            format!(
                "{:+.3} s {} -> {}: {}",
                t - rotate_at,
                NAMES[*from],
                NAMES[*to],
                r.as_ref().unwrap_err()
            )
        })
        .collect();
    eprintln!(
        "MEASURED: {} new tunnel handshakes probed between every pair of hosts from {:+.1} s to {:+.1} s around `ca rotate` (rotation done at {:+.3} s), {} failed{}",
        probes.len(),
        probes.iter().map(|p| p.0).fold(f64::MAX, f64::min) - rotate_at,
        probes.iter().map(|p| p.0).fold(0.0, f64::max) - rotate_at,
        done_at - rotate_at,
        probe_failures.len(),
        if probe_failures.is_empty() {
            String::new()
        } else {
            format!(":\n  {}", probe_failures.join("\n  "))
        }
    );
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}\nC's log:\n{}",
        failures.len(),
        failures.iter().take(20).collect::<Vec<_>>(),
        m.agents[2].log()
    );
    assert!(lines.len() >= 200, "too few requests: {}", lines.len());
    assert!(during > 0, "no request was served during the rotation");
    assert!(
        gaps.is_empty(),
        "no request succeeded in the 500 ms windows starting at {gaps:?} s after `ca rotate`"
    );
    assert!(served_by("on host-a") > 0 && served_by("on host-b") > 0);
    assert!(saw_two_roots, "the two-root bundle was never seen");
    assert!(
        probe_failures.is_empty(),
        "new tunnel handshakes failed during the rotation:\n{}",
        probe_failures.join("\n")
    );
    assert!(
        probes.len() > 60,
        "too few handshakes probed: {}",
        probes.len()
    );
}
