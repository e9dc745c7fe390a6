//! What `hms-ctl node token create` prints and a joining host is given: everything it needs
//! to join, and nothing more.
//!
//! `hms2.<base64url JSON>` holding:
//! - the node name the token is bound to (a joining host cannot pick another);
//! - the single-use secret the CA redeems (only its hash is kept, see `token.rs`);
//! - the mesh root's fingerprint: the joining host installs a trust bundle only if it holds
//!   that root, so a registry writer cannot hand it a forged CA (kubeadm's discovery hash);
//! - with a secured registry, a bootstrap etcd credential (`hms-join-<node>`) whose role
//!   lets it post this node's join request and read the answer, nothing else, and the etcd
//!   CA to verify etcd's server with.
//!
//! It is a secret: it is written 0600 and read from a file or stdin, never from argv.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "hms2.";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdBootstrap {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTicket {
    pub node: String,
    pub trust_domain: String,
    pub secret: String,
    /// `sha256:<hex>` of the mesh root certificate's DER.
    pub ca_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdBootstrap>,
}

impl JoinTicket {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a ticket serializes");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    pub fn decode(text: &str) -> anyhow::Result<JoinTicket> {
        let text = text.trim();
        if text.starts_with("hms1.") {
            anyhow::bail!(
                "this join token is from an older HMS (hms1.): create a new one with `hms-ctl node token create --node NAME` on the CA host"
            );
        }
        let body = text.strip_prefix(PREFIX).ok_or_else(|| {
            anyhow::anyhow!(
                "not a join token: expected `hms2.` followed by what `hms-ctl node token create --node NAME` printed"
            )
        })?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| anyhow::anyhow!("the join token is damaged ({e}); copy it again whole"))?;
        serde_json::from_slice(&json)
            .map_err(|e| anyhow::anyhow!("the join token is damaged ({e}); copy it again whole"))
    }
}

/// `sha256:<lowercase hex>` of a certificate's DER.
pub fn cert_sha256(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_round_trips_and_old_or_damaged_ones_say_what_to_do() {
        let t = JoinTicket {
            node: "host-b".into(),
            trust_domain: "t.mesh".into(),
            secret: "hms1.00".into(),
            ca_sha256: cert_sha256(b"x"),
            etcd: Some(EtcdBootstrap {
                ca_pem: "A".into(),
                cert_pem: "B".into(),
                key_pem: "C".into(),
            }),
        };
        let text = t.encode();
        assert!(text.starts_with("hms2.") && !text.contains(' '));
        assert_eq!(JoinTicket::decode(&format!(" {text}\n")).unwrap(), t);
        let old = JoinTicket::decode("hms1.abc").unwrap_err().to_string();
        assert!(old.contains("older"), "{old}");
        let cut = JoinTicket::decode(&text[..text.len() - 7])
            .unwrap_err()
            .to_string();
        assert!(cut.contains("damaged"), "{cut}");
        assert!(cert_sha256(b"x").starts_with("sha256:2d711642b726b044"));
    }
}
