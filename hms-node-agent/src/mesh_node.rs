//! This host's record in a multi-host registry: its name, the inbound address other agents
//! tunnel to, and its certificate's expiry, kept current while the agent runs (the record
//! lives under this host's lease, so it vanishes with the host).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hms_ctl::api::NodeInfo;

use crate::config::AgentConfig;
use crate::drain::Drain;
use crate::mesh_identity::MeshIdentity;
use crate::registry::Store;

const REFRESH: Duration = Duration::from_secs(5);

pub async fn keep_registered(
    store: Arc<dyn Store>,
    identity: Arc<MeshIdentity>,
    config: AgentConfig,
    drain: Drain,
) {
    let mut last: Option<NodeInfo> = None;
    loop {
        let summary = identity.summary().await;
        let info = NodeInfo {
            name: config.node_name.clone(),
            inbound: config.inbound,
            last_seen_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            cert_expiry_unix_ms: summary.cert_not_after_unix.map(|s| s * 1000),
        };
        let changed = last.as_ref().is_none_or(|l| {
            l.inbound != info.inbound || l.cert_expiry_unix_ms != info.cert_expiry_unix_ms
        });
        if changed {
            let s = store.clone();
            let i = info.clone();
            match tokio::task::spawn_blocking(move || s.register_node(i)).await {
                Ok(Ok(())) => last = Some(info),
                Ok(Err(e)) => tracing::warn!("registering this host in the registry: {e:#}"),
                Err(e) => tracing::warn!("registering this host: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = drain.signaled() => return,
        }
    }
}
