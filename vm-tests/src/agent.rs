//! A real `hms-node-agent` process for a test: its own cgroup, ports, pin dir, state dir and
//! admin socket, so several run side by side. Dropping it stops the agent and runs
//! `hms-node-agent cleanup`, so nothing stays attached or pinned even when a test fails.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{bins, ports};

pub struct TestAgent {
    child: Option<Child>,
    pub cgroup: PathBuf,
    pub socket: PathBuf,
    pub outbound: SocketAddrV4,
    pub dns: SocketAddrV4,
    pub metrics: SocketAddrV4,
    pub pin_dir: PathBuf,
    pub vip_cidr: String,
    pub node_name: String,
    /// Network namespace the agent runs in (a `TestNet` host), if any.
    pub netns: Option<String>,
    /// Further `run` flags (registry, inbound, identity...).
    pub extra_args: Vec<String>,
    /// Run the agent process inside `cgroup` (as with the default cgroup v2 root), so its own
    /// sockets are seen by the hooks (the sk_msg bypass needs that).
    pub inside_cgroup: bool,
    /// Start the agent with this soft and hard `RLIMIT_NOFILE` (systemd's default soft
    /// limit is 1024; the hard one too, so the agent's raise cannot escape the test).
    pub fd_limit: Option<u64>,
    /// The agent binary to run instead of this build's `target/<profile>/hms-node-agent`
    /// (an older release, or the "installed" copy an upgrade replaces).
    pub binary: Option<PathBuf>,
    /// Holds state dir, socket and log; removed on drop.
    dir: tempfile::TempDir,
}

impl TestAgent {
    /// Starts an agent attached to `cgroup` and waits until it answers `status`.
    pub fn start(cgroup: &Path) -> anyhow::Result<TestAgent> {
        Self::start_with(cgroup, None, Vec::new())
    }

    /// Like [`TestAgent::start`] (or [`TestAgent::start_inside`] with `inside_cgroup`),
    /// running `binary` (e.g. an older release's agent).
    pub fn start_binary(
        cgroup: &Path,
        binary: PathBuf,
        inside_cgroup: bool,
    ) -> anyhow::Result<TestAgent> {
        let mut agent =
            Self::configure_with(cgroup, None, Vec::new(), inside_cgroup, None, None, false)?;
        agent.binary = Some(binary);
        agent.spawn()?;
        Ok(agent)
    }

    /// Like [`TestAgent::start`], with the agent process itself inside `cgroup`.
    pub fn start_inside(cgroup: &Path, extra_args: Vec<String>) -> anyhow::Result<TestAgent> {
        Self::configure(cgroup, None, extra_args, true, None)
    }

    /// Like [`TestAgent::start_with`], with the DNS responder on `dns` (e.g. a test host's
    /// bridge address, with `--dns-allow-remote` in `extra_args`).
    pub fn start_with_dns(
        cgroup: &Path,
        netns: Option<&str>,
        extra_args: Vec<String>,
        dns: SocketAddrV4,
    ) -> anyhow::Result<TestAgent> {
        Self::configure_with(cgroup, netns, extra_args, false, None, Some(dns), true)
    }

    /// Like [`TestAgent::start_with`] but not started: its state dir exists, so a test can
    /// put files there first (`hms-node-agent init-mesh`); then [`TestAgent::launch`].
    pub fn unstarted(
        cgroup: &Path,
        netns: Option<&str>,
        extra_args: Vec<String>,
    ) -> anyhow::Result<TestAgent> {
        Self::configure_with(cgroup, netns, extra_args, false, None, None, false)
    }

    /// Starts an agent made with [`TestAgent::unstarted`] and waits until it answers.
    pub fn launch(&mut self) -> anyhow::Result<()> {
        self.spawn()
    }

    /// Like [`TestAgent::start`], with soft and hard `RLIMIT_NOFILE` set to `limit`.
    pub fn start_with_fd_limit(cgroup: &Path, limit: u64) -> anyhow::Result<TestAgent> {
        Self::configure(cgroup, None, Vec::new(), false, Some(limit))
    }

    /// Like [`TestAgent::start_with_fd_limit`], with more flags.
    pub fn start_with_fd_limit_and(
        cgroup: &Path,
        limit: u64,
        extra_args: Vec<String>,
    ) -> anyhow::Result<TestAgent> {
        Self::configure(cgroup, None, extra_args, false, Some(limit))
    }

    /// Like [`TestAgent::start`], inside network namespace `netns` and with more flags.
    pub fn start_with(
        cgroup: &Path,
        netns: Option<&str>,
        extra_args: Vec<String>,
    ) -> anyhow::Result<TestAgent> {
        Self::configure(cgroup, netns, extra_args, false, None)
    }

    fn configure(
        cgroup: &Path,
        netns: Option<&str>,
        extra_args: Vec<String>,
        inside_cgroup: bool,
        fd_limit: Option<u64>,
    ) -> anyhow::Result<TestAgent> {
        Self::configure_with(
            cgroup,
            netns,
            extra_args,
            inside_cgroup,
            fd_limit,
            None,
            true,
        )
    }

    fn configure_with(
        cgroup: &Path,
        netns: Option<&str>,
        extra_args: Vec<String>,
        inside_cgroup: bool,
        fd_limit: Option<u64>,
        dns: Option<SocketAddrV4>,
        start: bool,
    ) -> anyhow::Result<TestAgent> {
        let n = ports::unique();
        let dir = tempfile::Builder::new()
            .prefix("hms-test-agent-")
            .tempdir()
            .context("temp dir")?;
        let mut agent = TestAgent {
            child: None,
            cgroup: cgroup.to_path_buf(),
            socket: dir.path().join("agent.sock"),
            outbound: ports::free_addr(),
            dns: dns.unwrap_or_else(ports::free_addr),
            metrics: ports::free_addr(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/hms-test-{}-{n}", std::process::id())),
            vip_cidr: "127.77.0.0/16".into(),
            node_name: extra_args
                .iter()
                .position(|a| a == "--node-name")
                .and_then(|i| extra_args.get(i + 1).cloned())
                .unwrap_or_else(|| format!("test-node-{n}")),
            netns: netns.map(str::to_string),
            extra_args,
            inside_cgroup,
            fd_limit,
            binary: None,
            dir,
        };
        if start {
            agent.spawn()?;
        } else {
            std::fs::create_dir_all(agent.state_dir()).context("creating the state dir")?;
        }
        Ok(agent)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// The agent's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// How many requests the proxy's safety net failed because an ended HTTP/2 upstream
    /// connection never answered them (its warning in the log); 0 unless one was lost so.
    pub fn orphaned_requests(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("without answering a request"))
            .count()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("agent log")?;
        let binary = self
            .binary
            .clone()
            .unwrap_or_else(|| bins::path("hms-node-agent"));
        let mut cmd = match &self.netns {
            Some(ns) => crate::tools::binary_in_netns(ns, binary),
            None if self.inside_cgroup => {
                crate::cgroup::TestCgroup::binary_in(&self.cgroup, binary)
            }
            None => crate::tools::workspace_binary(binary),
        };
        if let Some(limit) = self.fd_limit {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe and reads only `lim`, prepared before fork.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(["run", "--cgroup"])
            .arg(&self.cgroup)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--admin-socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(["--outbound", &self.outbound.to_string()])
            .args(["--dns", &self.dns.to_string()])
            .args(["--metrics", &self.metrics.to_string()])
            .args(["--vip-cidr", &self.vip_cidr])
            .args(if self.extra_args.iter().any(|a| a == "--node-name") {
                vec![]
            } else {
                vec!["--node-name".to_string(), self.node_name.clone()]
            })
            .args(&self.extra_args)
            .env("RUST_LOG", "info,hms_node_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting hms-node-agent")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("hms-node-agent exited early ({status}):\n{}", self.log());
            }
            if self.socket.exists() && self.ctl(&["status"]).status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "hms-node-agent did not become ready in 20 s:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The HTTP tap events of `service` whose path is `path`, polled (bounded) until at
    /// least `want` of them show; what was found by then.
    pub fn http_tap_events(
        &self,
        service: &str,
        path: &str,
        want: usize,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + crate::slack(Duration::from_secs(10));
        loop {
            let out = self.ctl(&["tap", service, "--last", "200", "-o", "json"]);
            assert!(
                out.status.success(),
                "hms-ctl tap: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let found: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON per line"))
                .filter(|e| e["kind"] == "http" && e["path"] == path)
                .collect();
            if found.len() >= want || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `hms-svc --socket <ours> ARGS`: the seed chapter's name for hms-ctl (a link the
    /// build puts next to it).
    pub fn svc(&self, args: &[&str]) -> Output {
        crate::tools::workspace_binary(bins::path("hms-svc"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running hms-svc")
    }

    /// Runs `hms-ctl --socket <ours> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        crate::tools::workspace_binary(bins::path("hms-ctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running hms-ctl")
    }

    /// `hms-ctl -o json ARGS`, parsed; fails with stderr when the command fails.
    pub fn ctl_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let out = self.ctl(&full);
        if !out.status.success() {
            bail!(
                "hms-ctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("hms-ctl output is not JSON")
    }

    /// Writes `yaml` to a file and deploys it; returns the service's VIP.
    pub fn deploy_yaml(&self, yaml: &str) -> anyhow::Result<Ipv4Addr> {
        let file = self
            .dir
            .path()
            .join(format!("spec-{}.yaml", ports::unique()));
        std::fs::write(&file, yaml)?;
        let v = self.ctl_json(&["deploy", file.to_str().context("utf-8 path")?])?;
        v["service"]["vip"]
            .as_str()
            .context("deploy answer has no VIP")?
            .parse()
            .context("VIP")
    }

    /// Deploys `name` listening on `port` with default settings.
    pub fn deploy(&self, name: &str, port: u16) -> anyhow::Result<Ipv4Addr> {
        self.deploy_yaml(&format!(
            "name: {name}\nport: {port}\npolicy: allow_from_any\n"
        ))
    }

    /// The pin set (`pin_dir/layout-<version>`) the serving agent uses, from its status.
    pub fn pin_set(&self) -> PathBuf {
        let status = self.ctl_json(&["status"]).expect("agent status");
        PathBuf::from(
            status["redirect"]["pin_set"]
                .as_str()
                .unwrap_or_else(|| panic!("no pin set in status: {status}")),
        )
    }

    /// The pid of the agent serving the admin socket now.
    pub fn pid(&self) -> Option<u32> {
        self.ctl_json(&["status"])
            .ok()
            .and_then(|s| s["pid"].as_u64())
            .map(|p| p as u32)
    }

    /// Kills the serving agent with SIGKILL (a crash): nothing is cleaned up.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        let pid = self.pid().context("no agent answers")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        Ok(())
    }

    /// Starts the agent again with the same settings and state (after a crash or stop).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.spawn()
    }

    /// Stops the agent with SIGTERM (graceful); pinned programs stay.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("agent ignored SIGTERM for 15 s:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Stops and starts the agent again with the same settings and state.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// Runs `hms-node-agent cleanup` for this agent's pin dir.
    pub fn cleanup(&self) -> Output {
        crate::tools::workspace_binary(bins::path("hms-node-agent"))
            .args(["cleanup", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()
            .expect("running hms-node-agent cleanup")
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        // After an upgrade the serving agent is a successor, not our child.
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let out = self.cleanup();
        if !out.status.success() {
            eprintln!(
                "cleanup of {} failed: {}",
                self.pin_dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
