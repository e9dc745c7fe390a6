//! The connections curve: one host (an agent in its cgroup with a backend there, as in the
//! one-host bench), and N = 100 -> 8,000 client connections held open through it by
//! `xtask bench-hold` (each a real proxied connection: it carried a request). At each point:
//! the agent's RSS (and so memory per connection), its open fds, and the latency of 1000 rps
//! (`bench-load`, 16 more connections) while the N are idle, and again while all N carry
//! requests too (round-robin, 1000 rps). The holder's `check` at the end proves the N
//! connections were still open and answering.
//!
//! The agent's fd limit: its outbound cap is a fifth of RLIMIT_NOFILE (`limits`), so at this
//! machine's 20,000 it admits 4,000 outbound connections and sheds the oldest idle one
//! beyond; this curve starts the agent with FD_LIMIT so 8,000 (16,000 fds) fit, and reports
//! the cap beside the numbers. Owns the procedure and its numbers.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::bench_env::{
    self, Agent, AgentSpec, BenchCgroup, Bins, CLIENT_CORE, Place, Proc, SERVICE, rss_mb,
};
use crate::interrupt;

/// RLIMIT_NOFILE for this curve's agent (see the module comment).
pub const FD_LIMIT: u64 = 50_000;

pub struct Plan {
    pub points: Vec<usize>,
    pub duration: Duration,
}

struct OneHost {
    agent: Agent,
    _backend: Proc,
    cgroup: BenchCgroup,
}

/// The holder process, stopped on drop.
struct Holder {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Holder {
    fn start(bins: &Bins, cgroup: &Path, n: usize, log: &Path) -> anyhow::Result<Holder> {
        let place = Place {
            core: Some(CLIENT_CORE),
            netns: None,
            cgroup: Some(cgroup),
        };
        let mut cmd = bench_env::command(&place, &bins.xtask)?;
        cmd.args(["bench-hold", "--url"])
            .arg(format!("http://{SERVICE}.svc/hold"))
            .args(["--connections", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?);
        let mut child = cmd.spawn().context("starting xtask bench-hold")?;
        let stdin = child.stdin.take().context("holder stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("holder stdout")?);
        let mut h = Holder {
            child,
            stdin,
            stdout,
        };
        let open = h.line().with_context(|| {
            format!(
                "bench-hold did not open {n} connections: {}",
                crate::proc::tail(log, 10)
            )
        })?;
        if open["open"].as_u64() != Some(n as u64) {
            bail!("bench-hold: {open}");
        }
        Ok(h)
    }

    fn line(&mut self) -> anyhow::Result<Value> {
        let mut l = String::new();
        if self.stdout.read_line(&mut l)? == 0 {
            bail!("bench-hold exited");
        }
        Ok(serde_json::from_str(&l)?)
    }

    fn command(&mut self, cmd: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

fn setup(bins: &Bins, work: &Path, sock_dir: &Path) -> anyhow::Result<OneHost> {
    let cgroup = BenchCgroup::create(&format!("hms-bench-{}-conn", std::process::id()))?;
    // The agent inherits our limit: raise ours (root may) for the spawn, then put it back.
    let old = nofile();
    set_nofile(FD_LIMIT, FD_LIMIT.max(old.1));
    let agent = Agent::start(
        bins,
        AgentSpec {
            name: "conn",
            cgroup: &cgroup.path,
            netns: None,
            work,
            sock_dir,
            extra: vec![],
            inside_cgroup: true,
        },
    );
    set_nofile(old.0, old.1.max(FD_LIMIT));
    let agent = agent?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, bench_env::free_port()?));
    let backend =
        bench_env::start_backend(bins, None, Some(&cgroup.path), addr, &work.join("backend-conn.log"))?;
    agent.deploy(
        work,
        &format!("name: {SERVICE}\nport: {}\npolicy: allow_from_any\n", addr.port()),
    )?;
    Ok(OneHost {
        agent,
        _backend: backend,
        cgroup,
    })
}

fn nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (lim.rlim_cur, lim.rlim_max)
}

fn set_nofile(soft: u64, hard: u64) {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        eprintln!(
            "bench: could not set RLIMIT_NOFILE {soft}/{hard}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `bench-load` at 1000 rps for `d` inside the agent's cgroup.
fn load_1000(bins: &Bins, cgroup: &Path, d: Duration, label: &str) -> anyhow::Result<Value> {
    let place = Place {
        core: Some(CLIENT_CORE),
        netns: None,
        cgroup: Some(cgroup),
    };
    let mut cmd = bench_env::command(&place, &bins.xtask)?;
    cmd.args(["bench-load", "--url"])
        .arg(format!("http://{SERVICE}.svc/conns/{label}"))
        .args(["--rate", "1000", "--duration"])
        .arg(format!("{}ms", d.as_millis()))
        .stdin(Stdio::null());
    let out = cmd.output().context("running bench-load")?;
    if !out.status.success() {
        bail!(
            "bench-load failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("bench-load's JSON")
}

pub fn run(bins: &Bins, work: &Path, sock_dir: &Path, plan: &Plan) -> anyhow::Result<Vec<Value>> {
    let host = setup(bins, work, sock_dir)?;
    let pid = host.agent.pid;
    let cap = host.agent.ctl_json(&["status"]).ok().and_then(|s| {
        s["limits"]["listeners"]
            .as_array()?
            .iter()
            .find(|l| l["listener"] == "outbound")?["cap"]
            .as_u64()
    });
    // Warm-up (first connections, pools, allocator), then the baseline.
    let warm = load_1000(bins, &host.cgroup.path, Duration::from_secs(1), "warmup")?;
    if warm["completed"].as_u64().unwrap_or(0) == 0 {
        bail!("warm-up through the agent failed: {warm}\n{}", host.agent.log());
    }
    let rss0 = rss_mb(pid);
    let fds0 = fds(pid);
    eprintln!("bench: connections: agent RSS {rss0:?} MB, {fds0:?} fds, outbound cap {cap:?}");
    let mut points = Vec::new();
    for &n in &plan.points {
        interrupt::check()?;
        let mut holder = Holder::start(
            bins,
            &host.cgroup.path,
            n,
            &work.join(format!("hold-{n}.log")),
        )?;
        let rss = rss_mb(pid);
        let fds_n = fds(pid);
        let idle = load_1000(bins, &host.cgroup.path, plan.duration, &format!("idle-{n}"))?;
        holder.command(&format!("active 1000 {}", plan.duration.as_secs_f64()))?;
        let active = load_1000(bins, &host.cgroup.path, plan.duration, &format!("active-{n}"))?;
        let active_hold = holder.line()?;
        let rss_active = rss_mb(pid);
        holder.command("check")?;
        let check = holder.line()?;
        let per_conn_kb = match (rss, rss0) {
            (Some(a), Some(b)) => json!((a - b) * 1024.0 / n as f64),
            _ => Value::Null,
        };
        let point = json!({
            "connections": n,
            "held": check["answered"],
            "held_failed": check["failed"],
            "agent_rss_mb": rss,
            "agent_rss_mb_active": rss_active,
            "rss_kb_per_connection": per_conn_kb,
            "agent_fds": fds_n,
            "agent_fds_baseline": fds0,
            "outbound_cap": cap,
            "idle": summary(&idle),
            "active": summary(&active),
            "active_holder": active_hold,
        });
        eprintln!("bench: connections {n}: {point}");
        points.push(point);
        drop(holder);
        // The agent sees the N closes; give it a moment so the next point starts from a
        // settled baseline (not a synchronisation: the next point measures its own state).
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(points)
}

fn summary(load: &Value) -> Value {
    let failed: u64 = ["errors", "non_2xx", "timeouts", "unsent"]
        .iter()
        .map(|k| load[*k].as_u64().unwrap_or(0))
        .sum();
    json!({
        "completed": load["completed"],
        "failed": failed,
        "p50_us": load["p50_us"],
        "p99_us": load["p99_us"],
    })
}
