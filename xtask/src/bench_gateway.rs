//! The bench's two TLS-terminating rows: `gateway-https` (an agent's gateway listener, a
//! route, the mesh's HTTP path to the `.svc` backend) and `haproxy-https` (HAProxy
//! terminating TLS with the same certificate and key, forwarding HTTP to the same backend).
//!
//! Owns the run's test CA and server certificate (rcgen, made fresh in the run's work dir),
//! the gateway's agent and spec, HAProxy's TLS configuration, and the gateway's request
//! counter read from `/metrics`. Never measures anything itself (`bench` does, with the same
//! load generator as every other row), and never changes the shared backend or the other
//! scenarios' agents: the gateway gets an agent of its own, so its CPU is the gateway's.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bench_env::{
    self, Agent, AgentSpec, BenchCgroup, Bins, Place, Proc, SERVER_CORE, SERVICE,
};
use crate::{interrupt, tools};

/// The name both servers' certificate is for; the load generator sends it as SNI and Host.
pub const HOST: &str = "bench-gw.test";
/// The gateway spec's and its route's name (labels of `hms_gateway_requests_total`).
pub const GATEWAY: &str = "bench";

/// The run's certificate files: a CA, and a leaf for [`HOST`] it signed (ECDSA P-256).
pub struct Certs {
    /// The CA certificate the load generator trusts.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Leaf chain and key in one PEM, as HAProxy's `crt` wants it.
    pub combined: PathBuf,
}

impl Certs {
    pub fn make(dir: &Path) -> anyhow::Result<Certs> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_key = rcgen::KeyPair::generate().context("a CA key")?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "hms bench test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).context("the bench CA")?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().context("the server key")?;
        let cert = rcgen::CertificateParams::new(vec![HOST.to_owned()])?
            .signed_by(&key, &issuer)
            .context("the server certificate")?;
        let certs = Certs {
            ca: dir.join("bench-ca.pem"),
            cert: dir.join("bench-gw.pem"),
            key: dir.join("bench-gw.key"),
            combined: dir.join("bench-gw-haproxy.pem"),
        };
        let write = |path: &Path, text: &str| {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
        };
        write(&certs.ca, &ca_cert.pem())?;
        write(&certs.cert, &cert.pem())?;
        write(&certs.key, &key.serialize_pem())?;
        write(
            &certs.combined,
            &format!("{}{}", cert.pem(), key.serialize_pem()),
        )?;
        Ok(certs)
    }
}

/// An agent serving the bench's gateway spec, with `bench-svc` deployed on the shared
/// backend. Its own (empty) cgroup: nothing of the gateway row goes through eBPF hooks.
pub struct Gateway {
    pub agent: Agent,
    pub port: u16,
    _cgroup: BenchCgroup,
}

impl Gateway {
    pub fn start(
        bins: &Bins,
        work: &Path,
        sock_dir: &Path,
        certs: &Certs,
        backend: SocketAddr,
    ) -> anyhow::Result<Gateway> {
        let cgroup = BenchCgroup::create(&format!("hms-bench-{}-gw", std::process::id()))?;
        let agent = Agent::start(
            bins,
            AgentSpec {
                name: "gw",
                cgroup: &cgroup.path,
                netns: None,
                work,
                sock_dir,
                extra: vec!["--gateway".into(), "all".into()],
                inside_cgroup: false,
            },
        )?;
        agent.deploy(
            work,
            &format!(
                "name: {SERVICE}\nport: {}\npolicy: allow_from_any\n",
                backend.port()
            ),
        )?;
        let port = bench_env::free_port()?;
        let spec = work.join("gateway-bench.yaml");
        std::fs::write(
            &spec,
            format!(
                "\
name: {GATEWAY}
listeners:
  - name: web
    address: 127.0.0.1
    port: {port}
    protocol: https
    certificates: [{{cert: {cert}, key: {key}}}]
routes:
  - name: {GATEWAY}
    hostnames: [{HOST}]
    backends: [{{service: {SERVICE}}}]
",
                cert = certs.cert.display(),
                key = certs.key.display(),
            ),
        )
        .with_context(|| format!("writing {}", spec.display()))?;
        agent.ctl(&["gateway", "apply", &spec.display().to_string()])?;
        let gw = Gateway {
            agent,
            port,
            _cgroup: cgroup,
        };
        gw.wait_serving(certs)?;
        Ok(gw)
    }

    /// Bounded wait until the listener answers 200 through the route (the listener is
    /// bound and the service's instance is known), asked with curl, a client of its own.
    fn wait_serving(&self, certs: &Certs) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("https://{HOST}:{}/bench-ready", self.port);
        loop {
            interrupt::check()?;
            let out = tools::command("curl")
                .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
                .args(["--max-time", "5", "--cacert"])
                .arg(&certs.ca)
                .args(["--resolve", &format!("{HOST}:{}:127.0.0.1", self.port)])
                .arg(&url)
                .stdin(Stdio::null())
                .output()
                .context("running curl (`cargo xtask setup` installs it)")?;
            let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if code == "200" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the gateway did not answer {url} with 200 in 30 s (last: {code} {}):\n{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    self.agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The address the load generator dials (it sends [`HOST`] as SNI and Host).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `hms_gateway_requests_total` of the bench route with a 2xx answer, from `/metrics`.
    pub fn answered_2xx(&self) -> anyhow::Result<u64> {
        let text = bench_env::http_get(self.agent.metrics, "/metrics")
            .context("reading the gateway agent's /metrics")?;
        Ok(count_2xx(&text))
    }
}

/// Sum of the bench route's 2xx series of `hms_gateway_requests_total` in an exposition.
fn count_2xx(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("hms_gateway_requests_total{"))
        .filter(|l| {
            l.contains(&format!("gateway=\"{GATEWAY}\""))
                && l.contains(&format!("route=\"{GATEWAY}\""))
                && l.contains("status_class=\"2xx\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// HAProxy, one thread like the plain row, terminating TLS 1.3 only with the run's
/// certificate (ALPN http/1.1, as the gateway gives the load generator) and forwarding
/// plain HTTP to `backend` with the same marker header as the plain row.
pub fn start_haproxy_tls(
    work: &Path,
    listen: u16,
    backend: SocketAddr,
    certs: &Certs,
) -> anyhow::Result<Proc> {
    let haproxy = tools::path_of("haproxy");
    let cfg = work.join("haproxy-https.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    nbthread 1\n    maxconn 4096\n    \
             ssl-default-bind-options ssl-min-ver TLSv1.3\n\n\
             defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    \
             timeout server 60s\n    option http-keep-alive\n\n\
             frontend bench_https\n    bind 127.0.0.1:{listen} ssl crt {crt} alpn http/1.1\n    \
             http-request set-header x-bench-via haproxy\n    default_backend backend\n\n\
             backend backend\n    http-reuse always\n    server s1 {backend}\n",
            crt = certs.combined.display(),
        ),
    )
    .with_context(|| format!("writing {}", cfg.display()))?;
    let place = Place {
        core: Some(SERVER_CORE),
        ..Place::default()
    };
    let mut cmd = bench_env::command(&place, &haproxy)?;
    cmd.arg("-db").arg("-f").arg(&cfg);
    let mut p = Proc::spawn("haproxy (https)", cmd, &work.join("haproxy-https.log"))?;
    bench_env::wait_for_port(&mut p, SocketAddr::from((Ipv4Addr::LOCALHOST, listen)))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_the_bench_routes_2xx() {
        let text = "\
# TYPE hms_gateway_requests_total counter
hms_gateway_requests_total{gateway=\"bench\",listener=\"web\",route=\"bench\",status_class=\"2xx\",auth=\"none\"} 1200
hms_gateway_requests_total{gateway=\"bench\",listener=\"web\",route=\"bench\",status_class=\"5xx\",auth=\"none\"} 3
hms_gateway_requests_total{gateway=\"bench\",listener=\"web\",route=\"-\",status_class=\"4xx\",auth=\"none\"} 1
";
        assert_eq!(count_2xx(text), 1200);
        assert_eq!(count_2xx(""), 0);
    }

    #[test]
    fn makes_a_certificate_for_the_bench_host() {
        let dir = std::env::temp_dir().join(format!("hms-bench-certs-{}", std::process::id()));
        let certs = Certs::make(&dir).unwrap();
        for f in [&certs.ca, &certs.cert, &certs.key, &certs.combined] {
            assert!(std::fs::read_to_string(f).unwrap().contains("-----BEGIN"));
        }
        let combined = std::fs::read_to_string(&certs.combined).unwrap();
        assert!(combined.contains("CERTIFICATE") && combined.contains("PRIVATE KEY"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
