//! A real etcd for registry tests: one member on 127.0.0.1 with random client and peer ports
//! and a temporary data directory, killed on drop. It can be stopped and started again on
//! the same ports and data, to test riding out an outage. Its log goes to `etcd.log` in the
//! data directory's parent and is printed when a start fails.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::ports::free_port;

const BINARY: &str = "etcd";
const START_DEADLINE: Duration = Duration::from_secs(20);

pub struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    /// Network namespace and address it serves on (a `TestNet` host), else loopback here.
    netns: Option<String>,
    ip: IpAddr,
    /// TLS with client certificates required (as `hms-node-agent init-mesh` sets it up).
    tls: Option<EtcdTls>,
}

/// etcd's own certificate (`<state-dir>/etcd-server/` of `init-mesh`) and a credential to
/// ask its health with (the operator's, `<state-dir>/etcd/`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub server_dir: PathBuf,
    pub client_dir: PathBuf,
}

/// Files of one etcd client credential, as the agent keeps them (`<state-dir>/etcd/`).
pub fn client_files(dir: &std::path::Path) -> [PathBuf; 3] {
    [
        dir.join("ca.pem"),
        dir.join("client.pem"),
        dir.join("client.key"),
    ]
}

impl Etcd {
    /// Starts a fresh single-member etcd. Fails (does not skip) when the binary is missing:
    /// `cargo xtask setup` installs it.
    pub fn start() -> anyhow::Result<Etcd> {
        Self::start_at(None, Ipv4Addr::LOCALHOST.into())
    }

    /// Like [`Etcd::start`], inside network namespace `netns`, serving on `ip`.
    pub fn start_in(netns: &str, ip: IpAddr) -> anyhow::Result<Etcd> {
        Self::start_at(Some(netns.to_string()), ip)
    }

    /// Like [`Etcd::start_in`], with TLS and client certificates required: what the README
    /// tells an operator to run after `hms-node-agent init-mesh`.
    pub fn start_tls_in(netns: &str, ip: IpAddr, tls: EtcdTls) -> anyhow::Result<Etcd> {
        Self::start_with(Some(netns.to_string()), ip, Some(tls))
    }

    fn start_at(netns: Option<String>, ip: IpAddr) -> anyhow::Result<Etcd> {
        Self::start_with(netns, ip, None)
    }

    fn start_with(netns: Option<String>, ip: IpAddr, tls: Option<EtcdTls>) -> anyhow::Result<Etcd> {
        let mut etcd = Etcd {
            dir: tempfile::Builder::new()
                .prefix("hms-etcd-")
                .tempdir()
                .context("creating etcd's temp dir")?,
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
            netns,
            ip,
            tls,
        };
        etcd.resume()?;
        Ok(etcd)
    }

    /// `IP:PORT` (`[IPv6]:PORT`), what `--registry etcd://` takes.
    pub fn endpoint(&self) -> String {
        SocketAddr::new(self.ip, self.client_port).to_string()
    }

    /// From the next [`Etcd::resume`] on, TLS with client certificates required (a mesh
    /// moving from etcd:// to etcds:// keeps its data).
    pub fn require_tls(&mut self, tls: EtcdTls) {
        self.tls = Some(tls);
    }

    /// Kills the server (like a crash) and waits for it to exit; the data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and data and waits until it is healthy.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}", SocketAddr::new(self.ip, self.client_port));
        let peer = format!("http://{}", SocketAddr::new(self.ip, self.peer_port));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening etcd's log")?;
        let mut cmd = match &self.netns {
            Some(ns) => crate::tools::in_netns(ns, "etcd"),
            None => crate::tools::command("etcd"),
        };
        if let Some(tls) = &self.tls {
            let d = &tls.server_dir;
            cmd.arg("--cert-file")
                .arg(d.join("server.pem"))
                .arg("--key-file")
                .arg(d.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(d.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "hms-test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("hms-test={peer}")])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating etcd's log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {BINARY}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!("etcd exited at start ({status}); its log:\n{}", self.log());
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        bail!(
            "etcd did not become healthy within {START_DEADLINE:?}; its log:\n{}",
            self.log()
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// GET /health over plain HTTP/1.0 (etcd answers `{"health":"true"}` once it has a leader).
    fn healthy(&self) -> bool {
        if let (Some(ns), Some(tls)) = (&self.netns, &self.tls) {
            let url = format!("https://{}/health", self.endpoint());
            let [ca, cert, key] = client_files(&tls.client_dir);
            return crate::tools::in_netns(ns, "curl")
                .args(["-s", "--max-time", "1"])
                .arg("--cacert")
                .arg(ca)
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key)
                .arg(&url)
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\""));
        }
        if let Some(ns) = &self.netns {
            let url = format!("http://{}/health", self.endpoint());
            return crate::tools::in_netns(ns, "curl")
                .args(["-s", "--max-time", "1", &url])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\""));
        }
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.client_port);
        let Ok(mut s) = TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback TCP relay between one client and etcd that the test can cut and heal: a
/// network partition of one host while etcd stays up for the others. While cut, open
/// connections are shut down and new ones are closed at once.
pub struct Partition {
    addr: SocketAddrV4,
    state: std::sync::Arc<PartitionState>,
}

#[derive(Default)]
struct PartitionState {
    cut: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    open: std::sync::Mutex<Vec<TcpStream>>,
}

impl Partition {
    /// Relays a new loopback port to `etcd`.
    pub fn new(etcd: &Etcd) -> anyhow::Result<Partition> {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = match listener.local_addr()? {
            std::net::SocketAddr::V4(a) => a,
            other => bail!("unexpected listener address {other}"),
        };
        let upstream = SocketAddrV4::new(Ipv4Addr::LOCALHOST, etcd.client_port);
        let state = std::sync::Arc::new(PartitionState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(down) = conn else { continue };
                if st.cut.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let pairs = [
                    (down.try_clone(), up.try_clone()),
                    (up.try_clone(), down.try_clone()),
                ];
                {
                    let mut open = st.open.lock().unwrap_or_else(|p| p.into_inner());
                    open.push(down);
                    open.push(up);
                }
                for pair in pairs {
                    if let (Ok(mut from), Ok(mut to)) = pair {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        Ok(Partition { addr, state })
    }

    /// The relay's address: give it to the client instead of [`Etcd::endpoint`].
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Cuts every connection through the relay and refuses new ones.
    pub fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.state.open.lock().unwrap_or_else(|p| p.into_inner());
        for s in open.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.cut();
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop so it can end
    }
}

/// Runs `etcdctl` (v3 API) against `etcd` with `args`; its stdout, or an error with stderr.
pub fn etcdctl(etcd: &Etcd, args: &[&str]) -> anyhow::Result<String> {
    etcdctl_as(etcd, None, args)
}

/// Like [`etcdctl`] with the etcd client credential in `credential` (a host's
/// `<state-dir>/etcd/`: what whoever holds that host's files can do), or none at all.
pub fn etcdctl_as(
    etcd: &Etcd,
    credential: Option<&std::path::Path>,
    args: &[&str],
) -> anyhow::Result<String> {
    let mut cmd = match &etcd.netns {
        Some(ns) => crate::tools::in_netns(ns, "etcdctl"),
        None => crate::tools::command("etcdctl"),
    };
    let scheme = if etcd.tls.is_some() { "https" } else { "http" };
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(format!("{scheme}://{}", etcd.endpoint()))
        .args(["--dial-timeout", "2s", "--command-timeout", "3s"]);
    if let Some(tls) = &etcd.tls {
        // Without a credential of its own, etcdctl still verifies the server.
        cmd.arg("--cacert").arg(tls.server_dir.join("ca.pem"));
    }
    if let Some(dir) = credential {
        let [_, cert, key] = client_files(dir);
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let out = cmd
        .args(args)
        .output()
        .context("running etcdctl; run `cargo xtask setup` (it installs etcd-client)")?;
    if !out.status.success() {
        bail!(
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
