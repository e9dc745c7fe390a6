//! The README's multi-host steps, run as written: every `sh` block marked
//! `<!-- readme-test: HOST [ADDR] -->` in README.md is typed, line by line, into a shell on
//! that host, in the README's order. The hosts are network namespaces with the README's
//! addresses (10.0.0.1-3); each shell has its own mount namespace with empty `/var/lib`,
//! `/run/hms` and bpffs, so the default paths (`/var/lib/hms`, `/run/hms/agent.sock`,
//! `/sys/fs/bpf/hms`) are that host's own, and the built binaries first on PATH, as
//! installed ones would be. Like a person at the keyboard, the runner waits for a command
//! that fails because what it needs is still starting (it retries it for a while), and keeps
//! nothing from one command to the next but what the shell keeps.
//!
//! What the test adds that the README leaves to the reader: the services' own processes (a
//! backend on :7000 on host-a and host-b), and the checks at the end.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vm_tests::cgroup::TestCgroup;
use vm_tests::mesh::Backend;
use vm_tests::netns::TestNet;

/// One marked block: the host it runs on and its commands (continuations joined).
struct Block {
    host: String,
    commands: Vec<String>,
}

fn readme_blocks() -> Vec<Block> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(tag) = line
            .strip_prefix("<!-- readme-test:")
            .and_then(|t| t.strip_suffix("-->"))
        else {
            continue;
        };
        let host = tag.split_whitespace().next().expect("a host").to_string();
        assert_eq!(lines.next(), Some("```sh"), "a sh block after {line}");
        let mut commands = Vec::new();
        let mut pending = String::new();
        for l in lines.by_ref() {
            if l == "```" {
                break;
            }
            match l.strip_suffix('\\') {
                Some(start) => pending.push_str(start),
                None => {
                    pending.push_str(l);
                    commands.push(std::mem::take(&mut pending));
                }
            }
        }
        blocks.push(Block { host, commands });
    }
    blocks
}

/// A shell on one host: its own mount namespace, inside a cgroup that kills whatever it
/// left running when dropped.
struct HostShell {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    /// Everything the shell and its background jobs printed.
    transcript: Vec<String>,
    _cg: TestCgroup,
    next: u64,
}

impl HostShell {
    fn start(name: &str, netns: &str, work: &std::path::Path) -> HostShell {
        let cg = TestCgroup::new(&format!("readme-{name}")).unwrap();
        let bin_dir = vm_tests::bins::path("hms-node-agent")
            .parent()
            .unwrap()
            .to_path_buf();
        std::fs::create_dir_all("/run/hms").unwrap();
        let mut child = cg
            .command("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(vm_tests::tools::path_of("unshare"))
            .args(["--mount", "--propagation", "private", "--"])
            .arg(vm_tests::tools::path_of("bash"))
            .args(["--noprofile", "--norc", "-s"])
            .env(
                "PATH",
                format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin_dir.display()),
            )
            .current_dir(work)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("a host shell");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        // Drains everything (background jobs log here too), so no job ever blocks on it.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut shell = HostShell {
            name: name.to_string(),
            child,
            stdin,
            lines,
            transcript: Vec::new(),
            _cg: cg,
            next: 0,
        };
        // The host's own state, sockets and pins, as on a machine of its own.
        // No /etc/hosts either (a fresh debootstrap root has none): the README's commands
        // must not depend on `localhost` resolving.
        let setup = "exec 2>&1; mount -t tmpfs tmpfs /var/lib && mkdir -p /var/lib/hms /var/lib/etcd \
             && mount -t tmpfs tmpfs /run/hms && mount -t bpf bpf /sys/fs/bpf \
             && { [ ! -e /etc/hosts ] || mount --bind /dev/null /etc/hosts; }";
        let (rc, out) = shell.run_once(setup, Duration::from_secs(10));
        assert_eq!(rc, Some(0), "setting up {name}'s shell: {out}");
        shell
    }

    /// Runs one command line; its exit code (None: no answer in time) and output.
    fn run_once(&mut self, command: &str, wait: Duration) -> (Option<i32>, String) {
        self.next += 1;
        let marker = format!("__readme_rc_{}=", self.next);
        writeln!(self.stdin, "{command}\necho {marker}$?").unwrap();
        self.stdin.flush().unwrap();
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.transcript.push(line.clone());
                    if let Some(rc) = line.strip_prefix(&marker) {
                        return (rc.trim().parse().ok(), out.join("\n"));
                    }
                    out.push(line);
                }
                Err(_) => return (None, out.join("\n")),
            }
        }
    }

    /// Runs `command` until it succeeds and `ok` accepts its output, as a person would
    /// while what it needs is still starting.
    fn run(&mut self, command: &str, ok: impl Fn(&str) -> bool) -> String {
        let background = command.trim_end().ends_with('&');
        let deadline = Instant::now() + vm_tests::slack(Duration::from_secs(60));
        loop {
            let (rc, out) = self.run_once(command, Duration::from_secs(30));
            if background || (rc == Some(0) && ok(&out)) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "on {}: `{command}` kept failing (exit {rc:?}): {out}\n--- {}'s transcript:\n{}",
                self.name,
                self.name,
                self.transcript.join("\n")
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn stop(mut self) {
        let _ = writeln!(self.stdin, "kill $(jobs -p) 2>/dev/null; wait; exit");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_readme_first_host_and_join_steps_make_a_working_three_host_mesh() {
    let blocks = readme_blocks();
    let hosts = ["host-a", "host-b", "host-c"];
    assert!(
        hosts.iter().all(|h| blocks.iter().any(|b| b.host == *h)),
        "README blocks for every host"
    );
    let net = TestNet::on_subnet(3, [10, 0, 0]).expect("the README's network");
    let work = tempfile::tempdir().unwrap();
    // The services themselves: what the README's reader runs on host-a and host-b.
    let _a = Backend::start(&net, 0, "payments-svc", 7000, work.path());
    let _b = Backend::start(&net, 1, "payments-svc", 7000, work.path());
    let mut shells: Vec<HostShell> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| HostShell::start(h, &net.hosts[i].netns, work.path()))
        .collect();

    let mut last_call = String::new();
    for block in &blocks {
        let i = hosts.iter().position(|h| *h == block.host).unwrap();
        for command in &block.commands {
            let is_call = command.trim_start().starts_with("curl");
            let out = shells[i].run(command, |out| {
                !is_call || out.starts_with("payments-svc on host-")
            });
            if is_call {
                last_call = out;
            }
        }
    }
    assert!(
        last_call.starts_with("payments-svc on host-"),
        "{last_call}"
    );

    // Every host has its certificate and sees the other two through tunnels.
    for (i, h) in hosts.iter().enumerate() {
        let id = format!("spiffe://mesh.example/node/{h}");
        let status = shells[i].run("hms-ctl -o json status", |out| {
            let Ok(s) = serde_json::from_str::<serde_json::Value>(out) else {
                return false;
            };
            s["identity"]["spiffe_id"] == id.as_str()
                && s["peers"].as_array().is_some_and(|p| p.len() == 2)
        });
        assert!(status.contains(&id), "{status}");
    }
    // The registry is locked: without a credential etcd refuses even a read.
    let (rc, out) = shells[2].run_once(
        "etcdctl --endpoints https://10.0.0.1:2379 --insecure-skip-tls-verify get --prefix /hms/",
        Duration::from_secs(20),
    );
    assert_ne!(
        rc,
        Some(0),
        "etcd answered a client without a certificate: {out}"
    );

    for shell in shells.into_iter().rev() {
        shell.stop();
    }
}
