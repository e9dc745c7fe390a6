//! Egress: the one endpoint of an external service (`external: https://host:port` in its
//! spec) is the outside system. Owns resolving its host (a literal address, or an A query to
//! the agent's upstream resolver, cached for the answer's TTL), dialling it, and originating
//! TLS with the spec's options (system roots or a CA file, SNI, optional client
//! certificate, TLS 1.2 allowed unless the spec asks for 1.3). Everything else an external
//! call gets (policy, limits, routes, retries, breaker, taps) is the HTTP layer's, as for
//! any service: this module only supplies the byte stream.
//!
//! Must never dial anything but the declared host and port, never send the mesh's own
//! identity (node certificate) to an outside system, and never let TLS to the outside
//! weaken the mesh's own links (those configs live in `identity/tls.rs`, TLS 1.3 only).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use hms_ctl::spec::{ExternalScheme, ExternalSpec, TlsMinVersion};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use super::http::upstream::{CONNECT_TIMEOUT, UpstreamIo, Version};
use crate::dns::upstream::{Upstream, system_resolver};

/// Shortest and longest time a resolved address is kept, whatever the answer's TTL says.
const MIN_TTL: Duration = Duration::from_secs(5);
const MAX_TTL: Duration = Duration::from_secs(300);
/// Time a TLS handshake with the outside system may take (after the TCP connect).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the agent resolves outside host names: `--egress-resolver`, else the first
/// `nameserver` of /etc/resolv.conf. Queries carry the agent's mark (never captured).
#[derive(Debug)]
pub struct EgressResolver {
    server: RwLock<Option<SocketAddr>>,
    upstream: RwLock<Upstream>,
    cache: Mutex<HashMap<String, (Vec<Ipv4Addr>, Instant)>>,
}

impl Default for EgressResolver {
    fn default() -> Self {
        let server = std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|c| system_resolver(&c));
        EgressResolver {
            server: RwLock::new(server),
            upstream: RwLock::new(Upstream { mark: 0 }),
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl EgressResolver {
    /// The agent's settings: the resolver to ask (None: resolv.conf's) and its socket mark.
    pub fn configure(&self, server: Option<SocketAddr>, mark: u32) {
        if let Some(s) = server {
            *self.server.write().unwrap_or_else(|p| p.into_inner()) = Some(s);
        }
        *self.upstream.write().unwrap_or_else(|p| p.into_inner()) = Upstream { mark };
    }

    /// The IPv4 addresses of `host` (cached for the answer's TTL, within 5 s..5 min).
    pub async fn resolve(&self, host: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
        if let Some((addrs, until)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            && *until > Instant::now()
        {
            return Ok(addrs.clone());
        }
        let server = self
            .server
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no resolver for outside names: /etc/resolv.conf names none; start the agent with --egress-resolver IP:53, or write the address in the spec's URL"
                )
            })?;
        let upstream = *self.upstream.read().unwrap_or_else(|p| p.into_inner());
        let mut query = Message::new();
        query
            .set_id(rand::random())
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true);
        let name = Name::from_ascii(format!("{host}."))
            .with_context(|| format!("`{host}` is not a DNS name"))?;
        query.add_query(Query::query(name, RecordType::A));
        let bytes = query.to_vec().context("encoding the DNS query")?;
        let reply = upstream
            .forward_udp(server, &bytes, 4096)
            .await
            .with_context(|| format!("resolving {host} at {server}"))?;
        let reply = Message::from_vec(&reply).context("reading the resolver's answer")?;
        if reply.id() != query.id() {
            bail!("resolver {server} answered another query");
        }
        let mut ttl = MAX_TTL;
        let addrs: Vec<Ipv4Addr> = reply
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => {
                    ttl = ttl.min(Duration::from_secs(u64::from(r.ttl())));
                    Some(a.0)
                }
                _ => None,
            })
            .collect();
        if addrs.is_empty() {
            bail!(
                "resolver {server} has no IPv4 address for {host} ({}); check the name in the spec's `external:`",
                reply.response_code()
            );
        }
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
            host.to_string(),
            (addrs.clone(), Instant::now() + ttl.max(MIN_TTL)),
        );
        Ok(addrs)
    }
}

/// One external service's endpoint: its spec, its TLS configs (one per ALPN offer), and the
/// resolver. Built when the service's endpoints are (re)built; a TLS file that cannot be read
/// makes every connect fail with that reason (and the spec's next change rebuilds it).
pub struct ExternalTarget {
    pub service: String,
    pub spec: ExternalSpec,
    tls: Result<TlsConfigs, String>,
    resolver: Arc<EgressResolver>,
}

struct TlsConfigs {
    h1: Arc<ClientConfig>,
    h2: Arc<ClientConfig>,
    /// Opaque bytes over TLS (a client that does not speak HTTP): no ALPN.
    raw: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for ExternalTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "External({} -> {})", self.service, self.spec)
    }
}

// Two targets are the same endpoint when service and spec are (the pool keys by it).
impl PartialEq for ExternalTarget {
    fn eq(&self, other: &Self) -> bool {
        self.service == other.service && self.spec == other.spec
    }
}
impl Eq for ExternalTarget {}
impl std::hash::Hash for ExternalTarget {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.service.hash(state);
        self.spec.hash(state);
    }
}

impl ExternalTarget {
    pub fn new(service: &str, spec: &ExternalSpec, resolver: Arc<EgressResolver>) -> Self {
        let tls = match spec.scheme {
            ExternalScheme::Https => tls_configs(spec).map_err(|e| {
                let e = format!("{e:#}");
                tracing::warn!(service, "egress TLS settings unusable: {e}");
                e
            }),
            // Never used: no TLS for http:// and tcp://.
            _ => Err("no TLS for this scheme".into()),
        };
        ExternalTarget {
            service: service.to_string(),
            spec: spec.clone(),
            tls,
            resolver,
        }
    }

    /// What the endpoint table shows as its address: the literal IPv4 address, else
    /// 0.0.0.0 with the outside port (the name is resolved per connection).
    pub fn placeholder_addr(&self) -> SocketAddrV4 {
        let ip = match self.spec.literal_ip() {
            Some(IpAddr::V4(v4)) => v4,
            _ => Ipv4Addr::UNSPECIFIED,
        };
        SocketAddrV4::new(ip, self.spec.port)
    }

    /// `Host`/`:authority` and scheme the outside system expects, for HTTP requests: the
    /// URL's, for `https://` and `http://`; none for `tcp://` (bytes are the app's).
    pub fn rewrite(&self) -> Option<(&'static str, String)> {
        match self.spec.scheme {
            ExternalScheme::Https => Some(("https", self.spec.authority())),
            ExternalScheme::Http => Some(("http", self.spec.authority())),
            ExternalScheme::Tcp => None,
        }
    }

    /// A byte stream to the outside system: TCP, then TLS for `https://` offering the ALPN
    /// of `version` (none for opaque streams).
    pub async fn connect(&self, version: Option<Version>) -> Result<UpstreamIo, String> {
        let addrs: Vec<SocketAddr> = match self.spec.literal_ip() {
            Some(ip) => vec![SocketAddr::new(ip, self.spec.port)],
            None => self
                .resolver
                .resolve(&self.spec.host)
                .await
                .map_err(|e| format!("{e:#}"))?
                .into_iter()
                .map(|ip| SocketAddr::from((ip, self.spec.port)))
                .collect(),
        };
        let mut last = String::new();
        let mut tcp = None;
        for addr in &addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) => last = format!("connecting to {addr}: {e}"),
                Err(_) => last = format!("connecting to {addr} timed out"),
            }
        }
        let tcp = tcp.ok_or(last)?;
        let _ = tcp.set_nodelay(true);
        if self.spec.scheme != ExternalScheme::Https {
            return Ok(UpstreamIo::Tcp(tcp));
        }
        let tls = self.tls.as_ref().map_err(Clone::clone)?;
        let config = match version {
            Some(Version::Http1) => tls.h1.clone(),
            Some(Version::Http2) => tls.h2.clone(),
            None => tls.raw.clone(),
        };
        let connector = tokio_rustls::TlsConnector::from(config);
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            connector.connect(tls.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| format!("TLS handshake with {} timed out", self.spec))?
        .map_err(|e| format!("TLS handshake with {} failed: {e}", self.spec))?;
        Ok(UpstreamIo::Tls(Box::new(stream)))
    }
}

/// The client configs of one `https://` external: roots, client certificate, versions.
fn tls_configs(spec: &ExternalSpec) -> anyhow::Result<TlsConfigs> {
    let opts = spec.tls.clone().unwrap_or_default();
    let mut roots = rustls::RootCertStore::empty();
    match &opts.ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading tls.ca_file {path}"))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("tls.ca_file {path} is not PEM certificates"))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                bail!("tls.ca_file {path} holds no usable CA certificate");
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!(
                    "no system roots found (install ca-certificates) and the spec names no tls.ca_file"
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = match opts.min_version {
        TlsMinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsMinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .context("TLS versions")?
        .with_root_certificates(roots);
    let base = match (&opts.client_cert, &opts.client_key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading tls.client_cert {cert}"))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("tls.client_cert {cert} is not PEM certificates"))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading the private key tls.client_key {key}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("tls.client_cert and tls.client_key do not make a usable pair")?
        }
        _ => builder.with_no_client_auth(),
    };
    let with_alpn = |alpn: &[&[u8]]| {
        let mut c = base.clone();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    };
    let name = spec.server_name().to_string();
    let server_name = ServerName::try_from(name.clone())
        .with_context(|| format!("`{name}` cannot be a TLS server name"))?;
    Ok(TlsConfigs {
        h1: with_alpn(&[b"http/1.1"]),
        h2: with_alpn(&[b"h2"]),
        raw: with_alpn(&[]),
        server_name,
    })
}

/// How often the declared external addresses are looked at again besides registry changes
/// (names resolve to new addresses as their TTL runs out).
const DECLARED_REFRESH: Duration = Duration::from_secs(5);

/// The addresses of every declared external service in `snapshot`: literal ones as
/// written, names as the resolver answers them now (a name that does not resolve adds
/// nothing, and is logged once per distinct error).
pub async fn declared_addresses(
    snapshot: &crate::registry::Snapshot,
    resolver: &EgressResolver,
    last_errors: &mut HashMap<String, String>,
) -> std::collections::BTreeSet<IpAddr> {
    let mut out = std::collections::BTreeSet::new();
    // Only the external ones: this runs on every registry change.
    for svc in snapshot.external_services() {
        let Some(ext) = &svc.spec.external else {
            continue;
        };
        if let Some(ip) = ext.literal_ip() {
            out.insert(ip);
            continue;
        }
        match resolver.resolve(&ext.host).await {
            Ok(addrs) => {
                last_errors.remove(&ext.host);
                out.extend(addrs.into_iter().map(IpAddr::V4));
            }
            Err(e) => {
                let e = format!("{e:#}");
                if last_errors.get(&ext.host) != Some(&e) {
                    tracing::warn!(service = %svc.spec.name, host = %ext.host, "cannot resolve an external service's host for the kernel's declared set: {e}");
                    last_errors.insert(ext.host.clone(), e);
                }
            }
        }
    }
    out
}

/// Keeps the kernel's set of declared external addresses current (`apply` writes it):
/// at start, on every registry change and every few seconds, until the agent drains.
pub async fn keep_declared_set(
    store: Arc<dyn crate::registry::Store>,
    resolver: Arc<EgressResolver>,
    apply: impl Fn(&std::collections::BTreeSet<IpAddr>),
    drain: crate::drain::Drain,
) {
    let mut changes = store.subscribe();
    let mut last_errors = HashMap::new();
    let mut applied = None;
    loop {
        let snapshot = store.snapshot();
        let declared = declared_addresses(&snapshot, &resolver, &mut last_errors).await;
        if applied.as_ref() != Some(&declared) {
            apply(&declared);
            tracing::debug!(addresses = ?declared, "declared external addresses");
            applied = Some(declared);
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(DECLARED_REFRESH) => {}
            _ = drain.signaled() => return,
        }
    }
}
