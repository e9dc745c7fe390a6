//! The agent runs on listeners handed to it by a socket manager (systemd's protocol:
//! `LISTEN_FDS`, `LISTEN_FDNAMES`), here `systemd-socket-activate`, which holds the sockets
//! before the agent exists: a connection made before the agent starts waits in the held
//! listener and is served once the agent is up, instead of failing.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use vm_tests::backend::Backend;
use vm_tests::bins;
use vm_tests::cgroup::TestCgroup;
use vm_tests::ports;

struct Activated {
    child: Child,
    socket: std::path::PathBuf,
    pin_dir: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Activated {
    fn ctl(&self, args: &[&str]) -> std::process::Output {
        vm_tests::tools::workspace_binary(bins::path("hms-ctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Ok(out) = vm_tests::tools::workspace_binary(bins::path("hms-ctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(["-o", "json", "status"])
            .output()
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            && let Some(pid) = v["pid"].as_i64()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = vm_tests::tools::workspace_binary(bins::path("hms-node-agent"))
            .args(["cleanup", "--pin-dir"])
            .arg(&self.pin_dir)
            .output();
    }
}

#[test]
fn the_agent_serves_on_sockets_passed_by_systemd_and_a_connection_made_before_it_started_is_served()
{
    if vm_tests::tools::command("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("systemd-socket-activate is missing; run `cargo xtask setup` (package systemd)");
    }
    let cg = TestCgroup::new("sockact").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (outbound, dns, metrics) = (ports::free_addr(), ports::free_addr(), ports::free_addr());
    let socket = dir.path().join("agent.sock");
    let pin_dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/hms-test-sockact-{}",
        std::process::id()
    ));
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    // TCP listeners held by the socket manager; the DNS UDP socket the agent binds itself.
    let child = vm_tests::tools::command("systemd-socket-activate")
        .args(["-l", &outbound.to_string()])
        .args(["-l", &dns.to_string()])
        .args(["-l", &metrics.to_string()])
        .arg("--fdname=outbound:dns-tcp:metrics")
        .arg(bins::path("hms-node-agent"))
        .arg("run")
        .arg("--cgroup")
        .arg(cg.path())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--admin-socket")
        .arg(&socket)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .args(["--outbound", &outbound.to_string()])
        .args(["--dns", &dns.to_string()])
        .args(["--metrics", &metrics.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let agent = Activated {
        child,
        socket,
        pin_dir,
        _dir: dir,
    };
    // The socket manager starts the agent on the first connection: this request waits in the
    // held listener while the agent starts, then is answered.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !agent.socket.exists(),
        "the agent starts only on the first connection"
    );
    let t = Instant::now();
    let out = vm_tests::tools::command("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            &format!("http://{metrics}/metrics"),
        ])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("hms_dns_queries_total"),
        "the queued connection was served: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "MEASURED: a connection made before the agent existed was answered after {} ms (agent start included)",
        t.elapsed().as_millis()
    );
    let status: serde_json::Value =
        serde_json::from_slice(&agent.ctl(&["-o", "json", "status"]).stdout).unwrap();
    assert_eq!(status["listeners_from"], "systemd", "{status}");
    // And the redirect works on the passed outbound socket.
    let backend = Backend::start("activated-svc", 0).unwrap();
    let spec = agent._dir.path().join("s.yaml");
    std::fs::write(
        &spec,
        format!("name: activated-svc\nport: {}\n", backend.addr.port()),
    )
    .unwrap();
    assert!(
        agent
            .ctl(&["deploy", spec.to_str().unwrap()])
            .status
            .success()
    );
    let o = cg
        .command("curl")
        .args(["-sS", "--max-time", "5", "http://activated-svc.svc/hello"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "activated-svc saw GET /hello\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
