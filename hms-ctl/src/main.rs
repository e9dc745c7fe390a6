//! `hms-ctl`: the operator's CLI. Parses arguments, sends one request to the agent's admin
//! socket and prints the answer as a table or JSON. Holds no state and no mesh logic: every
//! rule (spec validation included) is enforced by the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use hms_ctl::api::{AgentStatus, DeployResult, Request, ServiceDetail, ServiceInfo, TapFilter};
use hms_ctl::client;

/// `println!` for everything hms-ctl shows: what the agent reports may carry a caller's or
/// another host's bytes, so control characters are escaped (newlines hms-ctl wrote stay).
macro_rules! say {
    () => { println!() };
    ($($t:tt)*) => { println!("{}", hms_ctl::escape::lines(&format!($($t)*))) };
}

mod gateway_cli;
mod run;
mod tap;
use hms_ctl::spec::{RateLimit, RouteSpec};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "hms-ctl",
    version,
    about = "Operate the HMS service mesh on this host"
)]
struct Cli {
    /// Agent admin socket [default: $HMS_SOCKET, else /run/hms/agent.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Output format of read commands.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    /// Like table, with more columns (tap: process, upstream, mesh decision, RTT).
    Wide,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Register a service from a spec file (YAML); callers reach it as NAME.svc.
    Deploy { file: PathBuf },
    /// Remove a service.
    Undeploy { name: String },
    /// List deployed services.
    List,
    /// Show one service: VIP, port, policy, limit, routes, instances.
    Describe { name: String },
    /// Show the agent: node, listeners, redirect, registry.
    Status,
    /// Live traffic to and from a service: caller, callee, method, path, status, latency.
    Tap {
        name: String,
        /// Show the last N recorded events [default: 10 unless --follow].
        #[arg(long)]
        last: Option<usize>,
        /// Keep streaming new events until Ctrl-C.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only calls from NAME to this service.
        #[arg(long)]
        to: Option<String>,
        /// Only calls from this service to NAME.
        #[arg(long)]
        from: Option<String>,
        /// Only responses of this class (2xx, 4xx, 5xx) or code (503).
        #[arg(long)]
        status: Option<String>,
        /// Show this request header (repeatable); authorization, cookie, set-cookie and
        /// proxy-authorization are always redacted.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
    /// Run a command as service NAME: inside its cgroup, so its calls carry its identity.
    Run {
        name: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// The agent process itself.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// The mesh's certificate authority (multi-host).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Hosts joining and leaving the mesh.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Which hosts may run a service (run on the CA host: placement is the operator's act).
    /// A host may deploy, and speak as, only the services placed on it.
    Place {
        service: String,
        /// Every host that may run it, comma-separated (replaces the earlier set).
        #[arg(long, value_delimiter = ',', required = true)]
        on: Vec<String>,
    },
    /// The mesh's door: listeners and routes from outside to `.svc` services.
    #[command(subcommand)]
    Gateway(gateway_cli::GatewayCommand),
    /// Per-route timeouts and retries of a service, by path prefix.
    #[command(subcommand)]
    Route(RouteCommand),
    /// Rate limit of a service on this host.
    #[command(subcommand)]
    Limit(LimitCommand),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make this host the mesh's CA (keys stay on this host, mode 0600).
    Init {
        #[arg(long)]
        trust_domain: String,
    },
    /// Add a new root, move every host onto it, then retire the old root; traffic keeps
    /// flowing throughout.
    Rotate,
    /// Write the CA's keys and state to FILE (one JSON document, mode 0600; refuses to
    /// overwrite). Keep it offline: it can issue any host's certificate.
    Backup {
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Make this host the CA again from a backup (a host without a CA, e.g. after losing
    /// the CA's host). `--force` replaces a CA that is here; it is moved aside first.
    Restore {
        file: std::path::PathBuf,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Tokens a host joins with (`hms-node-agent run --join-token-file FILE`).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Take a host out of the mesh (run on the CA host): its registry access, certificate
    /// renewals, records, placements and tunnels end on every host.
    Remove { node: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a single-use, expiring token for one new host (run on the CA's host).
    Create {
        /// The new host's name (its --node-name); a member's name is refused.
        #[arg(long)]
        node: String,
        /// How long it stays valid (e.g. 1h, 30m).
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        ttl: Duration,
        /// Write the token to this file (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Replace the running agent with the binary now on disk, without closing a listener:
    /// the successor takes the listening sockets and the pinned eBPF state over, the old
    /// agent drains its in-flight requests and exits. (Sending SIGUSR2 does the same.)
    Upgrade {
        /// Return at once instead of waiting until the successor answers.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum RouteCommand {
    /// Add or replace the settings for requests whose path starts with PATH_PREFIX.
    Set {
        name: String,
        path_prefix: String,
        /// Overall time a request may take, retries included (e.g. 2s, 500ms).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// Time one attempt may take before it is abandoned and, if allowed, retried.
        #[arg(long, value_parser = parse_duration)]
        per_try_timeout: Option<Duration>,
        /// Retries after a failure (0 to 10; default 1).
        #[arg(long)]
        retries: Option<u32>,
    },
    /// Remove the settings of one path prefix.
    Clear { name: String, path_prefix: String },
}

#[derive(Subcommand)]
enum LimitCommand {
    /// Limit the service to RATE (e.g. 50rps, 3000rpm) for all callers on this host.
    Set {
        name: String,
        rate: String,
        /// Requests that may pass at once [default: one second's worth].
        #[arg(long)]
        burst: Option<u32>,
        /// Excess requests that wait for a slot instead of getting 429 [default: 0].
        #[arg(long)]
        queue: Option<u32>,
    },
    /// Remove the service's rate limit.
    Clear { name: String },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    hms_ctl::spec::parse_duration(s)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let name = invoked_as(std::env::args_os().next());
    // The seed chapter's users type `hms-svc deploy ...`: one binary, two names, and help,
    // usage and errors speak with the name the user typed.
    let matches = Cli::command().name(name).bin_name(name).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `hms-svc` when called through that name (the link `install` and the build put next to
/// hms-ctl), else `hms-ctl`.
fn invoked_as(argv0: Option<std::ffi::OsString>) -> &'static str {
    let called = argv0
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if called == "hms-svc" {
        "hms-svc"
    } else {
        "hms-ctl"
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Gateway(g) = &cli.command
        && let Some(lines) = gateway_cli::local(g)?
    {
        for l in lines {
            println!("{l}");
        }
        return Ok(());
    }
    let socket = client::socket_path(cli.socket.as_deref());
    let request = match &cli.command {
        Command::Deploy { file } => Request::Deploy {
            file: file.display().to_string(),
            yaml: std::fs::read_to_string(file)
                .with_context(|| format!("reading spec file {}", file.display()))?,
        },
        Command::Gateway(g) => gateway_cli::request(g)?,
        Command::Undeploy { name } => Request::Undeploy { name: name.clone() },
        Command::List => Request::List,
        Command::Describe { name } => Request::Describe { name: name.clone() },
        Command::Tap {
            name,
            last,
            follow,
            to,
            from,
            status,
            headers,
        } => {
            let request = Request::Tap {
                filter: TapFilter {
                    service: name.clone(),
                    to: to.clone(),
                    from: from.clone(),
                    status: status.clone(),
                },
                last: Some(last.unwrap_or(if *follow { 0 } else { 10 })),
                follow: *follow,
            };
            let headers: Vec<String> = headers.iter().map(|h| h.to_ascii_lowercase()).collect();
            let printer = tap::Printer::new(name, cli.output, headers);
            printer.header();
            return client::stream(&socket, &request, |m| printer.message(m)).await;
        }
        Command::Agent(AgentCommand::Upgrade { no_wait }) => {
            let before: AgentStatus =
                serde_json::from_value(client::call(&socket, &Request::Status).await?)?;
            let data = client::call(&socket, &Request::Upgrade).await?;
            let successor = data["successor_pid"].as_u64().unwrap_or(0);
            if *no_wait {
                say!("upgrade started: successor pid {successor}");
                return Ok(());
            }
            // Done when the socket answers from the successor.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(v) = client::call(&socket, &Request::Status).await
                    && let Ok(now) = serde_json::from_value::<AgentStatus>(v)
                    && now.pid != before.pid
                {
                    say!(
                        "upgraded: agent pid {} -> {} (listeners handed over; the old agent drains and exits)",
                        before.pid,
                        now.pid
                    );
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    anyhow::bail!(
                        "the successor (pid {successor}) did not take over within 30 s; the old agent (pid {}) keeps serving. See the agent's log.",
                        before.pid
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Command::Ca(CaCommand::Init { trust_domain }) => {
            let v = client::call(
                &socket,
                &Request::CaInit {
                    trust_domain: trust_domain.clone(),
                },
            )
            .await?;
            say!(
                "this host is the mesh's CA for trust domain `{trust_domain}`; its identity is {}",
                v["spiffe_id"].as_str().unwrap_or("?")
            );
            say!(
                "next, for each other host: `hms-ctl node token create --node NAME --out FILE` here, copy FILE there, and start that host's agent with --registry (the same etcd) and --join-token-file FILE"
            );
            return Ok(());
        }
        Command::Ca(CaCommand::Rotate) => {
            client::call(&socket, &Request::CaRotate).await?;
            say!(
                "rotation started: a new root is trusted beside the old one; every host renews onto it, then the old root is retired (watch `hms-ctl status`)"
            );
            return Ok(());
        }
        Command::Ca(CaCommand::Backup { out }) => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            // Refuse before asking the agent, so no key leaves it for nothing.
            if out.exists() {
                anyhow::bail!(
                    "{} exists; a CA backup never overwrites a file: choose another --out",
                    out.display()
                );
            }
            let v = client::call(&socket, &Request::CaBackup).await?;
            let mut text = serde_json::to_string_pretty(&v)?;
            text.push('\n');
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .with_context(|| format!("creating {}", out.display()))?;
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", out.display()))?;
            say!(
                "wrote the CA of trust domain `{}` ({} files, root keys included) to {} (mode 0600); keep it offline, restore with `hms-ctl ca restore {}`",
                v["trust_domain"].as_str().unwrap_or("?"),
                v["files"].as_object().map_or(0, |f| f.len()),
                out.display(),
                out.display()
            );
            return Ok(());
        }
        Command::Ca(CaCommand::Restore { file, force }) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading the CA backup {}", file.display()))?;
            let backup: serde_json::Value = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a CA backup from `hms-ctl ca backup`",
                    file.display()
                )
            })?;
            let v = client::call(
                &socket,
                &Request::CaRestore {
                    backup,
                    force: *force,
                },
            )
            .await?;
            if let Some(aside) = v["replaced_ca_moved_to"].as_str() {
                say!("the CA that was on this host is kept at {aside}");
            }
            say!(
                "this host holds the mesh's CA again; its identity is {}. Restart its agent (`systemctl restart hms-node-agent`) so that its registry connection acts as the operator again (placement, admitting hosts)",
                v["identity"]["spiffe_id"].as_str().unwrap_or("?")
            );
            return Ok(());
        }
        Command::Node(NodeCommand::Token(TokenCommand::Create { node, ttl, out })) => {
            let v = client::call(
                &socket,
                &Request::NodeTokenCreate {
                    node: Some(node.clone()),
                    ttl_seconds: Some(ttl.as_secs()),
                },
            )
            .await?;
            let token = v["token"].as_str().unwrap_or_default();
            if let Some(path) = out {
                write_secret(path, token)?;
                eprintln!(
                    "wrote the token to {} (mode 0600); single use, valid for {}s, only for host {node}; copy it to that host and start its agent with --join-token-file FILE",
                    path.display(),
                    ttl.as_secs()
                );
            } else if cli.output == Output::Json {
                say!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                say!("{token}");
                eprintln!(
                    "single use, valid for {}s, only for host {node}; save it to a file on that host (it is a secret) and start its agent with --join-token-file FILE",
                    ttl.as_secs()
                );
            }
            return Ok(());
        }
        Command::Node(NodeCommand::Remove { node }) => {
            let v = client::call(&socket, &Request::NodeRemove { node: node.clone() }).await?;
            if cli.output == Output::Json {
                say!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                say!(
                    "removed {node}: registry access and renewals ended, {} instance record(s) deleted, placements changed: {}; every host closes its tunnels with {node}",
                    v["instances_removed"].as_u64().unwrap_or(0),
                    v["placements_changed"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "none".into())
                );
            }
            return Ok(());
        }
        Command::Place { service, on } => {
            let v = client::call(
                &socket,
                &Request::Place {
                    service: service.clone(),
                    hosts: on.clone(),
                },
            )
            .await?;
            if cli.output == Output::Json {
                say!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                say!(
                    "{service} may run on: {}; deploy it on those hosts with `hms-ctl deploy FILE`",
                    on.join(", ")
                );
            }
            return Ok(());
        }
        Command::Run { name, command } => {
            let data = client::call(&socket, &Request::Describe { name: name.clone() }).await?;
            let detail: ServiceDetail = serde_json::from_value(data)?;
            let code = run::run_in_cgroup(std::path::Path::new(&detail.cgroup_dir), command)?;
            std::process::exit(code);
        }
        Command::Status => Request::Status,
        Command::Route(RouteCommand::Set {
            name,
            path_prefix,
            timeout,
            per_try_timeout,
            retries,
        }) => Request::RouteSet {
            service: name.clone(),
            route: RouteSpec {
                path: path_prefix.clone(),
                timeout: *timeout,
                per_try_timeout: *per_try_timeout,
                retries: *retries,
            },
        },
        Command::Route(RouteCommand::Clear { name, path_prefix }) => Request::RouteClear {
            service: name.clone(),
            path: path_prefix.clone(),
        },
        Command::Limit(LimitCommand::Set {
            name,
            rate,
            burst,
            queue,
        }) => {
            let mut limit = RateLimit::parse(rate).map_err(|m| anyhow::anyhow!("{m}"))?;
            limit.burst = *burst;
            limit.queue = *queue;
            Request::LimitSet {
                service: name.clone(),
                limit,
            }
        }
        Command::Limit(LimitCommand::Clear { name }) => Request::LimitClear {
            service: name.clone(),
        },
    };
    let data = client::call(&socket, &request).await?;
    if cli.output == Output::Json {
        say!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    match cli.command {
        Command::Deploy { .. } => {
            let r: DeployResult = serde_json::from_value(data)?;
            let verb = if r.replaced { "updated" } else { "deployed" };
            say!(
                "{verb} {name}: callers reach it as http://{name}.svc/ (VIP {vip}, port 80 or {port})",
                name = r.service.spec.name,
                vip = r.service.vip,
                port = r.service.spec.port
            );
        }
        Command::Gateway(g) => {
            for line in gateway_cli::show(&g, data)? {
                say!("{line}");
            }
        }
        Command::Undeploy { name } => say!("undeployed {name}"),
        Command::List => {
            let services: Vec<ServiceInfo> = serde_json::from_value(data)?;
            print_list(&services);
        }
        Command::Describe { .. } => {
            let d: ServiceDetail = serde_json::from_value(data)?;
            print_service(&d.service);
            say!(
                "runs in:   {} (start instances there with `hms-ctl run {} -- CMD`)",
                d.cgroup_dir,
                d.service.spec.name
            );
            if !d.health.is_empty() {
                say!("instance health:");
                for h in &d.health {
                    let ejected = h
                        .ejected_for_ms
                        .map(|ms| format!(", ejected for {ms} ms more"))
                        .unwrap_or_default();
                    let check = h
                        .health_check
                        .as_deref()
                        .map(|c| format!(", health check {c}"))
                        .unwrap_or_default();
                    say!(
                        "  {}  circuit {} ({} consecutive failures, {} ejections{ejected}{check})",
                        h.addr,
                        h.state,
                        h.consecutive_failures,
                        h.ejections_total
                    );
                }
            }
        }
        Command::Status => print_status(&serde_json::from_value(data)?),
        Command::Run { .. }
        | Command::Tap { .. }
        | Command::Agent(_)
        | Command::Ca(_)
        | Command::Place { .. }
        | Command::Node(_) => {
            unreachable!("handled above")
        }
        Command::Route(_) | Command::Limit(_) => {
            let s: ServiceInfo = serde_json::from_value(data)?;
            say!("updated {}; takes effect on the next request", s.spec.name);
            print_service(&s);
        }
    }
    Ok(())
}

/// A secret file: created 0600 (never world-readable, not even for a moment), refusing to
/// overwrite.
fn write_secret(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create {}: {e} (it must not exist yet)",
                path.display()
            )
        })?;
    writeln!(f, "{text}")?;
    Ok(())
}

fn print_list(services: &[ServiceInfo]) {
    if services.is_empty() {
        say!("no services deployed; add one with `hms-ctl deploy FILE`");
        return;
    }
    let rows: Vec<[String; 6]> = services
        .iter()
        .map(|s| {
            [
                s.spec.name.clone(),
                format!("{}.svc", s.spec.name),
                s.vip.to_string(),
                s.spec.port.to_string(),
                s.instances.len().to_string(),
                s.spec.policy.to_string(),
            ]
        })
        .collect();
    print_table(
        &["NAME", "DNS", "VIP", "PORT", "INSTANCES", "POLICY"],
        &rows,
    );
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    // Cells may carry a caller's or another host's bytes: escaped before measuring.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|c| hms_ctl::escape::cell(c).into_owned())
                .collect()
        })
        .collect();
    let mut widths: [usize; N] = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        say!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn print_service(s: &ServiceInfo) {
    say!("name:      {}", s.spec.name);
    say!("dns:       {}.svc -> {}", s.spec.name, s.vip);
    say!(
        "port:      {} (callers may use :80 or :{})",
        s.spec.port,
        s.spec.port
    );
    say!("policy:    {}", s.spec.policy);
    match &s.spec.limit {
        Some(l) => say!("limit:     {l}"),
        None => say!("limit:     none"),
    }
    if let Some(c) = &s.spec.cgroup {
        say!("cgroup:    {c}");
    }
    if let Some(h) = &s.spec.health {
        say!("health:    {h}");
    }
    if s.spec.routes.is_empty() {
        say!("routes:    none (defaults apply)");
    } else {
        say!("routes:");
        for r in &s.spec.routes {
            let timeout = r
                .timeout
                .map(|t| format!("{}ms", t.as_millis()))
                .unwrap_or_else(|| "default".into());
            let retries = r
                .retries
                .map(|n| n.to_string())
                .unwrap_or_else(|| "default".into());
            let per_try = r
                .per_try_timeout
                .map(|t| format!(" per_try_timeout={}ms", t.as_millis()))
                .unwrap_or_default();
            say!("  {}  timeout={timeout}{per_try} retries={retries}", r.path);
        }
    }
    say!("instances:");
    for i in &s.instances {
        say!("  {}  on {}", i.addr, i.node);
    }
}

fn print_status(s: &AgentStatus) {
    say!("node:        {}", s.node);
    say!(
        "agent:       v{} pid {} up {}s",
        s.version,
        s.pid,
        s.uptime_seconds
    );
    say!("registry:    {}", s.registry);
    say!("services:    {}", s.services);
    say!(
        "outbound:    {} (listeners: {})",
        s.listeners.outbound,
        s.listeners_from
    );
    say!("dns:         {}", s.listeners.dns);
    say!("admin:       {}", s.listeners.admin_socket);
    say!(
        "redirect:    cgroup {} (VIPs {}{}), pinned at {}{}{}",
        s.redirect.cgroup,
        s.redirect.vip_cidr,
        match &s.redirect.vip6_range {
            Some(v6) => format!(" and {v6}"),
            None => ", IPv6 off".to_string(),
        },
        if s.redirect.pin_set.is_empty() {
            &s.redirect.pin_dir
        } else {
            &s.redirect.pin_set
        },
        if s.redirect.adopted {
            ", adopted from an earlier run"
        } else {
            ""
        },
        if s.redirect.older_sets.is_empty() {
            String::new()
        } else {
            format!(
                "; retiring the older pin set(s) {} (an upgrade across a layout change)",
                s.redirect.older_sets.join(", ")
            )
        }
    );
    say!("programs:    {}", s.redirect.programs.join(", "));
    let b = &s.sk_msg;
    if b.enabled {
        say!(
            "sk_msg:      on: {} sends ({} bytes) bypassed TCP, {} went through TCP",
            b.redirected,
            b.redirected_bytes,
            b.passed
        );
    } else if !b.agent_in_cgroup {
        say!(
            "sk_msg:      off: the agent runs outside the redirected cgroup, so the bypass cannot see the proxy's sockets"
        );
    } else {
        say!("sk_msg:      off (--sk-msg-bypass=false)");
    }
    let d = &s.dns;
    say!(
        "dns answers: {} vip, {} nodata, {} nxdomain, {} forwarded, {} formerr, {} servfail",
        d.vip,
        d.nodata,
        d.nxdomain,
        d.forwarded,
        d.formerr,
        d.servfail
    );
    let p = &s.proxy;
    say!(
        "connections: {} accepted, {} proxied, {} refused, {} active",
        p.accepted,
        p.proxied,
        p.refused,
        p.active
    );
    let h = &s.http;
    say!(
        "http:        {} requests, {} retries, {} denied, {} rate limited, {} timed out, {} mesh errors, {} bad requests, {} sent again after connection rotation",
        h.requests,
        h.retries,
        h.denied,
        h.rate_limited,
        h.timeouts,
        h.mesh_errors,
        h.bad_requests,
        h.unprocessed
    );
    say!(
        "egress: undeclared outside connections {} ({} refused)",
        if s.egress.refuse_undeclared {
            "refused"
        } else {
            "allowed"
        },
        s.egress.refused_total
    );
    say!(
        "observation: {} kernel flow records lost (ring buffer full), {} tap events lost (slow readers)",
        s.ringbuf_records_lost,
        s.tap_events_lost
    );
    if let Some(l) = &s.limits {
        let per: Vec<String> = l
            .listeners
            .iter()
            .map(|c| {
                let over_share = if c.refused_user_share > 0 {
                    format!(", {} over a user's share", c.refused_user_share)
                } else {
                    String::new()
                };
                format!(
                    "{} {}/{} ({} shed, {} refused{over_share})",
                    c.listener, c.open, c.cap, c.shed, c.refused
                )
            })
            .collect();
        say!(
            "limits:      fd limit {}; connections open/cap: {}; DNS forwards {} at once, {} dropped",
            l.fd_limit,
            per.join(", "),
            l.dns_forward_capacity,
            l.dns_forwards_dropped
        );
    }
    let id = &s.identity;
    match (&id.spiffe_id, id.cert_not_after_unix) {
        (Some(spiffe), Some(exp)) => say!(
            "identity:    {spiffe}, certificate expires in {}{}, {} trusted root(s)",
            human_secs(exp.saturating_sub(now_unix())),
            if id.holds_ca { ", holds the CA" } else { "" },
            id.trust_bundle_roots
        ),
        _ => say!(
            "identity:    none yet{}",
            id.waiting_for
                .as_ref()
                .map(|w| format!("; waiting for {w}"))
                .unwrap_or_default()
        ),
    }
    if !id.root_fingerprints.is_empty() {
        say!("  roots:     {}", id.root_fingerprints.join(", "));
    }
    if id.trust_bundle_refused_total > 0 {
        say!(
            "  REFUSED {} trust bundle(s) from the registry with a root no trusted root vouched for (see the agent's log): someone who can write the registry tried to add a root",
            id.trust_bundle_refused_total
        );
    }
    if let Some(p) = &id.trust_problem {
        say!("  TRUST CHAIN BROKEN: {p}");
    }
    if let Some(h) = &s.registry_health {
        say!(
            "registry:    {} {} (revision {}){}",
            h.backend,
            if h.connected {
                "connected"
            } else {
                "DISCONNECTED, serving the last known state"
            },
            h.revision,
            h.last_error
                .as_ref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
    }
    if !s.peers.is_empty() {
        say!("peers:");
        for p in &s.peers {
            say!(
                "  {}  {}  last seen {} ago  cert {}  tunnel {}",
                p.name,
                p.inbound,
                human_secs(now_unix().saturating_sub(p.last_seen_unix_ms / 1000)),
                p.cert_expiry_unix_ms
                    .map(|e| format!(
                        "expires in {}",
                        human_secs((e / 1000).saturating_sub(now_unix()))
                    ))
                    .unwrap_or_else(|| "none".into()),
                p.tunnel
            );
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn human_secs(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}
