//! A new host's first step into a multi-host mesh, before its registry connection exists.
//! Owns the joining side of the exchange; never trusts anything the registry says that the
//! token did not vouch for.
//!
//! 1. The token (`identity/join_ticket.rs`) names this node, carries the CA's fingerprint and,
//!    with a secured registry, a bootstrap credential that may only write
//!    `blobs/ca/join/<node>`.
//! 2. This host makes its mesh key and (secured) its etcd key here; only CSRs travel. It
//!    writes [`JoinMessage::Request`] and polls the same key.
//! 3. The CA host answers in that key: [`JoinMessage::Answer`] (a node certificate, the
//!    trust bundle, the etcd client certificate for user `<node>`) or
//!    [`JoinMessage::Refused`] with the reason, which this host prints and exits with.
//! 4. The bundle must hold the root the token pinned, else nothing is installed. The agent
//!    then connects to the registry with its own credential.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::identity::etcd_ca::{self, Credential, CredentialFiles};
use crate::identity::join_ticket::{JoinTicket, cert_sha256};
use crate::identity::{IssuedCertificate, NodeIdentity};
use crate::registry::etcd::{DEFAULT_PREFIX, Key};

/// How long a joining host waits for the CA host's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(250);

/// The value of `blobs/ca/join/<node>`, written by the joining host, then by the CA host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JoinMessage {
    Request {
        token: String,
        csr_pem: String,
        #[serde(default)]
        etcd_csr_pem: Option<String>,
    },
    Answer {
        issued: Box<IssuedCertificate>,
        #[serde(default)]
        etcd_cert_pem: Option<String>,
    },
    Refused {
        reason: String,
    },
}

/// The blob key of `node`'s join exchange.
pub fn join_blob(node: &str) -> String {
    format!("ca/join/{node}")
}

/// Whether this host still has to join: no certificate yet (a restart after joining does
/// not need the token again).
pub fn needed(state_dir: &Path, secured: bool) -> bool {
    let has_cert = state_dir
        .join(crate::identity::IDENTITY_DIR)
        .join("node.pem")
        .exists();
    let has_etcd = CredentialFiles::under(state_dir).exist();
    !has_cert || (secured && !has_etcd)
}

/// Runs the exchange; returns once this host holds its certificate and (secured) its etcd
/// credential.
pub async fn join(
    ticket: &JoinTicket,
    endpoints: &[String],
    state_dir: &Path,
    node: &str,
) -> anyhow::Result<()> {
    if ticket.node != node {
        bail!(
            "the join token is for node `{}`, but this host is `{node}`; start it with --node-name {} or create a token for `{node}`",
            ticket.node,
            ticket.node
        );
    }
    let mut identity = NodeIdentity::load_or_create(state_dir, &ticket.trust_domain, node)?;
    let csr_pem = identity.create_csr()?;
    let etcd_key = match &ticket.etcd {
        Some(_) => Some(etcd_ca::new_key_and_csr()?),
        None => None,
    };
    let tls = ticket
        .etcd
        .as_ref()
        .map(|b| (b.ca_pem.as_str(), b.cert_pem.as_str(), b.key_pem.as_str()));
    let timeout = Duration::from_secs(3);
    let client = crate::registry::etcd::connect_client(endpoints, tls, timeout)
        .await
        .with_context(|| format!("reaching the registry at {} to join", endpoints.join(",")))?;
    let key = Key::Blob(join_blob(node)).encode(DEFAULT_PREFIX);
    let request = JoinMessage::Request {
        token: ticket.secret.clone(),
        csr_pem,
        etcd_csr_pem: etcd_key.as_ref().map(|(_, csr)| csr.clone()),
    };
    let mut kv = client.kv_client();
    tokio::time::timeout(
        timeout,
        kv.put(key.clone(), serde_json::to_vec(&request)?, None),
    )
    .await
    .context("the registry did not answer")?
    .context(
        "posting the join request (is the token's bootstrap credential still valid? tokens expire)",
    )?;
    tracing::info!(%node, "asked the CA host for a certificate (join token)");
    let deadline = Instant::now() + ANSWER_WAIT;
    loop {
        if Instant::now() > deadline {
            bail!(
                "the CA host did not answer the join request within {ANSWER_WAIT:?}; is its agent running?"
            );
        }
        tokio::time::sleep(POLL).await;
        let resp = match tokio::time::timeout(timeout, kv.get(key.clone(), None)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::debug!("reading the join answer: {e}");
                continue;
            }
            Err(_) => continue,
        };
        let Some(value) = resp.kvs().first().map(|kv| kv.value().to_vec()) else {
            continue;
        };
        match serde_json::from_slice::<JoinMessage>(&value) {
            Ok(JoinMessage::Request { .. }) | Err(_) => continue,
            Ok(JoinMessage::Refused { reason }) => {
                bail!("the CA host refused this host's join: {reason}")
            }
            Ok(JoinMessage::Answer {
                issued,
                etcd_cert_pem,
            }) => {
                let pinned = &ticket.ca_sha256;
                let holds_pinned = issued
                    .trust_bundle
                    .roots_der()
                    .iter()
                    .any(|der| cert_sha256(der) == *pinned);
                if !holds_pinned {
                    bail!(
                        "the join answer's trust bundle does not hold the CA the token names ({pinned}); someone other than the CA host answered: nothing was installed"
                    );
                }
                if issued.trust_bundle.trust_domain() != ticket.trust_domain {
                    bail!("the join answer is for another trust domain; nothing was installed");
                }
                identity.install_issued(&issued)?;
                if let (Some(boot), Some((key_pem, _))) = (&ticket.etcd, etcd_key) {
                    let cert_pem =
                        etcd_cert_pem.context("the CA host's answer has no registry credential")?;
                    CredentialFiles::under(state_dir)
                        .write(&boot.ca_pem, &Credential { cert_pem, key_pem })?;
                }
                tracing::info!(%node, serial = %issued.serial, "joined the mesh");
                return Ok(());
            }
        }
    }
}
