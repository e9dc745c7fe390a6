//! `cargo xtask`: the project's developer commands. Owns argument parsing and dispatch only;
//! each command lives in its own module (`setup`, `test`, `demo`, `vmtest`, `bench`).

mod bench;
mod bench_backend;
mod bench_env;
mod bench_gateway;
mod bench_load;
mod bench_scale;
mod bench_scale_conns;
mod bench_scale_hold;
mod bench_scale_hosts;
mod bench_scale_mesh;
mod bench_scale_plot;
mod bench_scale_rate;
mod bench_scale_services;
mod cgroup;
mod deb;
mod demo;
mod demo_egress;
mod demo_gateway;
mod interrupt;
mod loopback_ports;
// The older release the upgrade tests start from: one definition for vm-tests and the
// system VM.
#[path = "../../vm-tests/src/old_release_build.rs"]
mod old_release_build;
mod proc;
mod setup;
mod test;
mod tools;
#[cfg(test)]
mod tools_guard;
mod vm_cpio;
mod vm_init;
mod vm_kernel;
mod vm_qemu;
mod vm_rootfs;
mod vm_system;
mod vmtest;
mod workspace;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "HMS developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and running HMS needs (apt packages, nightly rust-src,
    /// bpf-linker); skips whatever is already present.
    Setup,
    /// Run setup, build every binary, run every test (the vm-tests need root), then the
    /// vm-tests again in a VM on Debian's 6.1 kernel and the .deb on a real Debian 12 system
    /// in a second VM; print one summary.
    Test {
        /// Skip the VM run (the vm-tests still run on this host's kernel).
        #[arg(long)]
        no_vm: bool,
        /// Skip only `vm-test --system` (the .deb on a real Debian 12 system under systemd,
        /// run after the kernel VM; about 7 minutes under emulation).
        #[arg(long)]
        no_system: bool,
        /// Passed to the test binaries, e.g. a name filter: `cargo xtask test -- dns`.
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Run the vm-tests inside a QEMU VM (no network) on Debian's 6.1 kernel, downloaded
    /// once into target/vm/; the console is streamed and kept in target/vm/console.log.
    VmTest {
        /// Instead: the hms package on a real Debian 12 system (debootstrap root, systemd as
        /// PID 1): install, restart, kill, upgrade under load, reboot, purge.
        #[arg(long)]
        system: bool,
        /// Passed to the test binaries in the VM, e.g. a name filter: `cargo xtask vm-test -- dns`.
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Build the Debian package target/deb/hms_<version>_amd64.deb (release binaries,
    /// systemd units, /etc/hms/agent.yaml as a conffile, maintainer scripts) and run lintian
    /// on it.
    Deb {
        /// Package the debug build (stripped) instead of a release build.
        #[arg(long)]
        debug: bool,
        /// Package version [default: the workspace's].
        #[arg(long)]
        version: Option<String>,
        /// Package hms-node-agent and hms-ctl from this directory instead.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Skip lintian.
        #[arg(long)]
        no_lintian: bool,
    },
    /// Run the seed story on this host: agent, four services in a demo cgroup, an unmodified
    /// curl calling payments-svc.svc and notify-svc.svc; tears everything down afterwards.
    Demo {
        /// Exit after the story instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Measure the mesh against a direct call and HAProxy in one run: added latency
    /// (p50/p90/p99) at fixed rates, throughput at max, agent CPU per 1000 requests and peak
    /// RSS; one host and two hosts (mTLS). Needs root. See docs/bench.md.
    Bench {
        /// About two minutes: 1000 rps and max only, two 5 s repetitions.
        #[arg(long)]
        quick: bool,
        /// `table` (markdown) or `json`.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Only these scenarios (repeatable or comma-separated; each brings its baseline):
        /// direct, haproxy, hms-one-host, hms-one-host-sk-msg, direct-two-hosts, hms-two-hosts.
        #[arg(long, value_delimiter = ',')]
        scenario: Vec<String>,
        /// Length of each measured run, e.g. 5s or 500ms [default: 10s, --quick 5s].
        #[arg(long, value_parser = bench::parse_duration)]
        duration: Option<Duration>,
        /// Repetitions of each scenario and rate [default: 3, --quick 2].
        #[arg(long)]
        reps: Option<u32>,
        /// Use hms-node-agent and hms-ctl from this directory instead of building release ones.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Cost curves instead (services, hosts, connections, request rate), plotted as SVG
        /// into docs/ (with --quick: into target/hms-bench/scale/). See docs/bench.md.
        #[arg(long)]
        scale: bool,
        /// Only these curves with --scale (comma-separated): services, hosts, connections, rate.
        #[arg(long, value_delimiter = ',')]
        curve: Vec<String>,
        /// The services curve's points with --scale (comma-separated counts)
        /// [default: 10,100,1000,3000; --quick 10,30,100,300].
        #[arg(long, value_delimiter = ',')]
        services: Vec<usize>,
        /// Fixed rates instead of the default ones (comma-separated numbers or `max`); the
        /// scale bench's rate curve uses it.
        #[arg(long, value_delimiter = ',', hide = true)]
        rates: Vec<String>,
    },
    /// Redraw the scale bench's plots and tables from a saved report (internal).
    #[command(hide = true)]
    BenchScaleReplot {
        report: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long)]
        stem: String,
    },
    /// The bench's 1 KiB HTTP backend (internal).
    #[command(hide = true)]
    BenchBackend {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// The bench's load generator (internal): prints one JSON line.
    #[command(hide = true)]
    /// The scale bench's connection holder (internal): opens N keep-alive connections,
    /// then obeys `check` / `active RATE SECONDS` lines on stdin.
    #[command(hide = true)]
    BenchHold {
        #[arg(long)]
        url: String,
        #[arg(long)]
        connections: usize,
        /// Drop to this uid after start (a user of its own).
        #[arg(long)]
        uid: Option<u32>,
    },
    BenchLoad {
        #[arg(long)]
        url: String,
        /// Requests per second, or `max`.
        #[arg(long)]
        rate: String,
        #[arg(long, value_parser = bench::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = bench::CONNECTIONS)]
        connections: usize,
        /// For https URLs: the CA certificate (PEM) the server's must chain to.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Dial this address instead of resolving the URL's host (SNI and Host stay the URL's).
        #[arg(long)]
        connect_to: Option<SocketAddr>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Test {
            no_vm,
            no_system,
            test_args,
        } => test::run(&test_args, !no_vm, !no_system),
        Command::VmTest { system: true, .. } => vm_system::run(),
        Command::VmTest { test_args, .. } => vmtest::run(&test_args),
        Command::Deb {
            debug,
            version,
            bin_dir,
            no_lintian,
        } => deb::build(&deb::Options {
            release: !debug,
            version,
            bin_dir,
            pre_notify: false,
            out_dir: None,
            compress: true,
            lintian: !no_lintian,
        })
        .map(|_| ()),
        Command::Demo { once } => demo::run(once),
        Command::Bench {
            quick,
            output,
            duration,
            bin_dir,
            scale,
            curve,
            services,
            ..
        } if scale => bench_scale::run(bench_scale::Options {
            quick,
            json: output == Output::Json,
            bin_dir,
            curves: curve,
            duration,
            services,
        }),
        Command::Bench {
            quick,
            output,
            scenario,
            duration,
            reps,
            bin_dir,
            rates,
            ..
        } => bench::run(bench::Options {
            quick,
            json: output == Output::Json,
            scenarios: scenario,
            duration,
            reps,
            bin_dir,
            rates,
            loadavg_at_start: None,
        }),
        Command::BenchHold {
            url,
            connections,
            uid,
        } => bench_scale_hold::run(&url, connections, uid),
        Command::BenchScaleReplot {
            report,
            out_dir,
            stem,
        } => bench_scale::replot(&report, &out_dir, &stem),
        Command::BenchBackend { listen } => bench_backend::run(listen),
        Command::BenchLoad {
            url,
            rate,
            duration,
            connections,
            ca,
            connect_to,
        } => match rate.as_str() {
            "max" => Ok(None),
            r => r
                .parse::<u32>()
                .map(Some)
                .map_err(|_| anyhow::anyhow!("--rate: a number or `max`, not `{r}`")),
        }
        .and_then(|rate| {
            bench_load::run(&bench_load::LoadArgs {
                url,
                rate,
                duration,
                connections,
                ca,
                connect_to,
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
