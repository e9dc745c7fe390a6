//! The transport's user stories over real loopback TLS: certificates from a real test CA
//! (the identity module's), a real echo "instance", the real inbound server and pool.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, CertificateSigningRequestParams, KeyPair};
use rustls::ClientConfig;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::*;
use crate::drain::{self, DrainTrigger};
use crate::identity::testing::AcceptAnyServer;
use crate::identity::{ALPN_H2, CertificateAuthority, TlsIdentity};

const DOMAIN: &str = "mesh.test";
const DAY: Duration = Duration::from_secs(24 * 3600);
/// Generous bound for anything that should happen at once on loopback.
const SOON: Duration = Duration::from_secs(10);

/// A certificate and key in the forms rustls wants.
struct Issued {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Issued {
    fn certified_key(&self) -> Arc<CertifiedKey> {
        let provider = rustls::crypto::ring::default_provider();
        Arc::new(
            CertifiedKey::from_der(self.chain.clone(), self.key.clone_key(), &provider).unwrap(),
        )
    }
}

/// A test mesh: a CA in a temporary directory.
struct Mesh {
    _dir: tempfile::TempDir,
    ca: CertificateAuthority,
}

impl Mesh {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path(), DOMAIN).unwrap();
        Self { _dir: dir, ca }
    }

    /// A certificate naming any `id` (the CA's public API only issues node IDs).
    fn issue(&self, id: &SpiffeId) -> Issued {
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let public_key = CertificateSigningRequestParams::from_pem(&csr)
            .unwrap()
            .public_key;
        let issued = self
            .ca
            .issue(public_key, id, SystemTime::now(), DAY)
            .unwrap();
        Issued {
            chain: CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap(),
            key: PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        }
    }

    fn node(&self, name: &str) -> TlsIdentity {
        let id = SpiffeId::node(DOMAIN, name).unwrap();
        let cert = self.issue(&id).certified_key();
        TlsIdentity::new(id, cert, &self.ca.trust_bundle()).unwrap()
    }
}

/// An instance that echoes everything and closes its side after the caller closed theirs.
async fn echo_instance() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A loopback address nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// The agent's policy as these tests need it.
struct TestPolicy {
    echo: SocketAddr,
    down: SocketAddr,
    flows: Mutex<Vec<InboundFlow>>,
}

impl TestPolicy {
    async fn new() -> Arc<Self> {
        Arc::new(Self {
            echo: echo_instance().await,
            down: closed_port().await,
            flows: Mutex::new(Vec::new()),
        })
    }

    async fn wait_for_flows(&self, n: usize) -> Vec<InboundFlow> {
        tokio::time::timeout(SOON, async {
            loop {
                let flows = self.flows.lock().unwrap().clone();
                if flows.len() >= n {
                    return flows;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("flows were reported")
    }
}

impl InboundPolicy for TestPolicy {
    async fn authorize(&self, r: &InboundRequest) -> Result<SocketAddr, Refusal> {
        match r.target.service.as_str() {
            "echo" => Ok(self.echo),
            "payroll" if r.caller == "payments" => Ok(self.echo),
            "payroll" => Err(Refusal::DENIED),
            "limited" => Err(Refusal::rate_limited(Duration::from_millis(1500))),
            "down" => Ok(self.down),
            "elsewhere" => Ok("192.0.2.1:80".parse().unwrap()),
            _ => Err(Refusal::NO_ENDPOINT),
        }
    }

    fn on_flow(&self, flow: &InboundFlow) {
        self.flows.lock().unwrap().push(flow.clone());
    }
}

struct Server {
    addr: SocketAddr,
    inbound: Arc<InboundServer<TestPolicy>>,
    trigger: DrainTrigger,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start_server(
    tls: &TlsIdentity,
    policy: Arc<TestPolicy>,
    at: Option<SocketAddr>,
) -> Server {
    let listener = TcpListener::bind(at.unwrap_or("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let inbound = InboundServer::new(tls, policy).unwrap();
    let (trigger, drain) = drain::channel();
    let task = tokio::spawn(inbound.clone().serve(listener, drain));
    Server {
        addr,
        inbound,
        trigger,
        task,
    }
}

fn echo() -> TunnelTarget {
    TunnelTarget::new("echo", 7000).unwrap()
}

/// Writes `data`, half-closes, reads everything back.
async fn exchange(stream: &mut TunnelStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::time::timeout(SOON, async { tokio::join!(write, read) })
        .await
        .expect("the echo finished");
    back
}

/// A hand-made client presenting `cert` (or none).
fn raw_client(cert: Option<&Issued>) -> Arc<ClientConfig> {
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let mut config = match cert {
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// TLS, HTTP/2, one request; the status the server answered, or why there was none.
async fn raw_request(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    method: Method,
    authority: &str,
    caller: Option<&str>,
) -> Result<StatusCode, String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("peer.invalid").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(conn);
        let mut req = Request::builder().method(method);
        req = if authority.is_empty() {
            req.uri("https://echo/")
        } else {
            req.uri(authority)
        };
        if let Some(c) = caller {
            req = req.header(CALLER_HEADER, c);
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .map_err(|e| format!("request: {e}"))?;
        Ok(resp.status())
    };
    tokio::time::timeout(SOON, attempt)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[tokio::test]
async fn a_tunnel_stream_carries_bytes_both_ways_with_half_close() {
    let mesh = Mesh::new();
    let (server_tls, client_tls) = (mesh.node("b"), mesh.node("a"));
    let policy = TestPolicy::new().await;
    let server = start_server(&server_tls, policy.clone(), None).await;
    let pool = PeerPool::new(client_tls.clone());

    let mut stream = pool
        .open(server.addr, server_tls.spiffe_id(), &echo(), "payments")
        .await
        .unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    // The echo instance answers only what it got before our half-close, then closes.
    assert_eq!(exchange(&mut stream, &data).await, data);
    drop(stream);

    let flows = policy.wait_for_flows(1).await;
    let flow = &flows[0];
    assert_eq!(flow.request.caller, "payments");
    assert_eq!(&flow.request.peer_node, client_tls.spiffe_id());
    assert_eq!(flow.request.target, echo());
    match &flow.outcome {
        FlowOutcome::Spliced {
            instance,
            to_instance,
            from_instance,
            error,
        } => {
            assert_eq!(*instance, policy.echo);
            assert_eq!((*to_instance, *from_instance), (200_000, 200_000));
            assert_eq!(error, &None);
        }
        other => panic!("expected a spliced flow, got {other:?}"),
    }
    let peers = pool.peer_status();
    assert_eq!(peers.len(), 1);
    assert!(peers[0].connected);
    assert_eq!(&peers[0].node, server_tls.spiffe_id());
    assert_eq!(peers[0].streams_opened, 1);
    let expiry = peers[0]
        .cert_not_after
        .expect("the peer's certificate expiry");
    assert!(expiry > SystemTime::now() + DAY / 2);
}

#[tokio::test]
async fn a_hundred_concurrent_streams_share_one_tls_connection() {
    let mesh = Mesh::new();
    let (server_tls, client_tls) = (mesh.node("b"), mesh.node("a"));
    let policy = TestPolicy::new().await;
    let server = start_server(&server_tls, policy.clone(), None).await;
    let pool = Arc::new(PeerPool::new(client_tls));
    let all_open = Arc::new(tokio::sync::Barrier::new(100));

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100u32 {
        let (pool, all_open, node) = (
            pool.clone(),
            all_open.clone(),
            server_tls.spiffe_id().clone(),
        );
        let addr = server.addr;
        tasks.spawn(async move {
            let mut stream = pool.open(addr, &node, &echo(), "host").await.unwrap();
            // Every stream is open at once before any finishes.
            all_open.wait().await;
            let data = format!("stream {i} ").repeat(1000).into_bytes();
            assert_eq!(exchange(&mut stream, &data).await, data);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }

    let peers = pool.peer_status();
    assert_eq!(peers[0].connections_opened, 1, "{peers:?}");
    assert_eq!(peers[0].streams_opened, 100);
    let counters = server.inbound.counters();
    assert_eq!(counters.connections_accepted, 1, "{counters:?}");
    assert_eq!(counters.streams_spliced, 100);
}

#[tokio::test]
async fn policy_refusals_reach_the_caller_with_status_reason_and_retry_after() {
    let mesh = Mesh::new();
    let (server_tls, client_tls) = (mesh.node("b"), mesh.node("a"));
    let policy = TestPolicy::new().await;
    let server = start_server(&server_tls, policy.clone(), None).await;
    let pool = PeerPool::new(client_tls);
    let open = |service: &str, caller: &str| {
        let target = TunnelTarget::new(service, 7000).unwrap();
        let caller = caller.to_owned();
        let pool = &pool;
        let (addr, node) = (server.addr, server_tls.spiffe_id().clone());
        async move { pool.open(addr, &node, &target, &caller).await }
    };
    let refused = |r: Result<TunnelStream, TunnelError>| match r {
        Err(TunnelError::Refused {
            status,
            reason,
            retry_after,
            ..
        }) => (status, reason, retry_after),
        other => panic!("expected a refusal, got {other:?}"),
    };

    // Policy: only payments may call payroll.
    assert_eq!(
        refused(open("payroll", "host").await),
        (403, "denied".into(), None)
    );
    let mut allowed = open("payroll", "payments").await.unwrap();
    assert_eq!(exchange(&mut allowed, b"salary").await, b"salary");
    assert_eq!(
        refused(open("limited", "payments").await),
        (429, "rate-limited".into(), Some(Duration::from_secs(2)))
    );
    assert_eq!(
        refused(open("unknown", "payments").await),
        (503, "no-endpoint".into(), None)
    );
    assert_eq!(
        refused(open("down", "payments").await),
        (502, "connect-failed".into(), None)
    );
    // The policy may only point at this host: the listener is not a relay.
    assert_eq!(
        refused(open("elsewhere", "payments").await),
        (502, "connect-failed".into(), None)
    );

    // Refusals are answers, not failures: the one connection stayed up throughout.
    let peers = pool.peer_status();
    assert_eq!(peers[0].connections_opened, 1);
    assert_eq!(peers[0].last_error, None);
    let flows = policy.wait_for_flows(6).await;
    let refusals: Vec<_> = flows
        .iter()
        .filter_map(|f| match f.outcome {
            FlowOutcome::Refused(r) => Some((f.request.target.service.as_str(), r.status)),
            _ => None,
        })
        .collect();
    assert_eq!(
        refusals,
        [
            ("payroll", 403),
            ("limited", 429),
            ("unknown", 503),
            ("down", 502),
            ("elsewhere", 502)
        ]
    );
    assert_eq!(server.inbound.counters().streams_refused, 5);
}

#[tokio::test]
async fn peers_without_a_valid_node_certificate_are_refused() {
    let mesh = Mesh::new();
    let server_tls = mesh.node("b");
    let policy = TestPolicy::new().await;
    let server = start_server(&server_tls, policy.clone(), None).await;
    let connect = |config| {
        raw_request(
            server.addr,
            config,
            Method::CONNECT,
            "echo:7000",
            Some("host"),
        )
    };

    // Control: the hand-made client gets through with a proper node certificate.
    let good = mesh.issue(&SpiffeId::node(DOMAIN, "a").unwrap());
    assert_eq!(connect(raw_client(Some(&good))).await, Ok(StatusCode::OK));
    let accepted_before = server.inbound.counters().handshakes_refused;

    // No certificate at all.
    assert!(connect(raw_client(None)).await.is_err());
    // A node certificate from another mesh's CA.
    let other_mesh = Mesh::new();
    let foreign = other_mesh.issue(&SpiffeId::node(DOMAIN, "a").unwrap());
    assert!(connect(raw_client(Some(&foreign))).await.is_err());
    // Our CA, but not a node identity.
    let workload = mesh.issue(&"spiffe://mesh.test/workload/x".parse().unwrap());
    assert!(connect(raw_client(Some(&workload))).await.is_err());
    // Our CA, but another trust domain.
    let stranger = mesh.issue(&SpiffeId::node("other.test", "a").unwrap());
    assert!(connect(raw_client(Some(&stranger))).await.is_err());

    let counters = server.inbound.counters();
    assert_eq!(
        counters.handshakes_refused - accepted_before,
        4,
        "{counters:?}"
    );
    assert_eq!(counters.streams_spliced, 1);

    // The pool refuses a server that is not the node it meant to reach.
    let pool = PeerPool::new(mesh.node("a"));
    let impostor_check = pool
        .open(
            server.addr,
            &SpiffeId::node(DOMAIN, "c").unwrap(),
            &echo(),
            "host",
        )
        .await;
    match impostor_check {
        Err(TunnelError::Handshake { reason, .. }) => {
            assert!(
                reason.contains("expected spiffe://mesh.test/node/c"),
                "{reason}"
            )
        }
        other => panic!("expected a handshake failure, got {other:?}"),
    }
    // And a pool of another mesh cannot reach it at all.
    let foreign_pool = PeerPool::new(other_mesh.node("a"));
    assert!(matches!(
        foreign_pool
            .open(server.addr, server_tls.spiffe_id(), &echo(), "host")
            .await,
        Err(TunnelError::Handshake { .. })
    ));
    let status = foreign_pool.peer_status();
    assert!(!status[0].connected);
    assert!(status[0].last_error.is_some());
}

#[tokio::test]
async fn garbage_and_plain_http_are_closed_without_affecting_other_streams() {
    let mesh = Mesh::new();
    let (server_tls, client_tls) = (mesh.node("b"), mesh.node("a"));
    let policy = TestPolicy::new().await;
    let server = start_server(&server_tls, policy.clone(), None).await;
    let pool = PeerPool::new(client_tls);
    let mut busy = pool
        .open(server.addr, server_tls.spiffe_id(), &echo(), "host")
        .await
        .unwrap();
    busy.write_all(b"before ").await.unwrap();

    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let inputs: [&[u8]; 4] = [
        &garbage,
        b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        // A TLS record header announcing a huge ClientHello that never comes in full.
        b"\x16\x03\x01\xff\xff\x01\x00\xff\xfb\x03\x03",
    ];
    for (i, input) in inputs.iter().enumerate() {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let _ = s.write_all(input).await;
        if i == 3 {
            let _ = s.shutdown().await;
        }
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(SOON, s.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "input {i} was not closed");
    }

    // Authenticated, but not a proper CONNECT.
    let node_cert = mesh.issue(&SpiffeId::node(DOMAIN, "a").unwrap());
    let ask = |method, authority: &'static str, caller| {
        raw_request(
            server.addr,
            raw_client(Some(&node_cert)),
            method,
            authority,
            caller,
        )
    };
    assert_eq!(
        ask(Method::GET, "", Some("host")).await,
        Ok(StatusCode::METHOD_NOT_ALLOWED)
    );
    assert_eq!(
        ask(Method::CONNECT, "echo:7000", None).await,
        Ok(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        ask(Method::CONNECT, "echo:7000", Some("Not A Label")).await,
        Ok(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        ask(Method::CONNECT, "echo:0", Some("host")).await,
        Ok(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        ask(Method::CONNECT, "ECHO:7000", Some("host")).await,
        Ok(StatusCode::BAD_REQUEST)
    );

    // The stream opened before all that still works, and so does a new one.
    busy.write_all(b"and after").await.unwrap();
    busy.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(SOON, busy.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"before and after");
    let mut fresh = pool
        .open(server.addr, server_tls.spiffe_id(), &echo(), "host")
        .await
        .unwrap();
    assert_eq!(exchange(&mut fresh, b"still here").await, b"still here");
    assert_eq!(pool.peer_status()[0].connections_opened, 1);
}

#[tokio::test]
async fn silent_and_stalled_handshakes_are_cut_off_at_the_timeout() {
    let mesh = Mesh::new();
    let (server_tls, client_tls) = (mesh.node("b"), mesh.node("a"));
    let policy = TestPolicy::new().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let inbound =
        InboundServer::with_handshake_timeout(&server_tls, policy, Duration::from_millis(300))
            .unwrap();
    let (_trigger, drain) = drain::channel();
    tokio::spawn(inbound.clone().serve(listener, drain));

    let pool = PeerPool::new(client_tls);
    let mut busy = pool
        .open(addr, server_tls.spiffe_id(), &echo(), "host")
        .await
        .unwrap();
    // One client says nothing; another starts a ClientHello and stalls.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"\x16\x03\x01\x02\x00\x01")
        .await
        .unwrap();
    for s in [&mut silent, &mut stalled] {
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(SOON, s.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "the server closed the connection");
    }
    assert_eq!(inbound.counters().handshakes_refused, 2);
    // Established connections are not subject to the handshake timeout.
    assert_eq!(exchange(&mut busy, b"unaffected").await, b"unaffected");
}

#[tokio::test]
async fn the_pool_reconnects_after_the_peer_restarts() {
    let mesh = Mesh::new();
    let (server_tls, client_tls) = (mesh.node("b"), mesh.node("a"));
    let policy = TestPolicy::new().await;
    let pool = PeerPool::new(client_tls);
    let node = server_tls.spiffe_id().clone();

    let first = start_server(&server_tls, policy.clone(), None).await;
    let addr = first.addr;
    let mut s = pool.open(addr, &node, &echo(), "host").await.unwrap();
    assert_eq!(exchange(&mut s, b"one").await, b"one");
    drop(s);

    // A crash: the server and every connection it had vanish at once.
    first.task.abort();
    let _ = first.task.await;
    let second = start_server(&server_tls, policy.clone(), Some(addr)).await;
    let mut s = pool.open(addr, &node, &echo(), "host").await.unwrap();
    assert_eq!(exchange(&mut s, b"two").await, b"two");
    drop(s);
    assert_eq!(pool.peer_status()[0].connections_opened, 2);

    // A graceful restart: drain (GOAWAY on the open connection), then a new server.
    let mut in_flight = pool.open(addr, &node, &echo(), "host").await.unwrap();
    let drained = tokio::spawn(second.trigger.drain(SOON));
    // The drain waits for the stream in flight, which keeps working.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(exchange(&mut in_flight, b"in flight").await, b"in flight");
    drop(in_flight);
    assert_eq!(drained.await.unwrap(), 0, "every connection finished");
    second.task.await.unwrap().unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a drained server accepts nothing"
    );

    let _third = start_server(&server_tls, policy.clone(), Some(addr)).await;
    let mut s = pool.open(addr, &node, &echo(), "host").await.unwrap();
    assert_eq!(exchange(&mut s, b"three").await, b"three");
    let peers = pool.peer_status();
    assert_eq!(peers[0].connections_opened, 3);
    assert_eq!(peers[0].connections, 1);
}

#[test]
fn targets_and_callers_are_validated_both_ways() {
    let t = TunnelTarget::parse_authority("payments-svc:7000").unwrap();
    assert_eq!(t, TunnelTarget::new("payments-svc", 7000).unwrap());
    assert_eq!(t.authority(), "payments-svc:7000");
    for bad in [
        "payments-svc",
        "payments-svc:",
        ":7000",
        "a:70000",
        "a:0",
        "-a:1",
        "a.b:1",
        "A:1",
    ] {
        assert!(TunnelTarget::parse_authority(bad).is_err(), "{bad}");
    }
    assert!(validate_caller("host").is_ok());
    assert!(validate_caller("payments-svc").is_ok());
    for bad in ["", "Host", "a b", "-x", "x".repeat(64).as_str()] {
        assert!(validate_caller(bad).is_err(), "{bad:?}");
    }
    assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
    assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
}

#[tokio::test]
async fn a_broken_tunnel_connection_counts_once_and_a_drained_one_not_at_all() {
    let mesh = Mesh::new();
    let (server_tls, client_tls) = (mesh.node("b"), mesh.node("a"));
    let policy = TestPolicy::new().await;
    let pool = PeerPool::new(client_tls);
    let node = server_tls.spiffe_id().clone();

    // Three streams on one connection; then the peer crashes under them.
    let first = start_server(&server_tls, policy.clone(), None).await;
    let addr = first.addr;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(pool.open(addr, &node, &echo(), "host").await.unwrap());
    }
    let links: Vec<_> = streams.iter().map(|s| s.link()).collect();
    assert!(
        links.iter().all(|l| Arc::ptr_eq(l, &links[0])),
        "one connection"
    );
    assert_eq!(links[0].settle(Duration::ZERO).await, LinkFate::Open);
    first.task.abort();
    let _ = first.task.await;
    for link in &links {
        assert_eq!(link.settle(SOON).await, LinkFate::Broken);
    }
    let charges: Vec<bool> = links.iter().map(|l| l.charge()).collect();
    assert_eq!(charges, [true, false, false], "the break counts once");
    drop(streams);

    // A drain: GOAWAY, the stream in flight finishes, the connection closes cleanly.
    let second = start_server(&server_tls, policy.clone(), Some(addr)).await;
    let mut in_flight = pool.open(addr, &node, &echo(), "host").await.unwrap();
    let link = in_flight.link();
    let drained = tokio::spawn(second.trigger.drain(SOON));
    assert_eq!(exchange(&mut in_flight, b"in flight").await, b"in flight");
    drop(in_flight);
    assert_eq!(drained.await.unwrap(), 0);
    assert_eq!(
        link.settle(SOON).await,
        LinkFate::Drained,
        "a drain is no failure"
    );
}

#[tokio::test]
async fn peers_that_left_are_forgotten() {
    let mesh = Mesh::new();
    let (server_tls, client_tls) = (mesh.node("b"), mesh.node("a"));
    let policy = TestPolicy::new().await;
    let pool = PeerPool::new(client_tls);
    let node = server_tls.spiffe_id().clone();
    let server = start_server(&server_tls, policy.clone(), None).await;
    let mut s = pool
        .open(server.addr, &node, &echo(), "host")
        .await
        .unwrap();
    assert_eq!(exchange(&mut s, b"hi").await, b"hi");
    drop(s);
    assert_eq!(pool.retain_peers(|a, n| a == server.addr && n == &node), 0);
    assert_eq!(pool.peer_status().len(), 1);
    assert_eq!(pool.retain_peers(|_, _| false), 1, "its record is gone");
    assert!(pool.peer_status().is_empty());
}

#[tokio::test]
async fn an_opaque_stream_that_opens_with_http_is_cut_and_a_declared_one_is_relayed() {
    let mesh = Mesh::new();
    let (server_tls, client_tls) = (mesh.node("b"), mesh.node("a"));
    let policy = TestPolicy::new().await;
    let server = start_server(&server_tls, policy.clone(), None).await;
    let pool = PeerPool::new(client_tls.clone());
    let request = b"GET /pay HTTP/1.1\r\nhost: payments\r\n\r\n".to_vec();

    // Undeclared HTTP: nothing reaches the instance, the stream ends without an echo.
    let mut stream = pool
        .open(server.addr, server_tls.spiffe_id(), &echo(), "payments")
        .await
        .unwrap();
    stream.write_all(&request).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(SOON, stream.read_to_end(&mut got))
        .await
        .expect("the stream ended");
    assert!(got.is_empty(), "the instance answered: {got:?}");
    let flows = policy.wait_for_flows(1).await;
    match &flows[0].outcome {
        FlowOutcome::Spliced {
            to_instance, error, ..
        } => {
            assert_eq!(*to_instance, 0, "no byte reached the instance");
            assert!(
                error
                    .as_deref()
                    .is_some_and(|e| e.contains("not declared HTTP")),
                "{error:?}"
            );
        }
        other => panic!("expected a cut flow, got {other:?}"),
    }

    // Empty lines first (HTTP/1 servers skip them) do not hide the request.
    let mut stream = pool
        .open(server.addr, server_tls.spiffe_id(), &echo(), "payments")
        .await
        .unwrap();
    stream.write_all(b"\r\n\r\n").await.unwrap();
    stream.write_all(&request).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(SOON, stream.read_to_end(&mut got))
        .await
        .expect("the stream ended");
    assert!(got.is_empty(), "the instance answered: {got:?}");
    let flows = policy.wait_for_flows(2).await;
    assert!(
        matches!(&flows[1].outcome, FlowOutcome::Spliced { to_instance: 0, error: Some(e), .. } if e.contains("not declared HTTP")),
        "{:?}",
        flows[1].outcome
    );

    // Declared HTTP/1.1: the policy's relay carries it (the test policy keeps the default
    // splice); the protocol reaches the policy.
    let mut stream = pool
        .open_as(
            server.addr,
            server_tls.spiffe_id(),
            &echo(),
            "payments",
            StreamProtocol::Http1,
        )
        .await
        .unwrap();
    assert_eq!(exchange(&mut stream, &request).await, request);
    drop(stream);
    let flows = policy.wait_for_flows(3).await;
    assert_eq!(flows[2].request.protocol, StreamProtocol::Http1);
    assert_eq!(flows[0].request.protocol, StreamProtocol::Opaque);
}
