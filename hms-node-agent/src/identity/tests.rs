//! The identity story end to end, over real loopback TLS with tokio_rustls.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, SignatureScheme};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::ca::parse_csr;
use super::node::certified_key_from_pem;
use super::testing::AcceptAnyServer;
use super::*;

const DOMAIN: &str = "mesh.test";
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A node key made here, a CSR, the CA's certificate, as rustls wants it.
fn certify(
    ca: &CertificateAuthority,
    node: &str,
    now: SystemTime,
    ttl: Duration,
) -> Arc<CertifiedKey> {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let issued = ca.sign_node_csr_at(&csr, node, ttl, now).unwrap();
    certified_key_from_pem(&issued.chain_pem, &key.serialize_pem()).unwrap()
}

/// A certificate from `ca` naming any `id` (the CA's public API never does this).
fn certify_as(ca: &CertificateAuthority, id: &str) -> Arc<CertifiedKey> {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let id: SpiffeId = id.parse().unwrap();
    let issued = ca
        .issue(parse_csr(&csr).unwrap(), &id, SystemTime::now(), DAY)
        .unwrap();
    certified_key_from_pem(&issued.chain_pem, &key.serialize_pem()).unwrap()
}

fn node_tls(ca: &CertificateAuthority, node: &str) -> TlsIdentity {
    let cert = certify(ca, node, SystemTime::now(), DAY);
    TlsIdentity::new(
        SpiffeId::node(DOMAIN, node).unwrap(),
        cert,
        &ca.trust_bundle(),
    )
    .unwrap()
}

fn new_ca() -> (tempfile::TempDir, CertificateAuthority) {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::init(dir.path(), DOMAIN).unwrap();
    (dir, ca)
}

fn leaf_serial(conn: &rustls::CommonState) -> String {
    x509::parse(&conn.peer_certificates().unwrap()[0])
        .unwrap()
        .serial_hex
}

/// One handshake over loopback, then one echoed message. Returns what the server saw
/// (the peer's SPIFFE ID or the error) and whether the client got its echo.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Result<SpiffeId, String>, Result<(), String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let id = verify_established(tls.get_ref().1).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(id)
    });
    let client_result = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("ignored.invalid").unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"hello");
        Ok::<_, String>(())
    }
    .await;
    let server_result = server_task.await.unwrap();
    (server_result, client_result)
}

async fn dial(
    from: &TlsIdentity,
    to: &TlsIdentity,
) -> (Result<SpiffeId, String>, Result<(), String>) {
    handshake(
        to.server_config().unwrap(),
        from.client_config(to.spiffe_id()).unwrap(),
    )
    .await
}

fn assert_refused(result: (Result<SpiffeId, String>, Result<(), String>), why: &str) {
    assert!(result.0.is_err(), "{why}: server accepted {:?}", result.0);
    assert!(result.1.is_err(), "{why}: client went on");
}

#[test]
fn a_node_certificate_names_only_the_node_and_lives_a_day() {
    let (_dir, ca) = new_ca();
    // The CSR asks for someone else's identity and a DNS name; the CA ignores both.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://mesh.test/node/ca-host".try_into().unwrap(),
    ));
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let now = SystemTime::now();
    let issued = ca
        .sign_node_csr_at(&csr, "host-a", DEFAULT_CERT_TTL, now)
        .unwrap();

    assert_eq!(
        issued.spiffe_id.to_string(),
        "spiffe://mesh.test/node/host-a"
    );
    let der = x509::certs_from_pem(&issued.chain_pem).unwrap();
    assert_eq!(der.len(), 1, "root-signed leaf only");
    let info = x509::parse(&der[0]).unwrap();
    assert_eq!(info.spiffe_id.unwrap(), issued.spiffe_id);
    assert!(!info.is_ca);
    let text = String::from_utf8_lossy(&der[0]);
    assert!(!text.contains("evil.example") && !text.contains("ca-host"));
    let life = info.not_after.duration_since(now).unwrap();
    assert!(
        life <= DAY && life > DAY - Duration::from_secs(5),
        "{life:?}"
    );
    assert!(info.not_before <= now);

    assert!(ca.sign_node_csr(&csr, "bad name", DAY).is_err());
    assert!(matches!(
        ca.sign_node_csr("not a csr", "host-a", DAY),
        Err(IdentityError::BadCsr(_))
    ));
    // A CSR whose signature does not match its key is refused.
    let mut tampered = csr.into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    assert!(
        ca.sign_node_csr(&String::from_utf8(tampered).unwrap(), "host-a", DAY)
            .is_err()
    );
}

#[tokio::test]
async fn two_nodes_of_one_ca_talk_mtls_both_ways() {
    let (_dir, ca) = new_ca();
    let a = node_tls(&ca, "host-a");
    let b = node_tls(&ca, "host-b");
    let (server, client) = dial(&a, &b).await;
    assert_eq!(server.unwrap(), *a.spiffe_id());
    client.unwrap();
    let (server, client) = dial(&b, &a).await;
    assert_eq!(server.unwrap(), *b.spiffe_id());
    client.unwrap();
}

#[tokio::test]
async fn the_inbound_listener_refuses_a_client_without_certificate() {
    let (_dir, ca) = new_ca();
    let b = node_tls(&ca, "host-b");
    let client = ClientConfig::builder_with_provider(Arc::new(tls::provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_no_client_auth();
    let mut client = client;
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    let result = handshake(b.server_config().unwrap(), Arc::new(client)).await;
    assert!(
        result
            .0
            .as_ref()
            .unwrap_err()
            .contains("peer sent no certificates"),
        "{:?}",
        result.0
    );
    assert_refused(result, "no client certificate");
}

/// rustls is built with TLS 1.2 (for egress to outside systems); the mesh's own links must
/// still refuse it, whatever the peer's certificate.
#[tokio::test]
async fn a_tls12_only_peer_is_refused_both_ways_even_with_a_valid_certificate() {
    let (_dir, ca) = new_ca();
    let a = node_tls(&ca, "host-a");
    let b = node_tls(&ca, "host-b");
    let full = Arc::new(rustls::crypto::ring::default_provider());
    assert!(
        full.cipher_suites
            .iter()
            .any(|s| s.version() == &rustls::version::TLS12),
        "this test needs rustls built with TLS 1.2"
    );
    // A TLS 1.2-only dialer presenting host-a's valid certificate.
    let mut tls12_client = ClientConfig::builder_with_provider(full.clone())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_client_cert_resolver(Arc::new(Fixed(certify(
            &ca,
            "host-a",
            SystemTime::now(),
            DAY,
        ))));
    tls12_client.alpn_protocols = vec![ALPN_H2.to_vec()];
    let result = handshake(b.server_config().unwrap(), Arc::new(tls12_client)).await;
    let err = result.0.as_ref().unwrap_err().to_lowercase();
    assert!(err.contains("tls12notoffered"), "{err}");
    assert_refused(result, "TLS 1.2-only dialer");
    // A TLS 1.2-only server with host-b's valid certificate: our dialer refuses it.
    let cert = certify(&ca, "host-b", SystemTime::now(), DAY);
    let mut tls12_server = rustls::ServerConfig::builder_with_provider(full)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedServer(cert)));
    tls12_server.alpn_protocols = vec![ALPN_H2.to_vec()];
    let (server, client) = handshake(
        Arc::new(tls12_server),
        a.client_config(b.spiffe_id()).unwrap(),
    )
    .await;
    assert!(server.is_err() && client.is_err(), "{server:?} {client:?}");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_both_ways() {
    let (_d1, ca) = new_ca();
    let (_d2, other_ca) = new_ca(); // same trust domain name, different root
    let ours = node_tls(&ca, "host-b");
    let stranger = node_tls(&other_ca, "host-a");
    assert_refused(dial(&stranger, &ours).await, "stranger dials us");
    assert_refused(dial(&ours, &stranger).await, "we dial a stranger");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_both_ways() {
    let (_dir, ca) = new_ca();
    let two_days_ago = SystemTime::now() - 2 * DAY;
    let expired = certify(&ca, "host-a", two_days_ago, DAY);
    let a = TlsIdentity::new(
        SpiffeId::node(DOMAIN, "host-a").unwrap(),
        expired,
        &ca.trust_bundle(),
    )
    .unwrap();
    let b = node_tls(&ca, "host-b");
    let result = dial(&a, &b).await;
    assert!(
        result
            .0
            .as_ref()
            .unwrap_err()
            .to_lowercase()
            .contains("expired"),
        "{:?}",
        result.0
    );
    assert_refused(result, "expired client");
    assert_refused(dial(&b, &a).await, "expired server");
}

#[tokio::test]
async fn a_wrong_spiffe_id_is_refused() {
    let (_dir, ca) = new_ca();
    let b = node_tls(&ca, "host-b");
    for bad in [
        "spiffe://other.test/node/host-a", // another trust domain, same root
        "spiffe://mesh.test/svc/payments", // not a node
        "spiffe://mesh.test/node/a/b",     // not a node name
    ] {
        let client = Arc::new(ClientConfig::clone(
            &b.client_config(b.spiffe_id()).unwrap(),
        ));
        // Build a client that presents the bad certificate but otherwise behaves.
        let bad_cert = certify_as(&ca, bad);
        let bad_id: SpiffeId = bad.parse().unwrap();
        assert!(TlsIdentity::new(bad_id, bad_cert.clone(), &ca.trust_bundle()).is_err());
        let mut config = ClientConfig::builder_with_provider(Arc::new(tls::provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
            .with_client_cert_resolver(Arc::new(Fixed(bad_cert)));
        config.alpn_protocols = client.alpn_protocols.clone();
        let result = handshake(b.server_config().unwrap(), Arc::new(config)).await;
        assert!(
            result
                .0
                .as_ref()
                .unwrap_err()
                .contains("PeerIdentityRefused"),
            "{bad}: {:?}",
            result.0
        );
        assert_refused(result, bad);
    }
    // A dialer refuses a valid node that is not the one it meant to reach.
    let a = node_tls(&ca, "host-a");
    let c = node_tls(&ca, "host-c");
    let wrong_peer = handshake(
        c.server_config().unwrap(),
        a.client_config(b.spiffe_id()).unwrap(),
    )
    .await;
    assert!(
        wrong_peer
            .1
            .as_ref()
            .unwrap_err()
            .contains("expected spiffe://mesh.test/node/host-b"),
        "{:?}",
        wrong_peer.1
    );
    assert!(wrong_peer.0.is_err());
}

#[tokio::test]
async fn rotation_keeps_old_and_new_certificates_working_until_the_old_root_retires() {
    let (_dir, mut ca) = new_ca();
    let old = node_tls(&ca, "host-a");
    ca.rotate().unwrap();
    assert_eq!(ca.trust_bundle().len(), 2);
    // Step 1: every node gets the two-root bundle.
    old.set_trust_bundle(&ca.trust_bundle()).unwrap();
    // Step 2: re-issued nodes present new-root certificates.
    let new = node_tls(&ca, "host-b");
    let (s, c) = dial(&old, &new).await;
    s.unwrap();
    c.unwrap();
    let (s, c) = dial(&new, &old).await;
    s.unwrap();
    c.unwrap();
    // Step 3: the old root retires; a certificate it signed is refused.
    let retired = ca.retire_old().unwrap();
    assert_eq!(retired.len(), 1);
    new.set_trust_bundle(&ca.trust_bundle()).unwrap();
    assert_refused(dial(&old, &new).await, "old-root client after retirement");
    assert_refused(dial(&new, &old).await, "old-root server after retirement");
    // Once re-issued, the old node is back.
    old.set_certificate(certify(&ca, "host-a", SystemTime::now(), DAY))
        .unwrap();
    old.set_trust_bundle(&ca.trust_bundle()).unwrap();
    let (s, c) = dial(&old, &new).await;
    s.unwrap();
    c.unwrap();
    // The retired root's files are gone and the CA reloads as it is.
    let loaded = CertificateAuthority::load(ca.dir().parent().unwrap()).unwrap();
    assert_eq!(loaded.trust_bundle(), ca.trust_bundle());
    assert!(!ca.dir().join("root-1.key").exists());
    assert!(ca.dir().join("root-2.key").exists());
}

#[tokio::test]
async fn renewal_swaps_the_certificate_without_dropping_a_connection() {
    let (_dir, ca) = new_ca();
    let a = node_tls(&ca, "host-a");
    let b = node_tls(&ca, "host-b");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(b.server_config().unwrap());
    let server = tokio::spawn(async move {
        // Echo every connection until it closes.
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut tls = acceptor.accept(tcp).await.unwrap();
                let mut buf = [0u8; 64];
                loop {
                    let n = tls.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    tls.write_all(&buf[..n]).await.unwrap();
                }
            });
        }
    });
    let connector = TlsConnector::from(a.client_config(b.spiffe_id()).unwrap());
    let name = ServerName::try_from("ignored.invalid").unwrap();
    let mut first = connector
        .connect(name.clone(), TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    first.write_all(b"ping").await.unwrap();
    first.read_exact(&mut buf).await.unwrap();
    let before = leaf_serial(first.get_ref().1);

    // Both sides renew while the connection is open.
    b.set_certificate(certify(&ca, "host-b", SystemTime::now(), DAY))
        .unwrap();
    a.set_certificate(certify(&ca, "host-a", SystemTime::now(), DAY))
        .unwrap();

    first.write_all(b"pong").await.unwrap();
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong", "the established connection carries on");
    let mut second = connector
        .connect(name, TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    second.write_all(b"ping").await.unwrap();
    second.read_exact(&mut buf).await.unwrap();
    let after = leaf_serial(second.get_ref().1);
    assert_ne!(
        before, after,
        "a new handshake sees the renewed certificate"
    );
    assert_eq!(peer_spiffe_id(second.get_ref().1).unwrap(), *b.spiffe_id());
    // A certificate for another node cannot be swapped in.
    assert!(
        a.set_certificate(certify(&ca, "host-b", SystemTime::now(), DAY))
            .is_err()
    );
    server.abort();
}

#[test]
fn a_node_joins_with_a_single_use_token_and_renews_with_its_certificate() {
    let (ca_dir, mut ca) = new_ca();
    let node_dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let token = ca
        .create_join_token(Some("host-a"), DEFAULT_TOKEN_TTL, now)
        .unwrap();

    let mut node = NodeIdentity::load_or_create(node_dir.path(), DOMAIN, "host-a").unwrap();
    assert!(node.needs_renewal(now));
    assert!(matches!(
        node.create_renewal_request(),
        Err(IdentityError::NotCertified)
    ));
    let csr = node.create_csr().unwrap();
    // A broken CSR does not spend the token.
    assert!(
        ca.redeem_and_sign(&token.secret, "garbage", "host-a", DAY, now)
            .is_err()
    );
    let issued = ca
        .redeem_and_sign(&token.secret, &csr, "host-a", DAY, now)
        .unwrap();
    // Spent, and the spending survived a restart of the CA.
    let mut reloaded = CertificateAuthority::load(ca_dir.path()).unwrap();
    let again = reloaded.redeem_and_sign(&token.secret, &csr, "host-a", DAY, now);
    assert!(
        matches!(
            again,
            Err(IdentityError::Token(TokenError::AlreadyUsed { .. }))
        ),
        "{again:?}"
    );
    let expired = ca
        .create_join_token(None, Duration::from_secs(60), now)
        .unwrap();
    let late = ca.redeem_and_sign(
        &expired.secret,
        &csr,
        "host-b",
        DAY,
        now + Duration::from_secs(61),
    );
    assert!(
        matches!(late, Err(IdentityError::Token(TokenError::Expired { .. }))),
        "{late:?}"
    );

    node.install_issued(&issued).unwrap();
    assert!(!node.needs_renewal(now));
    let status = node.status();
    let cert = status.certificate.unwrap();
    assert_eq!(
        status.spiffe_id.to_string(),
        "spiffe://mesh.test/node/host-a"
    );
    assert_eq!(cert.not_after, issued.not_after);
    assert!(node.needs_renewal(cert.renew_at));
    assert!(!node.needs_renewal(cert.renew_at - Duration::from_secs(1)));
    assert_eq!(
        status.trust_bundle_fingerprint,
        Some(ca.trust_bundle().fingerprint())
    );

    // Renewal: fresh key, proven by the current one.
    let old_key = std::fs::read_to_string(node_dir.path().join("identity/node.key")).unwrap();
    let request = node.create_renewal_request().unwrap();
    let renewed = ca.renew(&request, DAY, SystemTime::now()).unwrap();
    assert_eq!(renewed.spiffe_id, issued.spiffe_id);
    let mut forged = request.clone();
    forged.proof_of_possession[10] ^= 1;
    assert!(ca.renew(&forged, DAY, SystemTime::now()).is_err());
    let mut other_chain = request.clone();
    other_chain.current_chain_pem = renewed.chain_pem.clone(); // signature by another key
    assert!(ca.renew(&other_chain, DAY, SystemTime::now()).is_err());
    assert!(
        ca.renew(&request, DAY, SystemTime::now() + 2 * DAY)
            .is_err(),
        "an expired cert cannot renew"
    );
    node.install_issued(&renewed).unwrap();
    let new_key = std::fs::read_to_string(node_dir.path().join("identity/node.key")).unwrap();
    assert_ne!(old_key, new_key, "renewal rotates the key");

    // A restart finds the renewed certificate with its key.
    let reloaded = NodeIdentity::load_or_create(node_dir.path(), DOMAIN, "host-a").unwrap();
    assert_eq!(reloaded.status(), node.status());
    TlsIdentity::from_node(&reloaded).unwrap();
    // Another node's certificate is not installed.
    let mut other =
        NodeIdentity::load_or_create(tempfile::tempdir().unwrap().path(), DOMAIN, "host-b")
            .unwrap();
    let err = other.install_issued(&renewed).unwrap_err();
    assert!(err.to_string().contains("host-a"), "{err}");
}

#[test]
fn keys_are_private_and_the_ca_layout_is_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ca, node) = bootstrap_local(dir.path(), DOMAIN, "solo").unwrap();
    ca.create_join_token(None, DEFAULT_TOKEN_TTL, SystemTime::now())
        .unwrap();
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("ca/root-1.key"), 0o600);
    assert_eq!(mode("ca/join-tokens.json"), 0o600);
    assert_eq!(mode("identity/node.key"), 0o600);
    assert_eq!(mode("ca/root-1.pem"), 0o644);
    assert_eq!(mode("ca/bundle.pem"), 0o644);
    assert_eq!(mode("ca/ca.json"), 0o644);
    assert_eq!(mode("identity/node.pem"), 0o644);
    assert_eq!(mode("ca"), 0o700);
    let bundle_pem = std::fs::read_to_string(dir.path().join("ca/bundle.pem")).unwrap();
    assert_eq!(
        TrustBundle::from_pem(DOMAIN, &bundle_pem).unwrap(),
        ca.trust_bundle()
    );
    assert!(!node.needs_renewal(SystemTime::now()));
    assert!(matches!(
        CertificateAuthority::init(dir.path(), DOMAIN),
        Err(IdentityError::CaExists(_))
    ));
    assert!(matches!(
        CertificateAuthority::load(tempfile::tempdir().unwrap().path()),
        Err(IdentityError::CaMissing(_))
    ));
    // A second start reuses everything.
    let (ca2, node2) = bootstrap_local(dir.path(), DOMAIN, "solo").unwrap();
    assert_eq!(ca2.trust_bundle(), ca.trust_bundle());
    assert_eq!(node2.status(), node.status());
    assert!(bootstrap_local(dir.path(), "other.test", "solo").is_err());
    // Bundles serialise for the registry.
    let json = serde_json::to_string(&ca.trust_bundle()).unwrap();
    assert_eq!(
        serde_json::from_str::<TrustBundle>(&json).unwrap(),
        ca.trust_bundle()
    );
}

/// Test-only: always presents one certificate.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

/// A server that always presents one certificate.
#[derive(Debug)]
struct FixedServer(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedServer {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn a_restored_ca_issues_certificates_the_hosts_that_trusted_the_old_one_accept() {
    let (dir, ca) = new_ca();
    // host-b joined before the loss: it holds a certificate and the bundle of the old CA.
    let host_b = node_tls(&ca, "host-b");
    let backup = ca.backup().unwrap();
    assert_eq!(backup.format, CA_BACKUP_FORMAT);
    assert!(
        backup.files.keys().any(|f| f.ends_with(".key")),
        "{:?}",
        backup.files.keys()
    );
    // The CA's host is lost.
    drop(ca);
    std::fs::remove_dir_all(dir.path()).unwrap();

    let new_host = tempfile::tempdir().unwrap();
    let restored = CertificateAuthority::restore(new_host.path(), &backup).unwrap();
    let ca_dir = new_host.path().join(CA_DIR);
    for entry in std::fs::read_dir(&ca_dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        if name.ends_with(".key") {
            assert_eq!(mode, 0o600, "{name}");
        }
    }
    assert_eq!(
        std::fs::metadata(&ca_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // A certificate issued after the restore is trusted by host-b, and host-b's by it.
    let host_a = node_tls(&restored, "host-a");
    let r = dial(&host_a, &host_b).await;
    assert!(r.0.is_ok() && r.1.is_ok(), "{r:?}");
    let r = dial(&host_b, &host_a).await;
    assert!(r.0.is_ok() && r.1.is_ok(), "{r:?}");

    // Never over an existing CA, never a name that leaves the directory, never a damaged
    // key; a refused restore leaves nothing behind.
    assert!(matches!(
        CertificateAuthority::restore(new_host.path(), &backup),
        Err(IdentityError::CaExists(_))
    ));
    let other = tempfile::tempdir().unwrap();
    let mut escaping = backup.clone();
    escaping.files.insert("../evil".into(), "x".into());
    assert!(CertificateAuthority::restore(other.path(), &escaping).is_err());
    let mut damaged = backup.clone();
    let key = damaged
        .files
        .keys()
        .find(|k| k.ends_with(".key"))
        .unwrap()
        .clone();
    damaged
        .files
        .insert(key, KeyPair::generate().unwrap().serialize_pem());
    let e = CertificateAuthority::restore(other.path(), &damaged).unwrap_err();
    assert!(e.to_string().contains("do not match"), "{e}");
    assert_eq!(
        std::fs::read_dir(other.path()).unwrap().count(),
        0,
        "nothing left behind"
    );
}
