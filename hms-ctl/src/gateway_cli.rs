//! `hms-ctl gateway apply/list/describe/delete`: the gateway specs in the registry as the
//! operator sees them. Owns the commands' requests and tables; never validates a spec (the
//! agent runs `hms_ctl::gateway::parse`, so the rules live once).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use hms_ctl::api::{GatewayInfo, Request};

#[derive(Subcommand)]
pub enum GatewayCommand {
    /// Keep a gateway spec (YAML: listeners, routes) in the registry; every gateway host
    /// (`hms-node-agent run --gateway ...`) serves it. A spec with errors changes nothing.
    Apply { file: PathBuf },
    /// The gateways in the registry.
    List,
    /// One gateway: listeners (and their state on this host), routes, backends.
    Describe { name: String },
    /// Remove a gateway: every gateway host closes its listeners.
    Delete { name: String },
    /// API keys for a spec's `api_key` authenticators (only their hashes go in the spec).
    /// Runs here; needs no agent.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// A new random key for NAME: prints the key (give it to the client) and the spec line
    /// (`NAME: sha256:...`) to put under the authenticator's `keys:`.
    New { name: String },
    /// The hash of a key read from standard input (one line), for an existing key.
    Hash,
}

/// Commands that run here without the agent; `None` for the others.
pub fn local(cmd: &GatewayCommand) -> anyhow::Result<Option<Vec<String>>> {
    use hms_ctl::gateway::door::{KeyHash, new_api_key};
    let GatewayCommand::Key(key) = cmd else {
        return Ok(None);
    };
    Ok(Some(match key {
        KeyCommand::New { name } => {
            let (key, hash) = new_api_key();
            vec![
                format!("key:       {key}"),
                format!("spec line: {name}: {hash}"),
                "(the key is shown once; the spec keeps only its hash)".into(),
            ]
        }
        KeyCommand::Hash => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the key from standard input")?;
            let key = line.trim_end_matches(['\r', '\n']);
            if key.is_empty() {
                anyhow::bail!("no key on standard input: `echo -n KEY | hms-ctl gateway key hash`");
            }
            vec![KeyHash::of(key).to_string()]
        }
    }))
}

pub fn request(cmd: &GatewayCommand) -> anyhow::Result<Request> {
    Ok(match cmd {
        GatewayCommand::Apply { file } => Request::GatewayApply {
            file: file.display().to_string(),
            yaml: std::fs::read_to_string(file)
                .with_context(|| format!("reading gateway spec {}", file.display()))?,
        },
        GatewayCommand::List => Request::GatewayList,
        GatewayCommand::Describe { name } => Request::GatewayDescribe { name: name.clone() },
        GatewayCommand::Delete { name } => Request::GatewayDelete { name: name.clone() },
        GatewayCommand::Key(_) => anyhow::bail!("`gateway key` runs locally (see `local`)"),
    })
}

/// Lines to print for the answer.
pub fn show(cmd: &GatewayCommand, data: serde_json::Value) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    match cmd {
        GatewayCommand::Apply { .. } => {
            let g: GatewayInfo = serde_json::from_value(data)?;
            out.push(format!(
                "applied gateway {}: {} listeners, {} routes{}",
                g.spec.name,
                g.spec.listeners.len(),
                g.spec.routes.len(),
                if g.served_here {
                    ""
                } else {
                    " (this host does not serve gateways; hosts started with `--gateway` do)"
                }
            ));
        }
        GatewayCommand::Delete { name } => out.push(format!("deleted gateway {name}")),
        GatewayCommand::Key(_) => {}
        GatewayCommand::List => {
            let list: Vec<GatewayInfo> = serde_json::from_value(data)?;
            if list.is_empty() {
                out.push("no gateways; apply one with `hms-ctl gateway apply FILE`".into());
            }
            out.push(format!(
                "{:<20} {:<40} {:>6}  HERE",
                "NAME", "LISTENERS", "ROUTES"
            ));
            for g in &list {
                let listeners: Vec<String> = g
                    .spec
                    .listeners
                    .iter()
                    .map(|l| format!("{}:{}/{:?}", l.name, l.port, l.protocol).to_lowercase())
                    .collect();
                out.push(format!(
                    "{:<20} {:<40} {:>6}  {}",
                    g.spec.name,
                    listeners.join(","),
                    g.spec.routes.len(),
                    if g.served_here { "yes" } else { "no" }
                ));
            }
        }
        GatewayCommand::Describe { .. } => {
            let g: GatewayInfo = serde_json::from_value(data)?;
            out.push(format!("gateway:   {}", g.spec.name));
            out.push(format!(
                "here:      {}",
                if g.served_here {
                    "served by this host"
                } else {
                    "not served by this host (no --gateway for it)"
                }
            ));
            out.push("listeners:".into());
            for l in &g.spec.listeners {
                let state = g
                    .listeners
                    .iter()
                    .find(|s| s.name == l.name)
                    .map(|s| format!("  [{}]", s.state))
                    .unwrap_or_default();
                out.push(format!(
                    "  {:<12} {}:{} {:?}{}{}",
                    l.name,
                    l.bind_ip(),
                    l.port,
                    l.protocol,
                    l.hostname
                        .as_deref()
                        .map(|h| format!(" host {h}"))
                        .unwrap_or_default(),
                    state
                ));
                for c in g
                    .listeners
                    .iter()
                    .filter(|s| s.name == l.name)
                    .flat_map(|s| &s.certificates)
                {
                    out.push(format!("    certificate {c}"));
                }
            }
            out.push("routes:".into());
            for r in &g.spec.routes {
                let backends: Vec<String> = r
                    .backends
                    .iter()
                    .map(|b| format!("{}.svc={}", b.service, b.weight))
                    .collect();
                let target = match &r.filters.redirect {
                    Some(_) => "redirect".to_string(),
                    None => backends.join(" "),
                };
                out.push(format!(
                    "  {:<12} hosts {:<24} matches {:<3} -> {}{}",
                    r.name,
                    if r.hostnames.is_empty() {
                        "*".into()
                    } else {
                        r.hostnames.join(",")
                    },
                    r.matches.len().max(1),
                    target,
                    r.door
                        .auth
                        .as_deref()
                        .map(|a| format!("  auth {a}"))
                        .unwrap_or_default()
                ));
            }
        }
    }
    Ok(out)
}
