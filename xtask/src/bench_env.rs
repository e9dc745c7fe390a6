//! What the bench's scenarios run on: child processes that are always stopped, a cgroup, a
//! real agent with its own cgroup, ports, pin dir, state dir and admin socket, HAProxy, and
//! two network namespaces joined by one veth pair with etcd and an agent in each.
//!
//! Every resource is a guard whose Drop releases it (processes SIGTERM then SIGKILL, agents
//! `hms-node-agent cleanup --pin-dir`, cgroups emptied and removed, namespaces deleted), so
//! success, errors and Ctrl-C all leave nothing behind. Names carry the bench's pid
//! (`hms-bench-<pid>-...`); leftovers of a bench that was killed hard (its pid is gone) are
//! removed at the next start. Progress goes to stderr: stdout is for `-o json`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::tools;
use crate::{cgroup, proc};

/// Core the load generator is pinned to; everything on the server side gets the other.
pub const CLIENT_CORE: u32 = 0;
pub const SERVER_CORE: u32 = 1;
/// The two test hosts' addresses, on the veth inside their namespaces only.
pub const HOST_A: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
pub const HOST_B: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
pub const BACKEND_PORT_B: u16 = 7000;
pub const SERVICE: &str = "bench-svc";

/// Where a process runs: pinned core, network namespace, cgroup.
#[derive(Default, Clone)]
pub struct Place<'a> {
    pub core: Option<u32>,
    pub netns: Option<&'a str>,
    pub cgroup: Option<&'a Path>,
}

/// `taskset -c CORE nsenter --net=/run/netns/NS -- PROGRAM`: both exec, so the pid is the
/// program's own. nsenter, not `ip netns exec`, which remounts /sys and hides cgroupfs/bpffs.
pub fn command(place: &Place, program: &Path) -> anyhow::Result<Command> {
    let mut argv: Vec<String> = Vec::new();
    if let Some(core) = place.core {
        argv.extend(["taskset".into(), "-c".into(), core.to_string()]);
    }
    if let Some(ns) = place.netns {
        argv.extend([
            "nsenter".into(),
            format!("--net=/run/netns/{ns}"),
            "--".into(),
        ]);
    }
    let mut cmd = match argv.first() {
        Some(first) => {
            let mut c = tools::command(first);
            c.args(&argv[1..]).arg(program);
            c
        }
        None => tools::workspace_binary(program),
    };
    if let Some(cg) = place.cgroup {
        proc::join_cgroup_at_exec(&mut cmd, cg)?;
    }
    Ok(cmd)
}

/// A child process stopped on drop (SIGTERM, 3 s, SIGKILL); killed with us if we die.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: `{}`", proc::describe(&cmd)))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn tail(&self) -> String {
        proc::tail(&self.log, 20)
    }

    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // SAFETY: plain kill(2) of our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A cgroup v2 directory we created; emptied (cgroup.kill) and removed on drop.
pub struct BenchCgroup {
    pub path: PathBuf,
}

impl BenchCgroup {
    pub fn create(name: &str) -> anyhow::Result<BenchCgroup> {
        let path = cgroup::v2_root()?.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {} (needs root)", path.display()))?;
        Ok(BenchCgroup { path })
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

fn remove_cgroup(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let _ = std::fs::write(path.join("cgroup.kill"), "1");
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_cgroup(&e.path());
                }
            }
        }
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("bench: cgroup {} not removed: {e}", path.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The binaries a run uses.
#[derive(Clone)]
pub struct Bins {
    pub agent: PathBuf,
    pub ctl: PathBuf,
    /// This xtask executable: the backend and the load generator.
    pub xtask: PathBuf,
}

/// A loopback port outside the kernel's ephemeral range (see `loopback_ports`).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(crate::loopback_ports::free_port())
}

/// Waits until `addr` accepts a TCP connection (in our own namespace).
pub fn wait_for_port(p: &mut Proc, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = p.exited() {
            bail!("{} exited at start ({status}):\n{}", p.name, p.tail());
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not listen on {addr} in 10 s:\n{}", p.name, p.tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET over plain HTTP/1.0 in our own namespace, for the backend's counters.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

/// The same inside a namespace, through curl.
pub fn http_get_in(netns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let out = tools::command("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(tools::path_of("curl"))
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .context("running curl in a namespace")?;
    if !out.status.success() {
        bail!("curl: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The 1 KiB backend (`xtask bench-backend`), pinned to the server core.
pub fn start_backend(
    bins: &Bins,
    netns: Option<&str>,
    cgroup: Option<&Path>,
    listen: SocketAddr,
    log: &Path,
) -> anyhow::Result<Proc> {
    let place = Place {
        core: Some(SERVER_CORE),
        netns,
        cgroup,
    };
    let mut cmd = command(&place, &bins.xtask)?;
    cmd.args(["bench-backend", "--listen", &listen.to_string()]);
    let mut p = Proc::spawn("bench-backend", cmd, log)?;
    if netns.is_none() {
        wait_for_port(&mut p, listen)?;
    }
    Ok(p)
}

/// HAProxy 2.x in HTTP mode, one thread, one hop in front of the backend.
pub fn start_haproxy(work: &Path, listen: u16, backend: SocketAddr) -> anyhow::Result<Proc> {
    let haproxy = tools::path_of("haproxy");
    let cfg = work.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    nbthread 1\n    maxconn 4096\n\n\
             defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    \
             timeout server 60s\n    option http-keep-alive\n\n\
             frontend bench\n    bind 127.0.0.1:{listen}\n    \
             http-request set-header x-bench-via haproxy\n    default_backend backend\n\n\
             backend backend\n    http-reuse always\n    server s1 {backend}\n"
        ),
    )?;
    let place = Place {
        core: Some(SERVER_CORE),
        ..Place::default()
    };
    let mut cmd = command(&place, &haproxy)?;
    cmd.arg("-db").arg("-f").arg(&cfg);
    let mut p = Proc::spawn("haproxy", cmd, &work.join("haproxy.log"))?;
    wait_for_port(&mut p, SocketAddr::from((Ipv4Addr::LOCALHOST, listen)))?;
    Ok(p)
}

/// A real `hms-node-agent run` with everything of its own; stopped and cleaned up on drop.
pub struct Agent {
    pub name: String,
    proc: Proc,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub pid: u32,
    /// Its `/metrics` listener (inside its namespace, if it has one).
    pub metrics: SocketAddr,
    bins: Bins,
}

pub struct AgentSpec<'a> {
    pub name: &'a str,
    pub cgroup: &'a Path,
    pub netns: Option<&'a str>,
    pub work: &'a Path,
    /// Short directory for the admin socket (sun_path is 108 bytes).
    pub sock_dir: &'a Path,
    pub extra: Vec<String>,
    /// Run the agent inside `cgroup` (as on the default cgroup v2 root).
    pub inside_cgroup: bool,
}

impl Agent {
    pub fn start(bins: &Bins, spec: AgentSpec) -> anyhow::Result<Agent> {
        let state = spec.work.join(format!("{}-state", spec.name));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state)?;
        let socket = spec.sock_dir.join(format!("{}.sock", spec.name));
        let _ = std::fs::remove_file(&socket);
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/hms-bench-{}-{}",
            std::process::id(),
            spec.name
        ));
        // In a fresh namespace the defaults are free; on the host, pick free ports so a real
        // agent (or a test) on this machine is never disturbed.
        let addr = |default: u16| -> anyhow::Result<String> {
            Ok(match spec.netns {
                Some(_) => format!("127.0.0.1:{default}"),
                None => format!("127.0.0.1:{}", free_port()?),
            })
        };
        let place = Place {
            core: Some(SERVER_CORE),
            netns: spec.netns,
            cgroup: spec.inside_cgroup.then_some(spec.cgroup),
        };
        let metrics = addr(15090)?;
        let mut cmd = command(&place, &bins.agent)?;
        cmd.arg("run")
            .arg("--cgroup")
            .arg(spec.cgroup)
            .arg("--state-dir")
            .arg(&state)
            .arg("--admin-socket")
            .arg(&socket)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(["--outbound", &addr(15001)?])
            .args(["--dns", &addr(15053)?])
            .args(["--metrics", &metrics])
            .args(&spec.extra)
            .env_remove("RUST_LOG");
        if !spec.extra.iter().any(|a| a == "--inbound") {
            cmd.args(["--inbound", &addr(15008)?]);
        }
        if !spec.extra.iter().any(|a| a == "--node-name") {
            cmd.args(["--node-name", &format!("bench-{}", spec.name)]);
        }
        let log = spec.work.join(format!("{}.log", spec.name));
        let proc = Proc::spawn(&format!("hms-node-agent ({})", spec.name), cmd, &log)?;
        let mut agent = Agent {
            name: spec.name.to_owned(),
            pid: proc.pid(),
            proc,
            socket,
            pin_dir,
            metrics: metrics.parse().context("the agent's metrics address")?,
            bins: bins.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = agent.proc.exited() {
                bail!(
                    "{} exited at start ({status}):\n{}",
                    agent.proc.name,
                    agent.proc.tail()
                );
            }
            if agent.socket.exists()
                && let Ok(status) = agent.ctl_json(&["status"])
            {
                if let Some(pid) = status["pid"].as_u64() {
                    agent.pid = pid as u32;
                }
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready in 30 s:\n{}",
                    agent.proc.name,
                    agent.proc.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        self.proc.tail()
    }

    /// `hms-ctl --socket S ARGS`: stdout, or an error with stderr.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tools::workspace_binary(&self.bins.ctl)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running hms-ctl")?;
        if !out.status.success() {
            bail!(
                "hms-ctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn ctl_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ctl(&full)?).context("hms-ctl output is not JSON")
    }

    /// Deploys `yaml` (written next to the logs).
    pub fn deploy(&self, work: &Path, yaml: &str) -> anyhow::Result<()> {
        let file = work.join(format!("{}-{SERVICE}.yaml", self.name));
        std::fs::write(&file, yaml)?;
        self.ctl(&["deploy", &file.display().to_string()])?;
        Ok(())
    }

    /// `hms-ctl status`'s sk_msg counters (`redirected`, `redirected_bytes`, `passed`).
    pub fn sk_msg_stats(&self) -> anyhow::Result<serde_json::Value> {
        Ok(self.ctl_json(&["status"])?["sk_msg"].clone())
    }

    /// How many of the last 1000 tap events of the bench service have `path`.
    pub fn tap_count(&self, path: &str) -> anyhow::Result<u64> {
        self.tap_count_of(SERVICE, path)
    }

    /// How many of the last 1000 tap events of `name` (a service, or the caller `gateway`)
    /// have `path`.
    pub fn tap_count_of(&self, name: &str, path: &str) -> anyhow::Result<u64> {
        let out = self.ctl(&["tap", name, "--last", "1000", "-o", "json"])?;
        Ok(out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["path"] == path)
            .count() as u64)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.proc.stop();
        let out = tools::workspace_binary(&self.bins.agent)
            .args(["cleanup", "--pin-dir"])
            .arg(&self.pin_dir)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "bench: cleanup of {} failed: {}",
                self.pin_dir.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("bench: could not run hms-node-agent cleanup: {e}"),
        }
    }
}

/// Two network namespaces (`hmsb<pid>-a`, `-b`) joined by one veth pair, addresses
/// HOST_A/HOST_B. Deleted (and whatever runs inside killed) on drop.
pub struct TwoNs {
    pub a: String,
    pub b: String,
}

pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = tools::command("ip")
        .args(args)
        .output()
        .context("running ip (iproute2; run `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl TwoNs {
    pub fn new() -> anyhow::Result<TwoNs> {
        Self::tagged("")
    }

    /// A second (third...) pair in the same run: `hmsb<pid><tag>-a`, `-b`.
    pub fn tagged(tag: &str) -> anyhow::Result<TwoNs> {
        let pid = std::process::id();
        let ns = TwoNs {
            a: format!("hmsb{pid}{tag}-a"),
            b: format!("hmsb{pid}{tag}-b"),
        };
        ip(&["netns", "add", &ns.a])?;
        ip(&["netns", "add", &ns.b])?;
        ip(&[
            "-n", &ns.a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &ns.b,
        ])?;
        for (name, addr) in [(&ns.a, HOST_A), (&ns.b, HOST_B)] {
            ip(&["-n", name, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", name, "link", "set", "eth0", "up"])?;
        }
        Ok(ns)
    }
}

pub fn delete_netns(name: &str) {
    if let Ok(out) = tools::command("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain kill(2) of a process inside our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = ip(&["netns", "del", name]);
}

impl Drop for TwoNs {
    fn drop(&mut self) {
        delete_netns(&self.a);
        delete_netns(&self.b);
    }
}

/// A one-member etcd inside namespace `netns` on `ip`, data in `dir`.
pub fn start_etcd(netns: &str, ip: Ipv4Addr, dir: &Path) -> anyhow::Result<Proc> {
    let etcd = tools::path_of("etcd");
    let data = dir.join("etcd-data");
    let _ = std::fs::remove_dir_all(&data);
    let client = format!("http://{ip}:2379");
    let peer = format!("http://{ip}:2380");
    let place = Place {
        core: Some(SERVER_CORE),
        netns: Some(netns),
        cgroup: None,
    };
    let mut cmd = command(&place, &etcd)?;
    cmd.args(["--name", "hms-bench", "--data-dir"])
        .arg(&data)
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("hms-bench={peer}")])
        .args(["--initial-cluster-state", "new"]);
    let mut p = Proc::spawn("etcd", cmd, &dir.join("etcd.log"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = p.exited() {
            bail!("etcd exited at start ({status}):\n{}", p.tail());
        }
        if http_get_in(netns, SocketAddr::from((ip, 2379)), "/health")
            .is_ok_and(|b| b.contains("\"health\":\"true\""))
        {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!("etcd not healthy in 20 s:\n{}", p.tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes what a bench killed hard left behind: pin dirs, cgroups and namespaces whose
/// name carries a pid that no longer runs.
pub fn remove_leftovers(agent: &Path) {
    let dead = |name: &str, prefix: &str| -> bool {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name, "hms-bench-") {
                eprintln!("bench: removing leftover pins {}", e.path().display());
                let _ = tools::workspace_binary(agent)
                    .args(["cleanup", "--pin-dir"])
                    .arg(e.path())
                    .output();
            }
        }
    }
    if let Ok(root) = cgroup::v2_root()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name, "hms-bench-") {
                eprintln!("bench: removing leftover cgroup {}", e.path().display());
                remove_cgroup(&e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name, "hmsb") {
                eprintln!("bench: removing leftover namespace {name}");
                delete_netns(&name);
            }
        }
    }
}

/// utime + stime of `pid` in seconds (all threads).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may contain spaces: state is field 3, utime 14.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / hz)
}

/// VmHWM (peak resident set) of `pid` in MB (MiB).
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmHWM:")
}

/// Resident memory now (`VmRSS`): what the process holds while serving, without the
/// start-up transient that `VmHWM` keeps.
pub fn rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmRSS:")
}

fn status_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

pub fn backend_addr_b() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(HOST_B, BACKEND_PORT_B))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_cpu_and_rss() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(peak_rss_mb(me).is_some_and(|mb| mb > 0.0));
    }
}
