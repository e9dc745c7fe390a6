//! A three-host mesh for tests, set up as the README tells an operator to: network namespaces
//! on one bridge (`netns`); on host A `hms-node-agent init-mesh` makes the CA and etcd's
//! certificates, then a real etcd runs with TLS and client certificates required, and A's
//! agent (etcd's `root`, the operator) turns on etcd's access control; B and C join with
//! tokens from A written to files. Services are placed (`hms-ctl place` on A) before a host
//! deploys them.
//! Plus a recording HTTP backend that runs inside a host's namespace and a raw packet
//! capture of a host's link.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::agent::TestAgent;
use crate::cgroup::TestCgroup;
use crate::etcd::Etcd;
use crate::netns::TestNet;

pub const TRUST_DOMAIN: &str = "test.mesh";
pub const NAMES: [&str; 3] = ["host-a", "host-b", "host-c"];

/// A backend inside a host's namespace: answers `<name> on <host> saw <METHOD> <path>` and
/// appends every request (with its body) to a log file, so tests see what arrived.
pub const BACKEND: &str = r#"
import http.server, sys
name, host, port, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def handle_one(self):
        n = int(self.headers.get('content-length') or 0)
        body = self.rfile.read(n) if n else b''
        with open(log, 'ab') as f:
            f.write(('%s %s ' % (self.command, self.path)).encode() + body + b'\n')
        out = ('%s on %s saw %s %s\n' % (name, host, self.command, self.path)).encode()
        self.send_response(200)
        self.send_header('content-length', str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = handle_one
    do_POST = handle_one
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(('127.0.0.1', port), H).serve_forever()
"#;

pub struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    pub fn start(
        net: &TestNet,
        host: usize,
        name: &str,
        port: u16,
        dir: &std::path::Path,
    ) -> Backend {
        let log = dir.join(format!("{name}-{}.log", NAMES[host]));
        std::fs::write(&log, b"").unwrap();
        let child = net.hosts[host]
            .command("python3")
            .args(["-c", BACKEND, name, NAMES[host], &port.to_string()])
            .arg(&log)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3");
        Backend { child, log }
    }

    pub fn seen(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Mesh {
    pub agents: Vec<TestAgent>,
    /// What `hms-ctl place` on A was last told, per service (so `deploy` adds a host).
    placed: std::sync::Mutex<std::collections::BTreeMap<String, Vec<String>>>,
    pub cgs: Vec<TestCgroup>,
    pub etcd: Etcd,
    pub net: TestNet,
    pub dir: tempfile::TempDir,
}

impl Mesh {
    /// A, then `ca init` on A, then B and C joining with tokens made on A.
    // No `Default`: building a mesh starts namespaces, etcd and three agents.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Mesh {
        Self::on(TestNet::new(3).expect("test network"), &|_| Vec::new())
    }

    /// Like [`Mesh::new`], with more agent flags for host `i` (`--gateway all`).
    pub fn with_args(extra: &dyn Fn(usize) -> Vec<String>) -> Mesh {
        Self::on(TestNet::new(3).expect("test network"), extra)
    }

    /// The same mesh on links that carry IPv6 only (etcd, :15008 and the tunnels over IPv6).
    pub fn ipv6_only() -> Mesh {
        Self::on(
            TestNet::ipv6_only(3).expect("IPv6-only test network"),
            &|_| Vec::new(),
        )
    }

    fn on(net: TestNet, extra: &dyn Fn(usize) -> Vec<String>) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let mut cgs = Vec::new();
        let mut agents: Vec<TestAgent> = Vec::new();
        let mut etcd: Option<Etcd> = None;
        let mut registry = String::new();
        for (i, name) in NAMES.iter().enumerate() {
            let cg = TestCgroup::new(&format!("mh-{name}")).unwrap();
            let mut args = vec![
                "--inbound".to_string(),
                std::net::SocketAddr::new(net.hosts[i].addr, 15008).to_string(),
                "--node-name".into(),
                name.to_string(),
            ];
            args.extend(extra(i));
            if i > 0 {
                let token = dir.path().join(format!("{name}.token"));
                let out = agents[0].ctl(&[
                    "node",
                    "token",
                    "create",
                    "--node",
                    name,
                    "--out",
                    token.to_str().unwrap(),
                ]);
                assert!(out.status.success(), "{}", text(&out));
                args.extend(["--join-token-file".into(), token.display().to_string()]);
            }
            let mut agent = TestAgent::unstarted(cg.path(), Some(&net.hosts[i].netns), args)
                .unwrap_or_else(|e| panic!("agent on {name}: {e:#}"));
            if i == 0 {
                // The first host: CA and etcd certificates, then etcd, as the README says.
                let state = agent.state_dir();
                let out = init_mesh(&state, net.hosts[0].addr, name);
                assert!(out.status.success(), "init-mesh: {}", text(&out));
                let e = Etcd::start_tls_in(
                    &net.hosts[0].netns,
                    net.hosts[0].addr,
                    crate::etcd::EtcdTls {
                        server_dir: state.join("etcd-server"),
                        client_dir: state.join("etcd"),
                    },
                )
                .expect("etcd with TLS");
                registry = format!("etcds://{}", e.endpoint());
                etcd = Some(e);
            }
            agent
                .extra_args
                .extend(["--registry".into(), registry.clone()]);
            agent
                .launch()
                .unwrap_or_else(|e| panic!("agent on {name}: {e:#}"));
            agents.push(agent);
            cgs.push(cg);
        }
        let etcd = etcd.expect("started with host A");
        let mesh = Mesh {
            agents,
            placed: Default::default(),
            cgs,
            etcd,
            net,
            dir,
        };
        // Every host has its certificate and sees the other two.
        let deadline = Instant::now() + Duration::from_secs(20);
        for a in &mesh.agents {
            loop {
                let s = a.ctl_json(&["status"]).unwrap();
                let peers = s["peers"].as_array().cloned().unwrap_or_default();
                if s["identity"]["spiffe_id"].is_string()
                    && peers.len() == 2
                    && peers.iter().all(|p| p["tunnel"] != "no identity yet")
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "host not ready: {s}\n{}",
                    a.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        mesh
    }

    /// Program `name` (from the tool list) as an unmodified client inside host `i`'s cgroup
    /// and namespace.
    pub fn client_on(&self, i: usize, name: &str) -> std::process::Command {
        let mut cmd = self.cgs[i].command("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.net.hosts[i].netns))
            .arg("--")
            .arg(crate::tools::path_of(name));
        cmd
    }

    /// `curl` run by an unmodified client inside host `i`'s cgroup and namespace.
    pub fn curl(&self, i: usize, args: &[&str]) -> std::process::Output {
        self.client_on(i, "curl")
            .args(["-sS", "--max-time", "5"])
            .args(args)
            .output()
            .unwrap()
    }

    /// Places the service of `yaml` on `host` too (`hms-ctl place` on A, the operator), then
    /// deploys it there.
    pub fn deploy(&self, host: usize, yaml: &str) {
        let name = yaml
            .lines()
            .find_map(|l| l.strip_prefix("name:"))
            .map(|n| n.trim().to_string())
            .expect("a spec with a name");
        self.place(&name, host);
        self.agents[host]
            .deploy_yaml(yaml)
            .unwrap_or_else(|e| panic!("deploy {name} on {}: {e:#}", NAMES[host]));
    }

    /// Adds `host` to the hosts `service` may run on.
    pub fn place(&self, service: &str, host: usize) {
        let mut placed = self.placed.lock().unwrap();
        let hosts = placed.entry(service.to_string()).or_default();
        if !hosts.iter().any(|h| h == NAMES[host]) {
            hosts.push(NAMES[host].to_string());
        }
        let on = hosts.join(",");
        let out = self.agents[0].ctl(&["place", service, "--on", &on]);
        assert!(
            out.status.success(),
            "place {service} --on {on}: {}",
            text(&out)
        );
    }

    /// Waits until host `host` sees `n` instances of `service`.
    pub fn wait_for_instances(&self, host: usize, service: &str, n: usize) {
        let deadline = Instant::now() + crate::slack(Duration::from_secs(10));
        loop {
            let d = self.agents[host].ctl_json(&["describe", service]).ok();
            if d.as_ref()
                .and_then(|d| d["instances"].as_array())
                .is_some_and(|i| i.len() == n)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{service} never had {n} instances on host {host}: {d:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// etcdctl with host `i`'s registry credential (what root on that host holds), or with
    /// none.
    pub fn etcdctl_as(&self, host: Option<usize>, args: &[&str]) -> anyhow::Result<String> {
        let dir = host.map(|i| self.agents[i].state_dir().join("etcd"));
        crate::etcd::etcdctl_as(&self.etcd, dir.as_deref(), args)
    }
}

/// `hms-node-agent init-mesh` for host `node` into `state` (etcd at `etcd_addr`), as the
/// README's first step.
pub fn init_mesh(
    state: &std::path::Path,
    etcd_addr: std::net::IpAddr,
    node: &str,
) -> std::process::Output {
    crate::tools::workspace_binary(crate::bins::path("hms-node-agent"))
        .args([
            "init-mesh",
            "--trust-domain",
            TRUST_DOMAIN,
            "--node-name",
            node,
        ])
        .arg("--etcd-address")
        .arg(etcd_addr.to_string())
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("running hms-node-agent init-mesh")
}

/// The parameters of a node certificate for SPIFFE ID `uri` (as the CA issues them), for
/// tests that sign one themselves with a real or a forged root.
pub fn node_leaf_params(uri: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + Duration::from_secs(3600)).into();
    params
}

pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Captures every frame crossing host `i`'s link (in the switch namespace) until stopped.
pub fn capture(net: &TestNet, i: usize, out: &std::path::Path) -> Child {
    let (switch, port) = net.switch_port(i);
    let script = r#"
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
s.bind((sys.argv[1], 0))
s.settimeout(0.2)
end = time.time() + float(sys.argv[3])
with open(sys.argv[2], 'wb') as f:
    while time.time() < end:
        try:
            f.write(s.recv(65535)); f.flush()
        except socket.timeout:
            pass
"#;
    crate::tools::in_netns(&switch, "python3")
        .args(["-c", script, &port])
        .arg(out)
        .arg("15")
        .spawn()
        .unwrap()
}

/// Runs `f` on a thread that joined network namespace `netns` (a `TestNet` host): sockets it
/// opens live there. Only that thread moves (setns affects the calling thread alone).
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns(2) on a file descriptor we own, moving only this thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    })
}
