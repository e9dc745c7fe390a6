//! The gateway's ACME client (`gateway::acme`) against Debian's `pebble`, a real RFC 8555
//! server, with validation on (HTTP-01: pebble connects to the hostname's port 5002 and
//! fetches the key authorization), its default nonce rejections left on, and 30-second
//! certificates so that a renewal really happens during the test.
//!
//! Everything runs in a network namespace of its own: pebble and the test resolver pebble asks
//! for the hostname (`-dnsserver`, answering 127.0.0.1). The first test drives the client
//! alone, with a minimal responder on 127.0.0.1:5002 answering from its `Challenges`; the
//! second is the whole path: a gateway spec whose https listener has `acme:`, the agent's
//! client, its plain-HTTP listener answering pebble's challenge, and the certificate served
//! to a real TLS client (openssl), then renewed.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hms_node_agent::gateway::acme::{AcmeClient, AcmeConfig, Challenges};
use vm_tests::mesh::{Mesh, in_netns};
use vm_tests::netns::TestNet;
use vm_tests::resolver::TestResolver;
use vm_tests::{slack, tools};

const HOST: &str = "gw.acme.test";
const RESOLVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);
/// pebble's `certificateValidityPeriod`, seconds.
const LIFETIME_S: u64 = 30;

/// A CA for pebble's own HTTPS (the directory), and the config pointing at it.
fn pebble_files(dir: &std::path::Path) -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("pebble.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("pebble.key"), key.serialize_pem()).unwrap();
    let config = serde_json::json!({
        "pebble": {
            "listenAddress": "127.0.0.1:14000",
            "managementListenAddress": "127.0.0.1:15000",
            "certificate": dir.join("pebble.pem"),
            "privateKey": dir.join("pebble.key"),
            "httpPort": 5002,
            "tlsPort": 5001,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": LIFETIME_S,
        }
    });
    let path = dir.join("pebble-config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// pebble in `ns` with its resolver (answering 127.0.0.1 for every name), logging to
/// `dir/pebble.log`: validation on, nonce rejections at pebble's default, no sleep before
/// validating.
fn start_pebble(ns: &str, dir: &std::path::Path) -> (TestResolver, std::process::Child) {
    let config = pebble_files(dir);
    let resolver = TestResolver::start_in_netns(ns, RESOLVER, Ipv4Addr::LOCALHOST).unwrap();
    let pebble = tools::in_netns(ns, "pebble")
        .args(["-config", config.to_str().unwrap()])
        .args(["-dnsserver", &format!("{RESOLVER}:53")])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env_remove("PEBBLE_VA_ALWAYS_VALID")
        .env_remove("PEBBLE_WFE_NONCEREJECT")
        .stdout(std::fs::File::create(dir.join("pebble.log")).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting pebble (cargo xtask setup installs it)");
    (resolver, pebble)
}

/// Serves `challenges` over HTTP/1.1 on `listener` (what the gateway's plain-HTTP listener
/// is to do): the key authorization for a pending token, 404 for anything else.
async fn serve_challenges(listener: tokio::net::TcpListener, challenges: Challenges) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let challenges = challenges.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let answer = challenges.answer(req.uri().path());
                    async move {
                        Ok::<_, std::convert::Infallible>(match answer {
                            Some(body) => hyper::Response::builder()
                                .header("content-type", "application/octet-stream")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                            None => hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        })
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn leaf_serial(key: &rustls::sign::CertifiedKey) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(key.cert[0].as_ref()).unwrap();
    cert.raw_serial().to_vec()
}

fn leaf_names(key: &rustls::sign::CertifiedKey) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(key.cert[0].as_ref()).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| format!("{n}"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_certificate_is_issued_over_http01_against_pebble_cached_and_renewed_before_expiry() {
    let net = TestNet::new(1).unwrap();
    let ns = net.hosts[0].netns.clone();
    let dir = tempfile::Builder::new()
        .prefix("hms-acme-")
        .tempdir()
        .unwrap();
    let (_resolver, mut pebble) = start_pebble(&ns, dir.path());
    let cache = dir.path().join("acme-cache");
    let acme_config = AcmeConfig {
        directory_url: "https://127.0.0.1:14000/dir".into(),
        directory_root: Some(dir.path().join("ca.pem")),
        contact: vec!["mailto:ops@acme.test".into()],
        cache_dir: cache.clone(),
    };
    let delivered: Arc<Mutex<Vec<Arc<rustls::sign::CertifiedKey>>>> = Arc::default();
    let result = in_netns(&ns, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // pebble up (it listens a moment after start).
            let deadline = Instant::now() + slack(Duration::from_secs(15));
            while tokio::net::TcpStream::connect("127.0.0.1:14000")
                .await
                .is_err()
            {
                assert!(Instant::now() < deadline, "pebble did not start listening");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let challenges = Challenges::default();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:5002")
                .await
                .unwrap();
            tokio::spawn(serve_challenges(listener, challenges.clone()));
            let client = AcmeClient::new(acme_config.clone(), challenges);
            let sink = delivered.clone();
            let run = client.run(vec![HOST.to_string()], move |host, key| {
                assert_eq!(host, HOST);
                sink.lock().unwrap().push(key);
            });
            // The first certificate, then its renewal (a third of 30 s before its end).
            let two = async {
                loop {
                    if delivered.lock().unwrap().len() >= 2 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                _ = run => unreachable!("the client runs until dropped"),
                r = tokio::time::timeout(slack(Duration::from_secs(90)), two) => r.is_ok(),
            }
        })
    });
    let _ = pebble.kill();
    let _ = pebble.wait();
    let log = std::fs::read_to_string(dir.path().join("pebble.log")).unwrap_or_default();
    let got = delivered.lock().unwrap().clone();
    assert!(
        result,
        "wanted an issuance and a renewal, got {} certificates; pebble said:\n{log}",
        got.len()
    );
    assert!(
        leaf_names(&got[0]).iter().any(|n| n.contains(HOST)),
        "{:?}",
        leaf_names(&got[0])
    );
    assert_ne!(
        leaf_serial(&got[0]),
        leaf_serial(&got[1]),
        "the renewal is a new certificate"
    );
    // pebble really validated over HTTP-01, fetching the key authorization from port 5002.
    assert!(
        log.contains(
            "Attempting to validate w/ HTTP: http://gw.acme.test:5002/.well-known/acme-challenge/"
        ) && log.contains("set VALID by completed challenge"),
        "{log}"
    );

    // The cache: account and the latest certificate, readable by the owner only.
    for f in [
        "account.json",
        &format!("certs/{HOST}.pem"),
        &format!("certs/{HOST}.key"),
    ] {
        let mode = std::fs::metadata(cache.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let again = AcmeClient::new(acme_config, Challenges::default());
    let cached = again
        .cached(HOST)
        .expect("a restarted client finds its certificate");
    assert_eq!(leaf_serial(&cached.key), leaf_serial(got.last().unwrap()));
    let life = cached.not_after.duration_since(cached.not_before).unwrap();
    assert!(life <= Duration::from_secs(LIFETIME_S + 1), "{life:?}");
}

/// The leaf an https listener serves for `HOST`, as `openssl x509 -noout -serial -issuer`
/// prints it; empty while it serves none.
fn served_leaf(ns: &str, port: u16) -> String {
    let hello = tools::in_netns(ns, "openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", HOST])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let mut x509 = tools::command("openssl")
        .args(["x509", "-noout", "-serial", "-issuer"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    let _ = x509.stdin.take().unwrap().write_all(&hello.stdout);
    let out = x509.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_gateway_listener_with_acme_gets_its_certificate_from_pebble_and_renews_it() {
    let m = Mesh::with_args(&|i| {
        if i == 0 {
            vec!["--gateway".into(), "all".into()]
        } else {
            Vec::new()
        }
    });
    let ns = m.net.hosts[0].netns.clone();
    let dir = tempfile::Builder::new()
        .prefix("hms-acme-gw-")
        .tempdir()
        .unwrap();
    let (_resolver, mut pebble) = start_pebble(&ns, dir.path());
    // pebble validates HTTP-01 on port 5002 (its `httpPort`): the gateway's http listener.
    let https_port = vm_tests::ports::free_port();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(
        &file,
        format!(
            "name: acme\nlisteners:\n  - name: plain\n    address: 127.0.0.1\n    port: 5002\n    protocol: http\n  - name: web\n    address: 127.0.0.1\n    port: {https_port}\n    protocol: https\n    hostname: {HOST}\n    acme:\n      directory: https://127.0.0.1:14000/dir\n      contact: [\"mailto:ops@acme.test\"]\n      directory_ca: {}\nroutes:\n  - name: all\n    backends: [{{service: shop-svc}}]\n",
            dir.path().join("ca.pem").display()
        ),
    )
    .unwrap();
    let out = m.agents[0].ctl(&["gateway", "apply", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Issued: the listener serves pebble's certificate for HOST.
    let deadline = Instant::now() + slack(Duration::from_secs(60));
    let first = loop {
        let leaf = served_leaf(&ns, https_port);
        if leaf.contains("Pebble") {
            break leaf;
        }
        assert!(
            Instant::now() < deadline,
            "no ACME certificate served: {leaf:?}\n{}",
            m.agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    // Renewed: two thirds into its 30 s, a new serial on the same listener.
    let deadline = Instant::now() + slack(Duration::from_secs(60));
    loop {
        let leaf = served_leaf(&ns, https_port);
        if leaf.contains("Pebble") && leaf != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the certificate was not renewed: still {first:?}\n{}",
            m.agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = pebble.kill();
    let _ = pebble.wait();
    let log = std::fs::read_to_string(dir.path().join("pebble.log")).unwrap_or_default();
    assert!(
        log.contains(
            "Attempting to validate w/ HTTP: http://gw.acme.test:5002/.well-known/acme-challenge/"
        ) && log.contains("set VALID by completed challenge"),
        "{log}"
    );
    // Deleting the spec stops the client and closes the listeners.
    let out = m.agents[0].ctl(&["gateway", "delete", "acme"]);
    assert!(out.status.success());
}
