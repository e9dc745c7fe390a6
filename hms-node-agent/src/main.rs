//! `hms-node-agent`: the per-host daemon (`run`), the tool that removes every trace of it
//! from the kernel (`cleanup`), the kernel feature check (`probe`) and installing it as a
//! systemd service (`install`, `uninstall`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hms_node_agent::config::{AgentConfig, LogFormat, RunArgs};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "hms-node-agent",
    version,
    about = "HMS per-host agent: transparent service mesh for plain Linux hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: eBPF redirect, DNS responder, node proxy, registry, admin API.
    Run(Box<RunArgs>),
    /// Detach every HMS program pinned under the pin directory and remove the pins.
    Cleanup {
        /// bpffs directory the agent pinned into.
        #[arg(long, default_value = "/sys/fs/bpf/hms")]
        pin_dir: PathBuf,
    },
    /// Make a new multi-host mesh on this host, before etcd starts: the mesh CA, this
    /// host's certificate, etcd's server certificate and the operator's etcd credential;
    /// prints how to start etcd with them.
    InitMesh(hms_node_agent::init_mesh::InitMeshArgs),
    /// Check that this kernel has every feature HMS needs; exits 1 if one is missing.
    Probe {
        /// cgroup v2 directory the hooks would attach to [default: the cgroup v2 root].
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// bpffs directory the agent would pin into.
        #[arg(long, default_value = "/sys/fs/bpf/hms")]
        pin_dir: PathBuf,
    },
    /// Install the binaries, /etc/hms/agent.yaml and the systemd units; enable them where
    /// systemd runs.
    Install(Box<hms_node_agent::install::InstallArgs>),
    /// Stop and remove everything `install` put in place, and run `cleanup`.
    Uninstall(hms_node_agent::install::UninstallArgs),
    /// The Debian package's units and conffile, written under DIR (`cargo xtask deb`).
    #[command(hide = true)]
    PackageFiles {
        #[arg(long)]
        out: PathBuf,
    },
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: under systemd stderr is the journal, where escape
        // codes would show up as `[2m` noise in `journalctl -u hms-node-agent`.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The settings in force; `systemctl reload` resolves the same arguments again.
fn remember_and_resolve(args: RunArgs) -> anyhow::Result<AgentConfig> {
    hms_node_agent::service_manager::remember_args(&args);
    AgentConfig::resolve(args)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => match remember_and_resolve(*args) {
            Ok(config) => {
                init_logs(config.log_format);
                // An upgrade's successor leaves its predecessor's process tree (a fork), and
                // reads (and unsets) systemd's LISTEN_*, before any thread exists.
                let detached = if config.takeover {
                    hms_node_agent::service_manager::leave_predecessor_tree()
                } else {
                    Ok(())
                };
                detached
                    .and_then(|()| hms_node_agent::listeners::from_systemd())
                    .and_then(|passed| {
                        tokio::runtime::Builder::new_multi_thread()
                            .enable_all()
                            .build()
                            .map_err(anyhow::Error::from)
                            .and_then(|rt| rt.block_on(hms_node_agent::agent::run(config, passed)))
                    })
            }
            Err(e) => Err(e),
        },
        Command::Cleanup { pin_dir } => {
            init_logs(LogFormat::Text);
            hms_node_agent::redirect::cleanup(&pin_dir).map(|report| {
                println!("{report}");
            })
        }
        Command::Probe { cgroup, pin_dir } => {
            let checks = hms_node_agent::probe::run(cgroup.as_deref(), &pin_dir);
            print!("{}", hms_node_agent::probe::Table(&checks));
            hms_node_agent::probe::summarize(&checks)
        }
        Command::InitMesh(args) => {
            hms_node_agent::init_mesh::run(&args).map(|report| print!("{report}"))
        }
        Command::Install(args) => {
            init_logs(LogFormat::Text);
            hms_node_agent::install::install(&args).map(|report| print!("{report}"))
        }
        Command::PackageFiles { out } => {
            hms_node_agent::install::stage_package(&out).map(|files| {
                for f in files {
                    println!("{f}");
                }
            })
        }
        Command::Uninstall(args) => {
            init_logs(LogFormat::Text);
            hms_node_agent::install::uninstall(&args).map(|report| print!("{report}"))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hms-node-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
