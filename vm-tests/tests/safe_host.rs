//! The agent on a real host must not take the host down with it: processes of the meshed
//! cgroup that live in other network namespaces (containers, sandboxes, `ip netns exec`)
//! keep their own DNS, and when the agent is stopped or gone the port-53 hooks stand aside
//! so every lookup reaches the resolver the caller asked. With sockets held by a socket
//! manager (systemd), a query sent while the agent restarts waits for it and is answered.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use vm_tests::agent::TestAgent;
use vm_tests::backend::Backend;
use vm_tests::bins;
use vm_tests::cgroup::TestCgroup;
use vm_tests::ports;
use vm_tests::resolver::TestResolver;

/// A bare network namespace with loopback up, removed on drop: a container's view.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("hms-t-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = vm_tests::tools::command("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", text(&out));
        };
        let _ = vm_tests::tools::command("ip")
            .args(["netns", "del", &name])
            .output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = vm_tests::tools::command("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `dig +short` from inside the cgroup (and, with `netns`, inside that namespace).
fn dig(cg: &TestCgroup, netns: Option<&str>, server: Option<Ipv4Addr>, name: &str) -> String {
    let mut cmd = cg.command("nsenter");
    if let Some(ns) = netns {
        cmd.arg(format!("--net=/run/netns/{ns}"));
    }
    cmd.arg("--").arg(vm_tests::tools::path_of("dig"));
    if let Some(s) = server {
        cmd.arg(format!("@{s}"));
    }
    let out = cmd
        .args(["+short", "+time=1", "+tries=1", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Polls `dig` until it answers `want`, up to `limit`; the time it took.
fn dig_until(
    cg: &TestCgroup,
    server: Ipv4Addr,
    name: &str,
    want: &str,
    limit: Duration,
) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if dig(cg, None, Some(server), name) == want {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A bash /dev/tcp connect to `addr` from inside the cgroup: (connected, how long it took).
fn connect_from(cg: &TestCgroup, addr: SocketAddrV4) -> (bool, Duration) {
    let t = Instant::now();
    let out = cg
        .command("bash")
        .args([
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{}/{} && echo connected",
                addr.ip(),
                addr.port()
            ),
        ])
        .output()
        .unwrap();
    (text(&out).contains("connected"), t.elapsed())
}

#[test]
fn a_process_of_the_meshed_cgroup_in_another_netns_keeps_its_own_dns_and_svc_names_still_work_here()
{
    let cg = TestCgroup::new("otherns").unwrap();
    let agent = TestAgent::start(cg.path()).unwrap();
    let backend = Backend::start("here-svc", 0).unwrap();
    let vip = agent.deploy("here-svc", backend.addr.port()).unwrap();

    // A container's own resolver, on an address that exists only in its namespace.
    let ns = Netns::new("dns");
    let own = TestResolver::start_in_netns(
        &ns.name,
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(192, 0, 2, 44),
    )
    .unwrap();
    let answer = dig(
        &cg,
        Some(&ns.name),
        Some(own.addr.ip().to_owned()),
        "example.test",
    );
    assert_eq!(
        answer,
        "192.0.2.44",
        "the query in the other namespace reached that namespace's resolver (agent log:\n{})",
        vm_tests::client::tail(&agent.log(), 20)
    );
    assert!(own.queries() >= 1);

    // The same cgroup in the agent's namespace is still meshed.
    assert_eq!(
        dig(&cg, None, Some(Ipv4Addr::new(127, 0, 0, 1)), "here-svc.svc"),
        vip.to_string()
    );
    let out = cg
        .command("curl")
        .args(["-sS", "--max-time", "5", "http://here-svc.svc/x"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // A VIP connect in the other namespace is left alone too: nothing there, refused.
    let mut cmd = cg.command("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns.name))
        .arg("--")
        .arg(vm_tests::tools::path_of("bash"))
        .args([
            "-c",
            &format!("exec 3<>/dev/tcp/{vip}/80 && echo connected"),
        ]);
    let out = cmd.output().unwrap();
    assert!(
        !text(&out).contains("connected"),
        "a VIP connect in another namespace is not redirected: {}",
        text(&out)
    );
}

/// An agent on a test cgroup serving `svc`, and the resolver the cgroup's programs ask
/// (on 127.0.<net>.x, answering 192.0.2.<net> for every name).
struct MeshedHost {
    cg: TestCgroup,
    agent: TestAgent,
    _backend: Backend,
    vip: Ipv4Addr,
    ip: Ipv4Addr,
    resolver: TestResolver,
}

fn meshed_host(tag: &str, svc: &str, net: u8) -> MeshedHost {
    let cg = TestCgroup::new(tag).unwrap();
    let agent = TestAgent::start(cg.path()).unwrap();
    let backend = Backend::start(svc, 0).unwrap();
    let vip = agent.deploy(svc, backend.addr.port()).unwrap();
    let ip = Ipv4Addr::new(127, 0, net, 10 + (ports::unique() % 200) as u8);
    let resolver = TestResolver::start(ip, Ipv4Addr::new(192, 0, 2, net)).unwrap();
    MeshedHost {
        cg,
        agent,
        _backend: backend,
        vip,
        ip,
        resolver,
    }
}

#[test]
fn a_stopped_agent_leaves_dns_to_the_callers_resolver_and_vip_connects_fail_at_once() {
    // Every field bound: one left to `..` would be dropped (and stop serving) right here.
    let MeshedHost {
        cg,
        mut agent,
        _backend,
        vip,
        ip,
        resolver,
    } = meshed_host("failopen", "gone-svc", 83);

    // While the agent runs, .svc is the agent's and anything else is forwarded.
    assert_eq!(dig(&cg, None, Some(ip), "gone-svc.svc"), vip.to_string());
    assert_eq!(dig(&cg, None, Some(ip), "example.test"), "192.0.2.83");
    let before = resolver.queries();

    // SIGTERM: the agent stands aside at once.
    let pid = agent.pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let took = dig_until(
        &cg,
        ip,
        "gone-svc.svc",
        "192.0.2.83",
        Duration::from_secs(5),
    )
    .expect("after the stop, queries reach the resolver the caller asked");
    eprintln!(
        "MEASURED: after SIGTERM the caller's own resolver answered within {} ms",
        took.as_millis()
    );
    assert!(
        took < vm_tests::slack(Duration::from_secs(1)),
        "DNS failed open after {took:?}, not within 1 s"
    );
    assert!(
        resolver.queries() > before,
        "answered by the resolver itself"
    );
    agent.stop().unwrap();

    let (connected, took) = connect_from(&cg, SocketAddrV4::new(vip, 80));
    assert!(!connected, "no agent: the VIP connect is refused");
    eprintln!(
        "MEASURED: a VIP connect with no agent failed after {} ms",
        took.as_millis()
    );
    assert!(took < vm_tests::slack(Duration::from_secs(1)), "{took:?}");

    // Started again: meshed again.
    agent.start_again().unwrap();
    assert_eq!(dig(&cg, None, Some(ip), "gone-svc.svc"), vip.to_string());
}

#[test]
fn a_crashed_agent_stops_holding_dns_once_its_heartbeat_lapses() {
    let MeshedHost {
        cg,
        mut agent,
        _backend,
        vip,
        ip,
        resolver: _resolver,
    } = meshed_host("crashdns", "crash-svc", 84);
    assert_eq!(dig(&cg, None, Some(ip), "crash-svc.svc"), vip.to_string());

    agent.kill9().unwrap();
    let t = Instant::now();
    let took = dig_until(
        &cg,
        ip,
        "example.test",
        "192.0.2.84",
        Duration::from_secs(10),
    )
    .expect("after a crash, DNS fails open when the heartbeat lapses");
    eprintln!(
        "MEASURED: after kill -9, the caller's own resolver answered after {} ms (window 3 s)",
        t.elapsed().as_millis()
    );
    assert!(took < vm_tests::slack(Duration::from_secs(5)), "{took:?}");
    agent.start_again().unwrap();
    assert_eq!(dig(&cg, None, Some(ip), "crash-svc.svc"), vip.to_string());
}

/// The sockets a socket manager (systemd) holds for the agent across its restarts.
struct HeldSockets {
    outbound: TcpListener,
    dns_udp: UdpSocket,
    dns_tcp: TcpListener,
    metrics: TcpListener,
}

impl HeldSockets {
    fn bind() -> HeldSockets {
        let dns = ports::free_addr();
        HeldSockets {
            outbound: TcpListener::bind(ports::free_addr()).unwrap(),
            dns_udp: UdpSocket::bind(dns).unwrap(),
            dns_tcp: TcpListener::bind(dns).unwrap(),
            metrics: TcpListener::bind(ports::free_addr()).unwrap(),
        }
    }

    fn addr(l: &TcpListener) -> String {
        l.local_addr().unwrap().to_string()
    }

    /// Starts `hms-node-agent run` the way systemd does: the sockets as fds 3.., named in
    /// LISTEN_FDNAMES, LISTEN_PID set to the agent's own pid (by the `sh` that execs it).
    fn start_agent(
        &self,
        cg: &TestCgroup,
        dir: &std::path::Path,
        pin_dir: &std::path::Path,
    ) -> Child {
        let fds: Vec<OwnedFd> = vec![
            self.outbound.try_clone().unwrap().into(),
            self.dns_udp.try_clone().unwrap().into(),
            self.dns_tcp.try_clone().unwrap().into(),
            self.metrics.try_clone().unwrap().into(),
        ];
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .unwrap();
        let mut cmd = vm_tests::tools::command("sh");
        cmd.args(["-c", "export LISTEN_PID=$$; exec \"$0\" \"$@\""])
            .arg(bins::path("hms-node-agent"))
            .arg("run")
            .arg("--cgroup")
            .arg(cg.path())
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--admin-socket")
            .arg(dir.join("agent.sock"))
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(["--outbound", &Self::addr(&self.outbound)])
            .args(["--dns", &self.dns_udp.local_addr().unwrap().to_string()])
            .args(["--metrics", &Self::addr(&self.metrics)])
            .env("LISTEN_FDS", "4")
            .env("LISTEN_FDNAMES", "outbound:dns-udp:dns-tcp:metrics")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: only dup2 and fcntl (async-signal-safe) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way first, so dup2 onto 3.. never clobbers a source fd.
                let mut moved = Vec::with_capacity(raw.len());
                for &fd in &raw {
                    let high = libc::fcntl(fd, libc::F_DUPFD, 100);
                    if high < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    moved.push(high);
                }
                for (i, &fd) in moved.iter().enumerate() {
                    if libc::dup2(fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(fds);
        child
    }
}

#[test]
fn with_sockets_held_by_a_socket_manager_a_query_sent_while_the_agent_restarts_is_answered() {
    let cg = TestCgroup::new("sockheld").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // bpffs pin dir of its own, removed at the end.
    let pin_dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/hms-test-sockheld-{}",
        std::process::id()
    ));
    let held = HeldSockets::bind();
    let ctl = |args: &[&str]| {
        vm_tests::tools::workspace_binary(bins::path("hms-ctl"))
            .arg("--socket")
            .arg(dir.path().join("agent.sock"))
            .args(args)
            .output()
            .unwrap()
    };
    let wait_ready = || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if ctl(&["status"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "agent not ready:\n{}",
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        );
    };
    let mut agent = held.start_agent(&cg, dir.path(), &pin_dir);
    wait_ready();
    let backend = Backend::start("held-svc", 0).unwrap();
    let spec = dir.path().join("held.yaml");
    std::fs::write(
        &spec,
        format!("name: held-svc\nport: {}\n", backend.addr.port()),
    )
    .unwrap();
    let out = ctl(&["deploy", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let described: serde_json::Value =
        serde_json::from_slice(&ctl(&["-o", "json", "describe", "held-svc"]).stdout).unwrap();
    let vip = described["vip"].as_str().unwrap().to_string();
    let lo = Ipv4Addr::new(127, 0, 0, 1);
    assert_eq!(dig(&cg, None, Some(lo), "held-svc.svc"), vip);

    // The agent dies; the socket manager keeps its sockets and starts it again.
    let _ = agent.kill();
    let _ = agent.wait();
    let query = {
        let mut cmd = cg.command("dig");
        cmd.args([
            "+short",
            "+time=8",
            "+tries=1",
            "@127.0.0.1",
            "held-svc.svc",
        ])
        .stdout(Stdio::piped());
        cmd.spawn().unwrap()
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut agent = held.start_agent(&cg, dir.path(), &pin_dir);
    let answered = query.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answered.stdout).trim(),
        vip,
        "the query sent while the agent was down waited in the held socket and was answered \
         by the restarted agent:\n{}",
        std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
    );
    wait_ready();

    // A crash loop: the agent does not come back. Its sockets are still held, but once its
    // heartbeat lapses DNS goes to the caller's own resolver.
    let ip = Ipv4Addr::new(127, 0, 85, 10 + (ports::unique() % 200) as u8);
    let _resolver = TestResolver::start(ip, Ipv4Addr::new(192, 0, 2, 85)).unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    let took = dig_until(
        &cg,
        ip,
        "example.test",
        "192.0.2.85",
        Duration::from_secs(10),
    )
    .expect("with the agent gone for good, DNS fails open despite the held sockets");
    eprintln!(
        "MEASURED: agent gone, sockets held: the caller's resolver answered after {} ms",
        took.as_millis()
    );
    let _ = std::io::stderr().flush();
    let _ = vm_tests::tools::workspace_binary(bins::path("hms-node-agent"))
        .args(["cleanup", "--pin-dir"])
        .arg(&pin_dir)
        .output();
}

/// A meshed app with a fixed source port: connects to the VIP, says so, waits for a line on
/// stdin, sends the marker and checks the echo.
const APP: &str = r#"
import socket, sys
vip, port, src, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', src))
s.connect((vip, port))
print('connected', flush=True)
sys.stdin.readline()
s.sendall(marker)
s.settimeout(5)
got = b''
while len(got) < len(marker):
    d = s.recv(65536)
    if not d:
        break
    got += d
print('echo-ok' if got == marker else 'echo-bad %r' % got, flush=True)
"#;

/// The attacker, an unprivileged user in a user and network namespace of its own (still in
/// the meshed cgroup): listens on the proxy's address and makes a connection with the very
/// 4-tuple of the proxy's accepted socket, then reads whatever arrives for 3 s.
const THIEF: &str = r#"
import socket, sys, time
port, src = int(sys.argv[1]), int(sys.argv[2])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('127.0.0.1', port)); l.listen(1)
c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind(('127.0.0.1', src)); c.connect(('127.0.0.1', port))
a, _ = l.accept()
print('ready', flush=True)
a.settimeout(0.1); c.settimeout(0.1)
got = b''
end = time.time() + 3
while time.time() < end:
    for s in (a, c):
        try:
            d = s.recv(65536)
            if d:
                got += d
        except socket.timeout:
            pass
print('stolen %d %r' % (len(got), got[:64]), flush=True)
"#;

#[test]
fn a_listener_in_another_namespace_on_the_proxys_tuple_receives_none_of_a_meshed_apps_bytes() {
    use std::io::{BufRead as _, BufReader};
    let cg = TestCgroup::new("thief").unwrap();
    // Inside the cgroup, as with the default root cgroup: the sk_msg bypass is on.
    let agent = TestAgent::start_inside(cg.path(), Vec::new()).unwrap();
    let echo = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for conn in echo.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let vip = agent.deploy("vault-svc", echo_port).unwrap();
    let src = ports::free_port();
    let marker = format!("SECRET-{}-{}", std::process::id(), ports::unique());

    let mut app = cg
        .command("python3")
        .args(["-c", APP, &vip.to_string(), "80", &src.to_string(), &marker])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut app_out = BufReader::new(app.stdout.take().unwrap());
    let mut line = String::new();
    app_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");

    // The thief as an unprivileged user (nobody) in a network namespace of its own, still in
    // the meshed cgroup. Any user can make one with `unshare -Urn`; where user namespaces
    // are refused (the kernel refuses them inside a chroot, as in CI's fresh Debian root), a
    // namespace made by root stands in, with the thief still running as nobody inside it.
    let userns_ok = cg
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(vm_tests::tools::path_of("unshare"))
        .args(["-Urn", "--"])
        .arg(vm_tests::tools::path_of("sh"))
        .args(["-c", "true"])
        .output()
        .unwrap()
        .status
        .success();
    let root_ns = (!userns_ok).then(|| {
        eprintln!(
            "NOTE: user namespaces are refused here (chroot?); the thief runs as nobody in a \
             network namespace made by root instead"
        );
        Netns::new("thief")
    });
    let as_nobody = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    let mut thief_cmd = match &root_ns {
        None => {
            let inner = format!(
                "{} link set lo up && exec {} -c \"$0\" \"$@\"",
                vm_tests::tools::path_of("ip").display(),
                vm_tests::tools::path_of("python3").display()
            );
            let mut c = cg.command("setpriv");
            c.args(as_nobody)
                .arg(vm_tests::tools::path_of("unshare"))
                .args(["-Urn", "--"])
                .arg(vm_tests::tools::path_of("sh"))
                .args(["-c", &inner, THIEF]);
            c
        }
        Some(ns) => {
            let mut c = cg.command("nsenter");
            c.arg(format!("--net=/run/netns/{}", ns.name))
                .arg("--")
                .arg(vm_tests::tools::path_of("setpriv"))
                .args(as_nobody)
                .arg(vm_tests::tools::path_of("python3"))
                .args(["-c", THIEF]);
            c
        }
    };
    let mut thief = thief_cmd
        .arg(agent.outbound.port().to_string())
        .arg(src.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut thief_out = BufReader::new(thief.stdout.take().unwrap());
    let mut line = String::new();
    thief_out.read_line(&mut line).unwrap();
    if line.trim() != "ready" {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut thief.stderr.take().unwrap(), &mut err);
        panic!("the unprivileged namespace could not be set up: {line}{err}");
    }

    // Now the app speaks; the proxy (and the echo behind it) must get it, the thief nothing.
    writeln!(app.stdin.take().unwrap(), "go").unwrap();
    let mut echoed = String::new();
    app_out.read_line(&mut echoed).unwrap();
    let _ = app.wait();
    let mut stolen = String::new();
    thief_out.read_line(&mut stolen).unwrap();
    let _ = thief.wait();
    assert!(
        stolen.starts_with("stolen 0 "),
        "the other namespace's socket received the app's bytes: {stolen}"
    );
    assert_eq!(
        echoed.trim(),
        "echo-ok",
        "the meshed app's exchange is intact"
    );
    let s = agent.ctl_json(&["status"]).unwrap();
    assert!(
        s["sk_msg"]["redirected"].as_u64().unwrap_or(0) > 0,
        "the exchange went through the bypass, so the test tested it: {s}"
    );
}
