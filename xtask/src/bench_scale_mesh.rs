//! The scale bench's mesh: N hosts as network namespaces on one bridge, one real etcd (in the
//! first host's namespace, as in the two-host bench), host 1's agent the CA (`ca init`), every
//! other host joining with a token made on host 1. Hosts are added while the mesh runs and
//! can die (SIGKILL, no goodbye), as a real host does.
//!
//! Also how the bench talks to the agents without a process per call: the admin API over the
//! Unix socket (one JSON request per line, as `hms-ctl` sends it) and DNS queries over UDP to
//! each agent's DNS listener, from a socket created inside the host's namespace.
//!
//! Owns the namespaces, the bridge, etcd and the agents of these hosts; never measures (the
//! curves do). Every resource is a guard from `bench_env` (or dropped like one), so errors and
//! Ctrl-C leave nothing behind; names carry the bench's pid (`hmsb<pid>-...`,
//! `hms-bench-<pid>-...`), so `bench_env::remove_leftovers` finds what a hard kill left.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::{Value, json};

use crate::bench_env::{self, Agent, AgentSpec, BenchCgroup, Bins, Proc};
use crate::interrupt;

/// The hosts' subnet, on the bridge only (inside the namespaces).
const SUBNET: [u8; 3] = [10, 214, 0];
/// The agents' DNS listener inside their namespaces (`bench_env::Agent` defaults).
const DNS_PORT: u16 = 15053;

/// One host: its namespace, agent and cgroup. Fields drop in order: agent, cgroup, namespace.
pub struct Host {
    pub node: String,
    pub netns: String,
    pub agent: Agent,
    _cgroup: BenchCgroup,
    _ns: Netns,
}

/// A namespace deleted (and whatever runs in it killed) on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        bench_env::delete_netns(&self.0);
    }
}

pub struct ScaleMesh {
    /// Dropped first: agents stop before etcd goes.
    pub hosts: Vec<Host>,
    pub etcd: Proc,
    _host1_ns: Option<Netns>,
    _switch: Netns,
    bins: Bins,
    work: PathBuf,
    sock_dir: PathBuf,
    next_index: usize,
}

impl ScaleMesh {
    /// The bridge, host 1 with etcd and the CA, then hosts up to `n`.
    pub fn new(bins: &Bins, work: &Path, sock_dir: &Path, n: usize) -> anyhow::Result<ScaleMesh> {
        let pid = std::process::id();
        let switch = format!("hmsb{pid}-sw");
        bench_env::ip(&["netns", "add", &switch])?;
        let switch = Netns(switch);
        bench_env::ip(&["-n", &switch.0, "link", "add", "br0", "type", "bridge"])?;
        bench_env::ip(&["-n", &switch.0, "link", "set", "br0", "up"])?;
        std::fs::create_dir_all(work)?;
        let ns1 = make_netns(&switch.0, 1)?;
        let etcd = bench_env::start_etcd(&ns1.0, host_addr(1), work)?;
        let mut mesh = ScaleMesh {
            hosts: Vec::new(),
            etcd,
            _host1_ns: Some(ns1),
            _switch: switch,
            bins: bins.clone(),
            work: work.to_path_buf(),
            sock_dir: sock_dir.to_path_buf(),
            next_index: 1,
        };
        mesh.add_hosts(n)?;
        Ok(mesh)
    }

    /// Starts hosts until `n` are up, and
    /// waits until every host has its certificate and sees every other one.
    pub fn add_hosts(&mut self, n: usize) -> anyhow::Result<()> {
        let pid = std::process::id();
        let mut pending = Vec::new();
        while self.hosts.len() + pending.len() < n {
            interrupt::check()?;
            let index = self.next_index;
            self.next_index += 1;
            let ns = match (index, self._host1_ns.take()) {
                (1, Some(ns)) => ns,
                (_, other) => {
                    self._host1_ns = other;
                    make_netns(&self._switch.0, index)?
                }
            };
            let cgroup = BenchCgroup::create(&format!("hms-bench-{pid}-h{index}"))?;
            let node = format!("scale-h{index}");
            let mut extra = vec![
                "--registry".to_string(),
                format!("etcd://{}:2379", host_addr(1)),
                "--inbound".into(),
                format!("{}:15008", host_addr(index)),
                "--node-name".into(),
                node.clone(),
            ];
            if index > 1 {
                let token = self.work.join(format!("{node}.token"));
                let _ = std::fs::remove_file(&token);
                self.hosts
                    .first()
                    .context("host 1 (the CA) must be up before others join")?
                    .agent
                    .ctl(&[
                        "node",
                        "token",
                        "create",
                        "--node",
                        &node,
                        "--out",
                        &token.display().to_string(),
                    ])?;
                extra.extend(["--join-token-file".into(), token.display().to_string()]);
            }
            pending.push((index, node, ns, cgroup, extra));
            if index == 1 {
                // The CA first: the others' tokens are made on it.
                let host = self.start(pending.pop().expect("just pushed"))?;
                host.agent
                    .ctl(&["ca", "init", "--trust-domain", "scale.mesh"])?;
                self.hosts.push(host);
            }
        }
        // One after the other, from this thread: the agents get PR_SET_PDEATHSIG, which
        // fires when the *thread* that spawned them ends, so a helper thread cannot start them.
        for p in pending {
            let host = self.start(p)?;
            self.hosts.push(host);
        }
        self.wait_ready()
    }

    fn start(
        &self,
        (index, node, ns, cgroup, extra): (usize, String, Netns, BenchCgroup, Vec<String>),
    ) -> anyhow::Result<Host> {
        let agent = Agent::start(
            &self.bins,
            AgentSpec {
                name: &format!("h{index}"),
                cgroup: &cgroup.path,
                netns: Some(&ns.0),
                work: &self.work,
                sock_dir: &self.sock_dir,
                extra,
                inside_cgroup: false,
            },
        )?;
        Ok(Host {
            node,
            netns: ns.0.clone(),
            agent,
            _cgroup: cgroup,
            _ns: ns,
        })
    }

    /// Every host has its certificate and sees all the others as peers with a tunnel state.
    pub fn wait_ready(&self) -> anyhow::Result<()> {
        let n = self.hosts.len();
        let deadline = Instant::now() + Duration::from_secs(30 + 3 * n as u64);
        for h in &self.hosts {
            loop {
                interrupt::check()?;
                let status = h.agent.ctl_json(&["status"]);
                let ok = status.as_ref().is_ok_and(|s| {
                    let peers = s["peers"].as_array().cloned().unwrap_or_default();
                    s["identity"]["spiffe_id"].is_string()
                        && peers.len() == n - 1
                        && peers.iter().all(|p| p["tunnel"] != "no identity yet")
                });
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} not ready with {} peers: {:?}\n{}",
                        h.node,
                        n - 1,
                        status.map(|s| s["peers"].clone()),
                        h.agent.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// SIGKILLs host `i`'s agent (its lease then expires in etcd) and returns the host, to be
    /// dropped (pins, cgroup, namespace removed) once the measurement is done.
    pub fn kill(&mut self, i: usize) -> Host {
        let host = self.hosts.remove(i);
        // SAFETY: plain kill(2) of the agent we started.
        unsafe { libc::kill(host.agent.pid as libc::pid_t, libc::SIGKILL) };
        host
    }

    /// etcd's CPU so far (utime + stime, s).
    pub fn etcd_cpu(&self) -> Option<f64> {
        bench_env::cpu_seconds(self.etcd.pid())
    }

    /// How many keys etcd holds (all of them: the mesh uses one prefix), through its JSON
    /// gateway from inside host 1's namespace.
    pub fn etcd_keys(&self) -> anyhow::Result<u64> {
        let ns = &self.hosts.first().context("host 1")?.netns;
        // key "\0" with range_end "\0": every key (etcd's "all keys >= key" convention).
        let body = r#"{"key":"AA==","range_end":"AA==","count_only":true}"#;
        let out = crate::tools::command("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(crate::tools::path_of("curl"))
            .args(["-sS", "--max-time", "5", "-d", body])
            .arg(format!("http://{}:2379/v3/kv/range", host_addr(1)))
            .output()
            .context("running curl against etcd")?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("etcd's answer: {}", String::from_utf8_lossy(&out.stdout)))?;
        // The gateway prints int64 as strings, and leaves out zeros.
        Ok(v["count"]
            .as_str()
            .and_then(|c| c.parse().ok())
            .or(v["count"].as_u64())
            .unwrap_or(0))
    }
}

impl ScaleMesh {
    /// etcd's database size in use (bytes, `etcd_mvcc_db_total_size_in_use_in_bytes` from its
    /// /metrics): what the registry costs etcd on disk and in its page cache.
    pub fn etcd_db_bytes(&self) -> Option<f64> {
        let ns = &self.hosts.first()?.netns;
        let out = crate::tools::command("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(crate::tools::path_of("curl"))
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{}:2379/metrics", host_addr(1)))
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            l.strip_prefix("etcd_mvcc_db_total_size_in_use_in_bytes ")?
                .trim()
                .parse()
                .ok()
        })
    }
}

fn host_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], index as u8)
}

/// Namespace `hmsb<pid>-h<index>` with `eth0` on the bridge, address 10.214.0.<index>/24.
fn make_netns(switch: &str, index: usize) -> anyhow::Result<Netns> {
    let netns = format!("hmsb{}-h{index}", std::process::id());
    bench_env::ip(&["netns", "add", &netns])?;
    let ns = Netns(netns.clone());
    let (sw_end, host_end) = (format!("s{index}"), format!("h{index}"));
    let ip = bench_env::ip;
    ip(&[
        "-n", switch, "link", "add", &sw_end, "type", "veth", "peer", "name", &host_end,
    ])?;
    ip(&["-n", switch, "link", "set", &host_end, "netns", &netns])?;
    ip(&["-n", switch, "link", "set", &sw_end, "master", "br0"])?;
    ip(&["-n", switch, "link", "set", &sw_end, "up"])?;
    ip(&["-n", &netns, "link", "set", "lo", "up"])?;
    ip(&["-n", &netns, "link", "set", &host_end, "name", "eth0"])?;
    let cidr = format!("{}/24", host_addr(index));
    ip(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0"])?;
    ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
    Ok(ns)
}

/// One admin connection, kept open for many requests (what `hms-ctl` sends, without a
/// process per call: 10,000 deploys through `hms-ctl` would measure process start-up).
pub struct AdminConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl AdminConn {
    pub fn open(socket: &Path) -> anyhow::Result<AdminConn> {
        let s = UnixStream::connect(socket)
            .with_context(|| format!("connecting to the admin socket {}", socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(AdminConn {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// One request; the answer's `data`, or its error as an error.
    pub fn call(&mut self, request: &Value) -> anyhow::Result<Value> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer)?;
        let v: Value = serde_json::from_str(&answer)
            .with_context(|| format!("admin answer is not JSON: {answer:?}"))?;
        match v["result"].as_str() {
            Some("ok") => Ok(v["data"].clone()),
            _ => bail!("admin request failed: {}", v["message"]),
        }
    }

    /// `hms-ctl deploy` of a minimal spec: the service, with one instance on this host.
    pub fn deploy(&mut self, name: &str, port: u16) -> anyhow::Result<()> {
        let yaml = format!("name: {name}\nport: {port}\npolicy: allow_from_any\n");
        self.call(&json!({"op": "deploy", "file": format!("{name}.yaml"), "yaml": yaml}))?;
        Ok(())
    }
}

/// A UDP socket to an agent's DNS listener, created inside `netns` (a socket stays in the
/// namespace it was made in, whichever thread uses it later).
pub fn dns_socket(netns: &str) -> anyhow::Result<UdpSocket> {
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<UdpSocket> {
            let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns(2) on a file descriptor we own; moves only this short-lived thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            sock.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PORT)))?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(sock)
        })
        .join()
        .expect("setns thread panicked")
    })
}

/// Asks `<service>.svc` A over `sock`: the VIP, or None when the agent says NXDOMAIN (or
/// answers without an address). Retries a lost datagram a few times.
pub fn resolve(sock: &UdpSocket, service: &str, id: u16) -> anyhow::Result<Option<Ipv4Addr>> {
    let name = Name::from_ascii(format!("{service}.svc."))?;
    let mut msg = Message::new();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name, RecordType::A));
    let wire = msg.to_vec()?;
    let mut buf = [0u8; 1500];
    for _ in 0..4 {
        sock.send(&wire)?;
        loop {
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e).context("DNS recv"),
            };
            let reply = Message::from_vec(&buf[..n])?;
            if reply.id() != id {
                continue; // a late answer to an earlier query
            }
            if reply.response_code() != ResponseCode::NoError {
                return Ok(None);
            }
            return Ok(reply.answers().iter().find_map(|r| match r.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            }));
        }
    }
    bail!("no DNS answer for {service}.svc in 4 tries")
}
