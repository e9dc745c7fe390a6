//! The request-rate curve: CPU per request of the agent (one host, with the default sk_msg
//! bypass; two hosts, both agents) and of HAProxy at the same fixed rates from 1000 rps up,
//! and at max. It runs the existing bench (`xtask bench -o json`, same environments, load
//! generator, backend, pinning and path checks) with the curve's rates, as a child process,
//! and takes its numbers: nothing of that bench is re-implemented here.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::bench_env::Bins;

pub struct Plan {
    /// Fixed rates; max is always measured after them.
    pub rates: Vec<u32>,
    pub duration: Duration,
    pub reps: u32,
}

pub const SCENARIOS: [&str; 3] = ["haproxy", "hms-one-host-sk-msg", "hms-two-hosts"];

/// The curve's points, and the child bench's report (for its pid and machine).
pub fn run(bins: &Bins, work: &Path, plan: &Plan) -> anyhow::Result<(Vec<Value>, Value)> {
    let bin_dir = bins.agent.parent().context("agent's directory")?;
    let mut rates: Vec<String> = plan.rates.iter().map(|r| r.to_string()).collect();
    rates.push("max".into());
    let mut cmd = crate::tools::workspace_binary(&bins.xtask);
    cmd.arg("bench")
        .args(SCENARIOS.iter().flat_map(|s| ["--scenario", s]))
        .arg("--rates")
        .arg(rates.join(","))
        .arg("--duration")
        .arg(format!("{}ms", plan.duration.as_millis()))
        .args(["--reps", &plan.reps.to_string(), "-o", "json", "--bin-dir"])
        .arg(bin_dir)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(work.join("rate-bench.log"))?);
    eprintln!(
        "bench: rate curve: `xtask bench --rates {}` (log: {})",
        rates.join(","),
        work.join("rate-bench.log").display()
    );
    let out = cmd.output().context("running xtask bench")?;
    // A run whose path check failed makes the bench exit 1 after printing its report: keep
    // the report (each point carries `path_ok`); fail only without one.
    let report: Value = match serde_json::from_slice(&out.stdout) {
        Ok(r) => r,
        Err(e) => bail!(
            "the rate curve's bench failed ({}, no report: {e}):\n{}",
            out.status,
            crate::proc::tail(&work.join("rate-bench.log"), 30)
        ),
    };
    if !out.status.success() {
        eprintln!(
            "bench: the rate curve's bench exited {} (a path check failed; see path_ok)",
            out.status
        );
    }
    let at = |sc: &str, rate: Option<u32>| -> Option<Value> {
        report["scenarios"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == sc)?["rates"]
            .as_array()?
            .iter()
            .find(|r| r["rate"].as_u64().map(|x| x as u32) == rate)
            .cloned()
    };
    let mut points = Vec::new();
    for rate in plan.rates.iter().map(|r| Some(*r)).chain([None]) {
        let mut p = json!({ "rate": rate.map_or(json!("max"), |r| json!(r)) });
        for sc in SCENARIOS {
            let Some(s) = at(sc, rate) else { continue };
            let completed: u64 = s["runs"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .map(|r| r["load"]["completed"].as_u64().unwrap_or(0))
                        .sum()
                })
                .unwrap_or(0);
            p[sc] = json!({
                "rps": s["rps"],
                "cpu_s_per_1000": s["proxy_cpu_s_per_1000_req"],
                "p50_us": s["p50_us"],
                "p99_us": s["p99_us"],
                "failed": s["failed"],
                "completed": completed,
                "path_ok": s["path_ok"],
            });
        }
        eprintln!("bench: rate {p}");
        points.push(p);
    }
    Ok((
        points,
        json!({"pid": report["pid"], "command": report["command"]}),
    ))
}
