//! The hosts curve: the mesh grown 3 -> 24 hosts (on top of whatever the services curve left
//! deployed), and at each point how long a deploy takes to be resolvable on every host, what
//! etcd spends (CPU, keys) and how long a host's death takes to leave every view.
//!
//! At each point N, host N+1 is the one that dies: it deploys instances of its own, every
//! other host must see them, then its agent is SIGKILLed (no deregistration: its lease runs
//! out in etcd) and the N survivors are polled until none lists its instances. Deploy probes
//! on the survivors run meanwhile (round-robin over deployers). Owns the procedure and its
//! numbers; the mesh is `bench_scale_mesh`'s.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

use crate::bench_scale::{DnsIds, pct};
use crate::bench_scale_mesh::{AdminConn, Host, ScaleMesh};
use crate::bench_scale_services::probe;
use crate::interrupt;

/// Services the dying host runs.
const VICTIM_SERVICES: usize = 2;

pub struct Plan {
    pub points: Vec<usize>,
    pub probes: usize,
}

/// Does `conn`'s host list an instance of `service` on `node`?
fn lists(conn: &mut AdminConn, service: &str, node: &str) -> anyhow::Result<bool> {
    let d = match conn.call(&json!({"op": "describe", "name": service})) {
        Ok(d) => d,
        // Not (or no longer) known at all.
        Err(_) => return Ok(false),
    };
    Ok(d["service"]["instances"]
        .as_array()
        .or(d["instances"].as_array())
        .is_some_and(|is| is.iter().any(|i| i["node"] == node)))
}

/// The points measured; a point that fails ends the curve, keeping the ones before it.
pub fn run(mesh: &mut ScaleMesh, plan: &Plan, ids: &DnsIds) -> (Vec<Value>, Option<anyhow::Error>) {
    let mut points = Vec::new();
    for &n in &plan.points {
        match point(mesh, plan, ids, n) {
            Ok(p) => points.push(p),
            Err(e) => return (points, Some(e.context(format!("at {n} hosts")))),
        }
    }
    (points, None)
}

fn point(mesh: &mut ScaleMesh, plan: &Plan, ids: &DnsIds, n: usize) -> anyhow::Result<Value> {
    {
        interrupt::check()?;
        let t = Instant::now();
        mesh.add_hosts(n + 1)?;
        let grow_s = t.elapsed().as_secs_f64();
        let victim_index = mesh.hosts.len() - 1;
        let victim_node = mesh.hosts[victim_index].node.clone();
        let services: Vec<String> = (0..VICTIM_SERVICES)
            .map(|k| format!("dies-{n}-{k}"))
            .collect();
        {
            let mut conn = AdminConn::open(&mesh.hosts[victim_index].agent.socket)?;
            for (k, s) in services.iter().enumerate() {
                conn.deploy(s, 40_000 + k as u16)?;
            }
        }
        // Every survivor sees the victim's instances before it dies.
        let deadline = Instant::now() + Duration::from_secs(30);
        for h in &mesh.hosts[..victim_index] {
            let mut conn = AdminConn::open(&h.agent.socket)?;
            for s in &services {
                while !lists(&mut conn, s, &victim_node)? {
                    interrupt::check()?;
                    if Instant::now() > deadline {
                        bail!("{} never listed {s} on {victim_node}", h.node);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let keys = mesh.etcd_keys()?;
        let etcd_cpu0 = mesh.etcd_cpu();
        let t_point = Instant::now();
        let victim = mesh.kill(victim_index);
        let killed = Instant::now();
        let survivors: Vec<&Host> = mesh.hosts.iter().collect();
        let (gone, probes) = std::thread::scope(|s| {
            let watcher = s.spawn(|| death_seen(&survivors, &services, &victim_node, killed));
            let mut same = Vec::new();
            let mut every = Vec::new();
            for k in 0..plan.probes {
                interrupt::check()?;
                let deployer = k % survivors.len();
                let (a, b) = probe(
                    &survivors,
                    deployer,
                    &format!("hosts-{n}-{k}"),
                    41_000 + k as u16,
                    ids,
                )?;
                same.push(a);
                every.push(a.max(b));
            }
            let gone = watcher.join().expect("death watcher panicked")?;
            anyhow::Ok((gone, (same, every)))
        })?;
        let wall = t_point.elapsed().as_secs_f64();
        let etcd_cpu = match (etcd_cpu0, mesh.etcd_cpu()) {
            (Some(a), Some(b)) => json!(b - a),
            _ => Value::Null,
        };
        drop(victim);
        let (mut same, mut every) = probes;
        let point = json!({
            "hosts": n,
            "hosts_up": mesh.hosts.len(),
            "grow_s": grow_s,
            "probes": every.len(),
            "deploy_same_host_ms": {"p50": pct(&mut same, 50.0), "p99": pct(&mut same, 99.0)},
            "deploy_every_host_ms": {"p50": pct(&mut every, 50.0), "p99": pct(&mut every, 99.0)},
            "etcd_keys": keys,
            "etcd_db_mb": mesh.etcd_db_bytes().map(|b| b / 1e6),
            "etcd_cpu_s": etcd_cpu,
            "etcd_cores": etcd_cpu.as_f64().map(|c| c / wall),
            "etcd_rss_mb": crate::bench_env::rss_mb(mesh.etcd.pid()),
            "death_left_every_view_s": gone.0,
            "death_seen_by": gone.1,
            "services_in_registry": mesh.hosts[0].agent.ctl_json(&["status"])
                .ok().and_then(|s| s["services"].as_u64()),
        });
        eprintln!("bench: hosts {n}: {point}");
        Ok(point)
    }
}

/// Polls every survivor until none lists the dead node's instances: seconds from the kill
/// until the last one dropped them, and how many did.
fn death_seen(
    hosts: &[&Host],
    services: &[String],
    node: &str,
    killed: Instant,
) -> anyhow::Result<(f64, usize)> {
    let mut conns: Vec<AdminConn> = hosts
        .iter()
        .map(|h| AdminConn::open(&h.agent.socket))
        .collect::<anyhow::Result<_>>()?;
    let mut gone_at: Vec<Option<f64>> = vec![None; hosts.len()];
    // The lease is 10 s; a generous bound beyond it.
    let deadline = killed + Duration::from_secs(60);
    loop {
        interrupt::check()?;
        for (i, c) in conns.iter_mut().enumerate() {
            if gone_at[i].is_some() {
                continue;
            }
            let mut listed = false;
            for s in services {
                listed |= lists(c, s, node)?;
            }
            if !listed {
                gone_at[i] = Some(killed.elapsed().as_secs_f64());
            }
        }
        let seen = gone_at.iter().filter(|g| g.is_some()).count();
        if seen == hosts.len() || Instant::now() > deadline {
            let last = gone_at.iter().flatten().copied().fold(0.0, f64::max);
            return Ok((last, seen));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
