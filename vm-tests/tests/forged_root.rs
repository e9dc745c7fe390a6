//! Trust roots never come from the registry alone (issue #14, P2), on the three-host mesh
//! (real etcd, three agents in network namespaces): someone who can write the registry puts
//! a trust bundle with a forged root in it (once bare, once "cross-signed" by the forged root
//! itself) and a certificate of that root for host-b. No agent installs any of it (their
//! roots stay as they were, each logs the refusal with the root's fingerprint and counts it
//! in `hms-ctl status` and `/metrics`), a node certificate the forged root signed for
//! `spiffe://test.mesh/node/host-c` is refused at host-a's :15008, and a real
//! `hms-ctl ca rotate` afterwards still completes: every host ends on the new root, with no
//! refusal counted for it, and calls across hosts work.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hms_node_agent::identity::{
    CertificateAuthority, IssuedCertificate, SpiffeId, TrustBundle, root_fingerprint,
};
use hms_node_agent::mesh_identity::TRUST_BUNDLE_KEY;
use hms_node_agent::registry::etcd::{DEFAULT_PREFIX, Key};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::CertifiedKey;
use serde_json::Value;
use vm_tests::etcd::etcdctl_as;
use vm_tests::mesh::{Backend, Mesh, NAMES, TRUST_DOMAIN, in_netns, text};
use vm_tests::slack;

// ---------------------------------------------------------------------------------------
// The attacker's access to the registry: the one place this test writes etcd directly,
// with `etcdctl` and the operator's credential (the strongest writer there is: etcd's
// role-based access keeps every host's own credential off `blobs/ca/`). Where the bundle's
// key lives is decided here only.

fn registry_key(blob: &str) -> String {
    Key::Blob(blob.to_string()).encode(DEFAULT_PREFIX)
}

/// The operator's credential: host-a's (the CA host's) etcd client certificate, etcd's
/// `root` user.
fn operator(m: &Mesh) -> std::path::PathBuf {
    m.agents[0].state_dir().join("etcd")
}

fn registry_put(m: &Mesh, blob: &str, value: &[u8]) {
    let key = registry_key(blob);
    let value = String::from_utf8(value.to_vec()).unwrap();
    etcdctl_as(&m.etcd, Some(&operator(m)), &["put", &key, &value])
        .unwrap_or_else(|e| panic!("writing {key}: {e:#}"));
}

fn registry_get(m: &Mesh, blob: &str) -> Vec<u8> {
    let key = registry_key(blob);
    let out = etcdctl_as(
        &m.etcd,
        Some(&operator(m)),
        &["get", &key, "--print-value-only"],
    )
    .unwrap_or_else(|e| panic!("reading {key}: {e:#}"));
    out.trim_end().as_bytes().to_vec()
}

// ---------------------------------------------------------------------------------------
// What the attacker makes: a root of its own, named like the mesh's.

struct Forged {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
    fingerprint: String,
}

fn forged_root() -> Forged {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::OrganizationName,
        format!("HMS mesh {TRUST_DOMAIN}"),
    );
    dn.push(rcgen::DnType::CommonName, "HMS root 2");
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    Forged {
        fingerprint: root_fingerprint(cert.der()),
        pem: cert.pem(),
        params,
        key,
    }
}

impl Forged {
    fn issuer(&self) -> rcgen::Issuer<'static, rcgen::KeyPair> {
        let key = rcgen::KeyPair::from_pem(&self.key.serialize_pem()).unwrap();
        rcgen::Issuer::new(self.params.clone(), key)
    }

    /// A "cross-certificate" for the forged root, issued and signed by the forged root.
    fn self_cross_signed(&self) -> String {
        self.params
            .signed_by(&self.key, &self.issuer())
            .unwrap()
            .pem()
    }

    /// A node certificate for `uri` on `key`, signed by the forged root.
    fn leaf(&self, uri: &str, key: &rcgen::KeyPair) -> rcgen::Certificate {
        vm_tests::mesh::node_leaf_params(uri)
            .signed_by(key, &self.issuer())
            .unwrap()
    }
}

/// `Ok` only if host `addr` accepted `cert` from us as a peer agent.
fn try_peer_connection(addr: SocketAddrV4, cert: Arc<CertifiedKey>) -> Result<String, String> {
    vm_tests::peer_probe::try_peer_connection(
        addr,
        vm_tests::peer_probe::hand_made_config(Some(cert)),
    )
}

fn certified(chain_pem: &str, key_pem: &str) -> Arc<CertifiedKey> {
    vm_tests::peer_probe::certified(chain_pem, key_pem)
}

// ---------------------------------------------------------------------------------------

fn identity(m: &Mesh, i: usize) -> Value {
    m.agents[i].ctl_json(&["status"]).unwrap()["identity"].clone()
}

fn refused_total(m: &Mesh, i: usize) -> u64 {
    identity(m, i)["trust_bundle_refused_total"]
        .as_u64()
        .unwrap()
}

/// `/metrics` of host `i`, scraped with curl inside its namespace.
fn scrape(m: &Mesh, i: usize) -> String {
    let out = vm_tests::tools::in_netns(&m.net.hosts[i].netns, "curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{}/metrics", m.agents[i].metrics))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scraping {}: {}",
        NAMES[i],
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(scraped: &str, name: &str) -> Option<u64> {
    scraped
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits (bounded) until every host counted `n` refused bundles; then checks each says so in
/// its log (one line per bundle, naming `fingerprint`, the last one `why`; host-a, the CA
/// host, says it did not make the root), in `/metrics`, and kept `roots`.
fn all_refused(m: &Mesh, n: u64, fingerprint: &str, why: &str, roots: &[Value]) {
    let deadline = Instant::now() + slack(Duration::from_secs(15));
    for (i, name) in NAMES.iter().enumerate() {
        while refused_total(m, i) < n {
            assert!(
                Instant::now() < deadline,
                "{name} never refused bundle #{n}: {}\n{}",
                identity(m, i),
                m.agents[i].log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for i in 0..3 {
        let id = identity(m, i);
        assert_eq!(id["trust_bundle_refused_total"], n, "{}: {id}", NAMES[i]);
        assert_eq!(
            id["root_fingerprints"], roots[i],
            "{} changed roots",
            NAMES[i]
        );
        assert_eq!(id["trust_bundle_roots"], 1, "{}: {id}", NAMES[i]);
        assert!(id["trust_problem"].is_null(), "{}: {id}", NAMES[i]);
        let log = m.agents[i].log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("refused a trust bundle") && l.contains(fingerprint))
            .collect();
        // One line per distinct bundle refused (each of them names this root).
        assert_eq!(
            lines.len() as u64,
            n,
            "{}: one line per bundle:\n{log}",
            NAMES[i]
        );
        if NAMES[i] != "host-a" {
            assert!(
                lines[lines.len() - 1].contains(why),
                "{}: {lines:?}",
                NAMES[i]
            );
        }
        let human = text(&m.agents[i].ctl(&["status"]));
        assert!(
            human.contains(&format!("REFUSED {n} trust bundle(s)")),
            "{}: {human}",
            NAMES[i]
        );
        let scraped = scrape(m, i);
        assert_eq!(
            metric(&scraped, "hms_identity_trust_bundle_refused_total"),
            Some(n),
            "{}:\n{scraped}",
            NAMES[i]
        );
    }
}

fn call_ok(m: &Mesh, from: usize) {
    let deadline = Instant::now() + slack(Duration::from_secs(10));
    loop {
        let o = m.curl(from, &["http://quotes-svc.svc/ping"]);
        let body = String::from_utf8_lossy(&o.stdout);
        if o.status.success() && body.contains("quotes-svc on host-") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "call from {} failed: {}",
            NAMES[from],
            text(&o)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_forged_root_in_the_registry_is_installed_nowhere_its_certificates_are_refused_and_a_real_rotation_still_completes()
 {
    let m = Mesh::new();
    // quotes-svc runs on host-a only: host-b and host-c reach it across the mesh.
    let _backend = Backend::start(&m.net, 0, "quotes-svc", 7510, m.dir.path());
    m.deploy(0, "name: quotes-svc\nport: 7510\n");
    call_ok(&m, 2);
    call_ok(&m, 1);

    let roots: Vec<Value> = (0..3)
        .map(|i| identity(&m, i)["root_fingerprints"].clone())
        .collect();
    assert!(
        roots
            .iter()
            .all(|r| r == &roots[0] && r.as_array().unwrap().len() == 1),
        "{roots:?}"
    );
    assert!((0..3).all(|i| refused_total(&m, i) == 0));
    let real: TrustBundle = serde_json::from_slice(&registry_get(&m, TRUST_BUNDLE_KEY)).unwrap();
    assert_eq!(Value::from(real.root_fingerprints()), roots[0]);

    // 1. The real root plus a forged one, no cross-certificate.
    let forged = forged_root();
    let bundle =
        TrustBundle::from_pem(TRUST_DOMAIN, &format!("{}{}", real.to_pem(), forged.pem)).unwrap();
    registry_put(&m, TRUST_BUNDLE_KEY, &serde_json::to_vec(&bundle).unwrap());
    all_refused(&m, 1, &forged.fingerprint, "no cross-certificate", &roots);

    // 2. The same, "cross-signed" by the forged root itself.
    let bundle = bundle
        .with_cross_signed(vec![forged.self_cross_signed()])
        .unwrap();
    registry_put(&m, TRUST_BUNDLE_KEY, &serde_json::to_vec(&bundle).unwrap());
    all_refused(
        &m,
        2,
        &forged.fingerprint,
        "not signed by any root this host trusts",
        &roots,
    );

    // 3. A certificate for host-b's own key, signed by the forged root and delivered with
    // the forged bundle in ca/issued/host-b: host-b installs neither.
    let b_before = identity(&m, 1);
    let b_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(m.agents[1].state_dir().join("identity/node.key")).unwrap(),
    )
    .unwrap();
    let b_leaf = forged.leaf(&format!("spiffe://{TRUST_DOMAIN}/node/host-b"), &b_key);
    let issued = IssuedCertificate {
        spiffe_id: SpiffeId::node(TRUST_DOMAIN, "host-b").unwrap(),
        chain_pem: b_leaf.pem(),
        serial: "7e57".into(),
        not_before: SystemTime::now() - Duration::from_secs(60),
        not_after: SystemTime::now() + Duration::from_secs(3600),
        trust_bundle: bundle.clone(),
    };
    registry_put(
        &m,
        "ca/issued/host-b",
        &serde_json::to_vec(&issued).unwrap(),
    );
    let deadline = Instant::now() + slack(Duration::from_secs(15));
    while refused_total(&m, 1) < 3 {
        assert!(
            Instant::now() < deadline,
            "host-b never refused the forged certificate:\n{}",
            m.agents[1].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let b_after = identity(&m, 1);
    assert_eq!(
        b_after["cert_not_after_unix"], b_before["cert_not_after_unix"],
        "{b_after}"
    );
    assert_eq!(b_after["root_fingerprints"], roots[1]);
    assert!(m.agents[1].log().contains("ca/issued/host-b"));

    // 4. At host-a's :15008: a node certificate of the forged root naming host-c is refused;
    // host-c's real certificate, offered by the same client, is accepted.
    let a_inbound = SocketAddrV4::new(m.net.hosts[0].ipv4(), 15008);
    let c_dir = m.agents[2].state_dir().join("identity");
    let real_c = || {
        certified(
            &std::fs::read_to_string(c_dir.join("node.pem")).unwrap(),
            &std::fs::read_to_string(c_dir.join("node.key")).unwrap(),
        )
    };
    let forged_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged_c = forged.leaf(&format!("spiffe://{TRUST_DOMAIN}/node/host-c"), &forged_key);
    let forged_c = certified(&forged_c.pem(), &forged_key.serialize_pem());
    let c_netns = m.net.hosts[2].netns.clone();
    let (refused, accepted) = in_netns(&c_netns, || {
        (
            try_peer_connection(a_inbound, forged_c.clone()),
            try_peer_connection(a_inbound, real_c()),
        )
    });
    assert!(
        refused.is_err(),
        "host-a accepted the forged root's host-c: {refused:?}"
    );
    accepted.expect("host-c's real certificate must be accepted (the client works)");
    call_ok(&m, 2);
    eprintln!(
        "MEASURED: forged host-c certificate at host-a:15008: {}",
        refused.unwrap_err()
    );

    // 5. A real rotation from this state (the registry still holds the forged bundle):
    // every host ends on the new root, nothing more is refused, calls work.
    let not_after: Vec<Value> = (0..3)
        .map(|i| identity(&m, i)["cert_not_after_unix"].clone())
        .collect();
    let counts: Vec<u64> = (0..3).map(|i| refused_total(&m, i)).collect();
    let started = Instant::now();
    let out = m.agents[0].ctl(&["ca", "rotate"]);
    assert!(out.status.success(), "{}", text(&out));
    let ca_dir = m.agents[0].state_dir();
    let deadline = Instant::now() + slack(Duration::from_secs(30));
    let new_root = loop {
        let ca_roots = CertificateAuthority::load(&ca_dir)
            .map(|c| c.roots())
            .unwrap_or_default();
        let ids: Vec<Value> = (0..3).map(|i| identity(&m, i)).collect();
        if let [only] = ca_roots.as_slice()
            && only.id != 1
        {
            let pem =
                std::fs::read_to_string(ca_dir.join(format!("ca/root-{}.pem", only.id))).unwrap();
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            let fp = root_fingerprint(&der);
            let done = ids.iter().enumerate().all(|(i, id)| {
                id["root_fingerprints"] == Value::from(vec![fp.clone()])
                    && id["cert_not_after_unix"] != not_after[i]
            });
            if done {
                break fp;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the rotation did not complete: CA roots {ca_roots:?}, identities {ids:?}\nA's log:\n{}",
            m.agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let rotated_in = started.elapsed();
    for i in 0..3 {
        let id = identity(&m, i);
        assert_eq!(
            id["trust_bundle_refused_total"],
            counts[i],
            "{}: the real rotation was refused? {id}\n{}",
            NAMES[i],
            m.agents[i].log()
        );
        assert!(id["trust_problem"].is_null(), "{}: {id}", NAMES[i]);
        assert!(m.agents[i].log().contains(&forged.fingerprint));
    }
    let published: TrustBundle =
        serde_json::from_slice(&registry_get(&m, TRUST_BUNDLE_KEY)).unwrap();
    assert_eq!(published.root_fingerprints(), vec![new_root.clone()]);
    call_ok(&m, 2);
    call_ok(&m, 1);
    let (refused, accepted) = in_netns(&c_netns, || {
        (
            try_peer_connection(a_inbound, forged_c.clone()),
            try_peer_connection(a_inbound, real_c()),
        )
    });
    assert!(refused.is_err(), "{refused:?}");
    accepted.expect("host-c's new certificate must be accepted");
    eprintln!(
        "MEASURED: real rotation after the forgeries completed in {} ms; every host on {new_root}; refusals per host {counts:?}",
        rotated_in.as_millis()
    );
}

/// Until `host` is gone from `observer`'s peers (its record withdrawn).
fn wait_peer_gone(m: &Mesh, observer: usize, host: &str) {
    let deadline = Instant::now() + slack(Duration::from_secs(20));
    loop {
        let s = m.agents[observer].ctl_json(&["status"]).unwrap();
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        if !peers.iter().any(|p| p["name"] == host) {
            return;
        }
        assert!(Instant::now() < deadline, "{host} still a peer: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_host_that_missed_a_rotation_says_its_trust_chain_is_broken_and_rejoining_as_told_fixes_it() {
    let mut m = Mesh::new();
    let _backend = Backend::start(&m.net, 0, "quotes-svc", 7511, m.dir.path());
    m.deploy(0, "name: quotes-svc\nport: 7511\n");
    call_ok(&m, 2);

    // host-c is away (stopped: its record is withdrawn) for a whole rotation.
    m.agents[2].stop().unwrap();
    wait_peer_gone(&m, 0, "host-c");
    let out = m.agents[0].ctl(&["ca", "rotate"]);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + slack(Duration::from_secs(30));
    let new_root = loop {
        let published: TrustBundle =
            serde_json::from_slice(&registry_get(&m, TRUST_BUNDLE_KEY)).unwrap();
        let b = identity(&m, 1);
        // Done: one root again, in the registry, at the CA and on host-b.
        if published.len() == 1
            && b["root_fingerprints"] == Value::from(published.root_fingerprints())
            && CertificateAuthority::load(&m.agents[0].state_dir())
                .unwrap()
                .roots()
                .len()
                == 1
        {
            break published.root_fingerprints()[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "rotation without host-c did not complete: {b}\n{}",
            m.agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    // Back, with its certificate of the retired root: it says so, in status, log, metrics.
    m.agents[2].start_again().unwrap();
    let deadline = Instant::now() + slack(Duration::from_secs(15));
    let problem = loop {
        let id = identity(&m, 2);
        if let Some(p) = id["trust_problem"].as_str() {
            break p.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "host-c never noticed: {id}\n{}",
            m.agents[2].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(problem.contains("missed a CA rotation"), "{problem}");
    assert!(
        problem.contains("hms-ctl node token create --node host-c"),
        "{problem}"
    );
    assert!(problem.contains(&new_root), "{problem}");
    assert!(
        m.agents[2]
            .log()
            .contains("does not trust this host's certificate")
    );
    let human = m.agents[2].ctl(&["status"]);
    assert!(
        text(&human).contains("TRUST CHAIN BROKEN"),
        "{}",
        text(&human)
    );
    assert_eq!(
        metric(&scrape(&m, 2), "hms_identity_trust_chain_broken"),
        Some(1)
    );
    // It installed nothing it could not vouch for: still the old root alone.
    let c = identity(&m, 2);
    assert_ne!(
        c["root_fingerprints"],
        Value::from(vec![new_root.clone()]),
        "{c}"
    );

    // What it says to do: on the CA host remove the name and make a token for it; here
    // remove the identity dir and start again with the token file.
    assert!(problem.contains("hms-ctl node remove host-c"), "{problem}");
    m.agents[2].stop().unwrap();
    let out = m.agents[0].ctl(&["node", "remove", "host-c"]);
    assert!(out.status.success(), "{}", text(&out));
    let token = m.dir.path().join("host-c-again.token");
    let out = m.agents[0].ctl(&[
        "node",
        "token",
        "create",
        "--node",
        "host-c",
        "--out",
        token.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::remove_dir_all(m.agents[2].state_dir().join("identity")).unwrap();
    let args = &mut m.agents[2].extra_args;
    let at = args
        .iter()
        .position(|a| a == "--join-token-file")
        .expect("host-c joined with a token file");
    args[at + 1] = token.display().to_string();
    m.agents[2].start_again().unwrap();
    let deadline = Instant::now() + slack(Duration::from_secs(20));
    loop {
        let id = identity(&m, 2);
        if id["root_fingerprints"] == Value::from(vec![new_root.clone()])
            && id["trust_problem"].is_null()
            && id["cert_not_after_unix"].is_u64()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host-c did not re-join: {id}\n{}",
            m.agents[2].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    call_ok(&m, 2);
    assert_eq!(
        metric(&scrape(&m, 2), "hms_identity_trust_chain_broken"),
        Some(0)
    );
}
