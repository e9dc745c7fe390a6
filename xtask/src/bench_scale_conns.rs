//! The connections curve: one host (an agent in its cgroup with a backend there, as in the
//! one-host bench), and N = 100 -> 8,000 client connections held open through it by
//! `xtask bench-hold` (each a real proxied connection: it carried a request). At each point:
//! the agent's RSS (and so memory per connection), its open fds, and the latency of 1000 rps
//! (`bench-load`, 16 more connections) while the N are idle, and again while all N carry
//! requests too (round-robin, 1000 rps). The holder's `check` at the end proves the N
//! connections were still open and answering.
//!
//! The holder runs as its own user: the agent lets one user hold at most half its outbound
//! cap (`limits/cap.rs`), and the 1000 rps client is root.
//!
//! The agent runs at the fd limit it inherits (this machine's: 20,000; raising the hard
//! limit needs CAP_SYS_RESOURCE, which this machine's root lacks). Its outbound cap is a
//! fifth of that (`limits`): 4,000 outbound connections, beyond which it sheds the oldest
//! idle one. The curve goes past it on purpose and reports the limit, the cap, how many
//! connections the holder got answered at first and how many still answered at the end.
//! Owns the procedure and its numbers.

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

/// The holder's user (`nobody`): the agent lets one user hold half its outbound cap, so the
/// holder and the 1000 rps client must be different users (as a service and its callers are).
const HOLDER_UID: u32 = 65534;

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
    /// Its first line: `{"open": N, "refused": R}`.
    opened: Value,
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
            .args(["--uid", &HOLDER_UID.to_string()])
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
            opened: Value::Null,
        };
        let open = h.line().with_context(|| {
            format!(
                "bench-hold did not open {n} connections: {}",
                crate::proc::tail(log, 10)
            )
        })?;
        h.opened = open;
        Ok(h)
    }

    fn line(&mut self) -> anyhow::Result<Value> {
        let mut l = String::new();
        if self.stdout.read_line(&mut l)? == 0 {
            bail!("bench-hold exited");
        }
        Ok(serde_json::from_str(&l)?)
    }

    fn send(&mut self, cmd: &str) -> anyhow::Result<()> {
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
    )?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, bench_env::free_port()?));
    let backend = bench_env::start_backend(
        bins,
        None,
        Some(&cgroup.path),
        addr,
        &work.join("backend-conn.log"),
    )?;
    agent.deploy(
        work,
        &format!(
            "name: {SERVICE}\nport: {}\npolicy: allow_from_any\n",
            addr.port()
        ),
    )?;
    Ok(OneHost {
        agent,
        _backend: backend,
        cgroup,
    })
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
    let status = host.agent.ctl_json(&["status"]).unwrap_or_default();
    let fd_limit = status["limits"]["fd_limit"].clone();
    let cap = Some(&status).and_then(|s| {
        s["limits"]["listeners"]
            .as_array()?
            .iter()
            .find(|l| l["listener"] == "outbound")?["cap"]
            .as_u64()
    });
    // Warm-up (first connections, pools, allocator), then the baseline.
    let warm = load_1000(bins, &host.cgroup.path, Duration::from_secs(1), "warmup")?;
    if warm["completed"].as_u64().unwrap_or(0) == 0 {
        bail!(
            "warm-up through the agent failed: {warm}\n{}",
            host.agent.log()
        );
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
        // A run the agent refuses (its caps) is recorded in the point, not fatal.
        let or_error =
            |r: anyhow::Result<Value>| r.unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        let idle = or_error(load_1000(
            bins,
            &host.cgroup.path,
            plan.duration,
            &format!("idle-{n}"),
        ));
        holder.send(&format!("active 1000 {}", plan.duration.as_secs_f64()))?;
        let active = or_error(load_1000(
            bins,
            &host.cgroup.path,
            plan.duration,
            &format!("active-{n}"),
        ));
        let active_hold = holder.line()?;
        let rss_active = rss_mb(pid);
        holder.send("check")?;
        let check = holder.line()?;
        // Per connection the agent really holds (the cap may have refused some).
        let opened = holder.opened["open"].as_u64().unwrap_or(0).max(1) as f64;
        let per_conn_kb = match (rss, rss0) {
            (Some(a), Some(b)) => json!((a - b) * 1024.0 / opened),
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
            "fd_limit": fd_limit,
            "opened": holder.opened["open"],
            "refused": holder.opened["refused"],
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
        "error": load["error"],
        "completed": load["completed"],
        "failed": failed,
        "p50_us": load["p50_us"],
        "p99_us": load["p99_us"],
    })
}
