//! `hms-node-agent init-mesh`: the first host of a multi-host mesh, before etcd starts.
//! Makes the mesh CA, this host's node certificate, the registry's small PKI (etcd's server
//! certificate and the operator's `root` client credential), and says how to start etcd
//! with them. Owns nothing at run time; never talks to etcd (it is not running yet).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;

use crate::identity::etcd_ca::{Credential, CredentialFiles, EtcdCa};
use crate::identity::{CA_DIR, CertificateAuthority};

/// Where etcd's own certificate and key go (copy them where etcd can read them).
pub const ETCD_SERVER_DIR: &str = "etcd-server";

#[derive(clap::Args, Debug, Clone)]
pub struct InitMeshArgs {
    /// SPIFFE trust domain of the new mesh (e.g. `prod.example`).
    #[arg(long)]
    pub trust_domain: String,
    /// Addresses (IP or DNS name) clients reach etcd at; its certificate names them.
    /// Loopback is always included.
    #[arg(long = "etcd-address", value_delimiter = ',', required = true)]
    pub etcd_addresses: Vec<String>,
    /// This host's name in the mesh [default: the hostname].
    #[arg(long)]
    pub node_name: Option<String>,
    /// Where the agent keeps its state (the CA's keys go to `<state-dir>/ca/`, 0700).
    #[arg(long, default_value = "/var/lib/hms")]
    pub state_dir: PathBuf,
}

pub fn run(args: &InitMeshArgs) -> anyhow::Result<String> {
    let node = args
        .node_name
        .clone()
        .unwrap_or_else(crate::config::hostname);
    crate::registry::etcd::validate_node_name(&node)?;
    // A CA made earlier (`hms-ctl ca init` of a plaintext etcd:// mesh) is kept: this then
    // only adds the registry's certificates, the step from etcd:// to etcds://.
    let existing = args.state_dir.join(CA_DIR).join("ca.json").exists();
    let ca = if existing {
        let ca = CertificateAuthority::load(&args.state_dir)?;
        if ca.trust_domain() != args.trust_domain {
            anyhow::bail!(
                "this host already holds the CA of trust domain `{}`, not `{}`",
                ca.trust_domain(),
                args.trust_domain
            );
        }
        ca
    } else {
        CertificateAuthority::init(&args.state_dir, &args.trust_domain).with_context(|| {
            format!(
                "making the mesh CA in {}",
                args.state_dir.join(CA_DIR).display()
            )
        })?
    };
    let identity = crate::mesh_identity::own_certificate(&args.state_dir, &ca, &node)?;

    let etcd_ca = EtcdCa::load_or_create(&args.state_dir.join(CA_DIR), &args.trust_domain)?;
    let server = etcd_ca.server(&args.etcd_addresses)?;
    let server_files = CredentialFiles {
        ca: args.state_dir.join(ETCD_SERVER_DIR).join("ca.pem"),
        cert: args.state_dir.join(ETCD_SERVER_DIR).join("server.pem"),
        key: args.state_dir.join(ETCD_SERVER_DIR).join("server.key"),
    };
    server_files.write(etcd_ca.cert_pem(), &server)?;
    let root: Credential = etcd_ca.client("root", None)?;
    CredentialFiles::under(&args.state_dir).write(etcd_ca.cert_pem(), &root)?;

    let first = &args.etcd_addresses[0];
    let url_host = if first.contains(':') {
        format!("[{first}]")
    } else {
        first.clone()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} the mesh CA for trust domain `{}` in {} (keys 0600; back them up: `hms-ctl ca backup`)",
        if existing { "kept" } else { "made" },
        args.trust_domain,
        args.state_dir.join(CA_DIR).display()
    );
    if existing {
        let _ = writeln!(
            out,
            "moving an etcd:// mesh to etcds://: after etcd restarts with TLS, this host's agent places every deployed service on the hosts that run it; every other host joins again with a token (`hms-ctl node token create --node NAME --out FILE`) to get its registry credential"
        );
    }
    let _ = writeln!(out, "this host is `{node}`: {}", identity.spiffe_id());
    let _ = writeln!(
        out,
        "etcd's certificate and key: {} and {} (CA {}); start etcd with them and client certificates required:",
        server_files.cert.display(),
        server_files.key.display(),
        server_files.ca.display()
    );
    let _ = writeln!(
        out,
        "  etcd --data-dir /var/lib/etcd/hms --listen-client-urls https://{url_host}:2379 --advertise-client-urls https://{url_host}:2379 \\\n       --cert-file {} --key-file {} --trusted-ca-file {} --client-cert-auth \\\n       --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster default=http://127.0.0.1:2380",
        server_files.cert.display(),
        server_files.key.display(),
        server_files.ca.display()
    );
    let _ = writeln!(
        out,
        "then start this host's agent: hms-node-agent run --registry etcds://{url_host}:2379 --node-name {node}"
    );
    let _ = writeln!(
        out,
        "(it turns on etcd's access control with this host as its `root`; other hosts join with `hms-ctl node token create --node NAME --out FILE`)"
    );
    Ok(out)
}
