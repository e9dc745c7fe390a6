//! The services curve: 10 -> 10,000 services deployed on host 1 of a three-host mesh, and at
//! each point what a new deploy costs to become resolvable (on host 1 and on every other
//! host), the agents' memory, DNS answer latency and the CPU the watching hosts spend on
//! registry changes.
//!
//! Every service is really deployed (the admin API's `deploy`, as `hms-ctl deploy` sends
//! it, over a few kept-open admin connections at once) and really resolved by DNS on every
//! host before the point counts; the point records how many resolved. Owns the procedure
//! and its numbers; the mesh is `bench_scale_mesh`'s.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::bench_env::{cpu_seconds, rss_mb};
use crate::bench_scale::{DnsIds, pct};
use crate::bench_scale_mesh::{AdminConn, Host, ScaleMesh, dns_socket, resolve};
use crate::interrupt;

/// Admin connections deploying at once (the agent serves each connection in order; with
/// many in flight its watch delivers several changes per response, as under real churn).
const DEPLOYERS: usize = 32;

pub struct Plan {
    pub points: Vec<usize>,
    /// Single deploys timed at each point.
    pub probes: usize,
    /// DNS queries timed at each point.
    pub dns_queries: usize,
}

/// Deploys `scale-<i>` for i in `from..to` on host 1 over `DEPLOYERS` connections.
fn deploy_batch(host: &Host, from: usize, to: usize) -> anyhow::Result<()> {
    let socket = &host.agent.socket;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..DEPLOYERS)
            .map(|w| {
                s.spawn(move || -> anyhow::Result<()> {
                    let mut conn = AdminConn::open(socket)?;
                    for i in (from..to).filter(|i| i % DEPLOYERS == w) {
                        interrupt::check()?;
                        conn.deploy(&format!("scale-{i}"), 10_000 + (i % 50_000) as u16)
                            .with_context(|| format!("deploying scale-{i}"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("deploy thread panicked"))
    })
}

/// Waits until every host's registry view holds at least `n` services (`status`).
fn wait_view(mesh: &ScaleMesh, n: usize, deadline: Instant) -> anyhow::Result<()> {
    for h in &mesh.hosts {
        let mut conn = AdminConn::open(&h.agent.socket)?;
        loop {
            interrupt::check()?;
            let have = conn.call(&json!({"op": "status"}))?["services"]
                .as_u64()
                .unwrap_or(0) as usize;
            if have >= n {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} sees {have} of {n} services:\n{}", h.node, h.agent.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// How many of `names` resolve on each host (through its agent's DNS), retrying the missing
/// ones until `deadline`.
fn count_resolved(
    mesh: &ScaleMesh,
    names: &[String],
    ids: &DnsIds,
    deadline: Instant,
) -> anyhow::Result<Vec<usize>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = mesh
            .hosts
            .iter()
            .map(|h| {
                s.spawn(move || -> anyhow::Result<usize> {
                    let sock = dns_socket(&h.netns)?;
                    let mut missing: Vec<&String> = names.iter().collect();
                    loop {
                        let mut still = Vec::new();
                        for n in missing {
                            if resolve(&sock, n, ids.next())?.is_none() {
                                still.push(n);
                            }
                        }
                        missing = still;
                        if missing.is_empty() || Instant::now() > deadline {
                            return Ok(names.len() - missing.len());
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("resolve thread panicked"))
            .collect()
    })
}

/// One deploy on `deployer` timed until `name` resolves on each of `hosts`: the time on the
/// deployer and the slowest of the others (ms), polled every millisecond.
pub fn probe(
    hosts: &[&Host],
    deployer: usize,
    name: &str,
    port: u16,
    ids: &DnsIds,
) -> anyhow::Result<(f64, f64)> {
    let socks: Vec<_> = hosts
        .iter()
        .map(|h| dns_socket(&h.netns))
        .collect::<anyhow::Result<_>>()?;
    let mut conn = AdminConn::open(&hosts[deployer].agent.socket)?;
    let t0 = Instant::now();
    let times: Vec<anyhow::Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = socks
            .iter()
            .map(|sock| {
                s.spawn(move || -> anyhow::Result<f64> {
                    let deadline = t0 + Duration::from_secs(30);
                    loop {
                        // An agent too busy to answer within the resolver's tries (24 agents
                        // on one core) is "not resolvable yet", not a failed run.
                        if resolve(sock, name, ids.next()).ok().flatten().is_some() {
                            return Ok(t0.elapsed().as_secs_f64() * 1e3);
                        }
                        if Instant::now() > deadline {
                            bail!("{name} not resolvable in 30 s");
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        // Deploy after the pollers started: they see NXDOMAIN until it lands.
        let deployed = conn.deploy(name, port);
        let times = handles
            .into_iter()
            .map(|h| h.join().expect("probe thread panicked"))
            .collect();
        deployed.map(|()| times)
    })?;
    let times: Vec<f64> = times.into_iter().collect::<anyhow::Result<_>>()?;
    let same = times[deployer];
    let others = times
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != deployer)
        .map(|(_, t)| *t)
        .fold(0.0, f64::max);
    Ok((same, others))
}

pub fn run(mesh: &ScaleMesh, plan: &Plan, ids: &DnsIds) -> anyhow::Result<Vec<Value>> {
    let mut deployed = 0usize;
    let mut total = 0usize; // everything deployed so far, probes included
    let mut points = Vec::new();
    let watchers: Vec<u32> = mesh.hosts[1..].iter().map(|h| h.agent.pid).collect();
    for &n in &plan.points {
        interrupt::check()?;
        let added = n.saturating_sub(deployed);
        let cpu_before: Vec<f64> = watchers.iter().filter_map(|p| cpu_seconds(*p)).collect();
        let t = Instant::now();
        deploy_batch(&mesh.hosts[0], deployed, n)?;
        let batch_s = t.elapsed().as_secs_f64();
        total += added;
        let deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 50);
        wait_view(mesh, total, deadline)?;
        let seen_s = t.elapsed().as_secs_f64();
        let cpu_after: Vec<f64> = watchers.iter().filter_map(|p| cpu_seconds(*p)).collect();
        let watch_cpu = cpu_after
            .iter()
            .zip(&cpu_before)
            .map(|(a, b)| a - b)
            .fold(0.0, f64::max);
        deployed = n;
        let names: Vec<String> = (0..n).map(|i| format!("scale-{i}")).collect();
        let resolved = count_resolved(mesh, &names, ids, deadline)?;
        eprintln!(
            "bench: services {n}: deployed +{added} in {batch_s:.1} s, every view has them at {seen_s:.1} s, resolved per host {resolved:?}"
        );
        let hosts: Vec<&Host> = mesh.hosts.iter().collect();
        let (mut same, mut every) = (Vec::new(), Vec::new());
        for k in 0..plan.probes {
            interrupt::check()?;
            let (s, o) = probe(
                &hosts,
                0,
                &format!("probe-{n}-{k}"),
                30_000 + (k % 1000) as u16,
                ids,
            )?;
            same.push(s);
            every.push(o);
            total += 1;
        }
        let (dns, answered) = dns_latency(&mesh.hosts[0], &names, plan.dns_queries, ids)?;
        points.push(json!({
            "services": n,
            "services_total": total,
            "deployed_in_batch": added,
            "batch_s": batch_s,
            "batch_visible_everywhere_s": seen_s,
            "resolved_per_host": resolved,
            "probes": same.len(),
            "deploy_same_host_ms": {"p50": pct(&mut same, 50.0), "p99": pct(&mut same, 99.0)},
            "deploy_every_host_ms": {"p50": pct(&mut every, 50.0), "p99": pct(&mut every, 99.0)},
            "rss_mb_deployer": rss_mb(mesh.hosts[0].agent.pid),
            "rss_mb_watcher": rss_mb(mesh.hosts[1].agent.pid),
            "dns_us": {"p50": pct(&mut dns.clone(), 50.0), "p99": pct(&mut dns.clone(), 99.0)},
            "dns_answered": answered,
            "watch_cpu_s": watch_cpu,
            "etcd_keys": mesh.etcd_keys().ok(),
            "etcd_db_mb": mesh.etcd_db_bytes().map(|b| b / 1e6),
            "watch_cpu_ms_per_change": if added > 0 { json!(watch_cpu * 1e3 / added as f64) } else { Value::Null },
        }));
        eprintln!("bench: services {n}: {}", points.last().expect("pushed"));
    }
    Ok(points)
}

/// `count` queries of random deployed names on host `h`, one at a time: latencies (µs) of
/// the ones answered with an address, and how many were.
fn dns_latency(
    h: &Host,
    names: &[String],
    count: usize,
    ids: &DnsIds,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let sock = dns_socket(&h.netns)?;
    let mut lat = Vec::with_capacity(count);
    for k in 0..count {
        // A spread over the whole table, not one hot name (Knuth's multiplicative hash).
        let name = &names[(k.wrapping_mul(2_654_435_761)) % names.len()];
        let t = Instant::now();
        if resolve(&sock, name, ids.next())?.is_some() {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let answered = lat.len();
    Ok((lat, answered))
}
