//! The operator's acts on the registry: placing services on hosts, admitting hosts the CA
//! let in, removing hosts. With a secured etcd only the operator's connection (the CA host,
//! etcd's `root`) can make them, and each also updates the roles in `access.rs` so etcd
//! enforces what the records say. Without TLS (development) any host may, as nothing could
//! stop it anyway.

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::keys::{self, Key};
use super::view::{MemberRecord, PlacementRecord};
use super::{MAX_TXN_ATTEMPTS, Shared, access, within, within_retrying_auth_race};
use crate::config::Ipv4Cidr;
use crate::registry::vip;

/// How many hash slots a new service's VIP tries one by one before the range counts as
/// crowded and every claim is read once (`taken_vips`) to pick a free one directly. At the
/// default /16 with 10,000 services a slot is taken with p = 0.15, so 16 misses in a row
/// (p = 1e-13) means the range is nearly full, not bad luck.
const MAX_VIP_PROBES: usize = 16;

/// A new service's VIP search: its name's hash slot first (so a name gets the VIP it always
/// got, `vip.rs`), then the next slots, learning which are taken from the refused
/// create-only transactions instead of reading every `vips/` key.
#[derive(Default)]
struct VipProbe {
    /// Slots another name holds.
    taken: HashSet<Ipv4Addr>,
    /// A slot whose claim is already in this service's name.
    ours: Option<Ipv4Addr>,
    listed: bool,
}

impl VipProbe {
    fn crowded(&self) -> bool {
        !self.listed && self.ours.is_none() && self.taken.len() >= MAX_VIP_PROBES
    }

    fn list_all(&mut self, taken: HashSet<Ipv4Addr>) {
        self.taken.extend(taken);
        self.listed = true;
    }

    /// The slot to try, and whether its claim is already this service's.
    fn next(&self, range: Ipv4Cidr, service: &str) -> Option<(Ipv4Addr, bool)> {
        if let Some(ip) = self.ours {
            return Some((ip, true));
        }
        vip::allocate(range, service, &self.taken).map(|ip| (ip, false))
    }

    /// The transaction for `vip` failed; `holder` is who holds its claim (None: nobody, so
    /// the placement compare failed instead and the same slot is tried again).
    fn refused(&mut self, vip: Ipv4Addr, holder: Option<&str>, service: &str) {
        match holder {
            Some(h) if h == service => self.ours = Some(vip),
            Some(_) => {
                if self.ours == Some(vip) {
                    self.ours = None;
                }
                self.taken.insert(vip);
            }
            None => {
                if self.ours == Some(vip) {
                    self.ours = None;
                }
            }
        }
    }
}

/// The holder named by the `or_else` read of a refused claim transaction.
fn claim_holder(resp: &etcd_client::TxnResponse) -> Option<String> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
        _ => None,
    })
}

/// What `hms-ctl node remove` took away.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RemovedNode {
    pub was_member: bool,
    pub instances_removed: usize,
    pub placements_changed: Vec<String>,
}

impl Shared {
    fn secured(&self) -> bool {
        self.opts.tls.is_some()
    }

    fn require_operator(&self, what: &str) -> anyhow::Result<()> {
        if self.secured() && !self.opts.operator {
            bail!(
                "{what} is the operator's act: run it on the CA host (it holds the registry's root credential)"
            );
        }
        Ok(())
    }

    pub(super) async fn get_placement(
        &self,
        service: &str,
    ) -> anyhow::Result<Option<(PlacementRecord, i64)>> {
        let key = self.key(Key::Placement(service.to_string()));
        let resp = within(self.timeout(), self.client.kv_client().get(key, None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let rec: PlacementRecord = serde_json::from_slice(kv.value())
            .with_context(|| format!("the placement record of `{service}` does not decode"))?;
        Ok(Some((rec, kv.mod_revision())))
    }

    /// Sets the hosts that may run `service` (claiming its VIP the first time) and moves the
    /// etcd grants along; returns the hosts.
    pub(super) async fn place(
        &self,
        service: &str,
        hosts: BTreeSet<String>,
    ) -> anyhow::Result<BTreeSet<String>> {
        self.require_operator("placing a service")?;
        hms_ctl::spec::validate_dns_label(service)
            .map_err(|e| anyhow::anyhow!("`{service}` cannot be a service name: {e}"))?;
        for h in &hosts {
            keys::validate_node_name(h)?;
        }
        let pkey = self.key(Key::Placement(service.to_string()));
        let range = self.opts.vip_range;
        let mut probe = VipProbe::default();
        for _ in 0..MAX_TXN_ATTEMPTS {
            let old = self.get_placement(service).await?;
            let (vip, claim) = match &old {
                Some((rec, _)) => (rec.vip, None),
                None => match self.get_record(service).await? {
                    // A service deployed before placement existed keeps its VIP.
                    Some((rec, _)) => (rec.vip, None),
                    None => {
                        if probe.crowded() {
                            probe.list_all(self.taken_vips().await?);
                        }
                        let (vip, ours) = probe.next(range, service).with_context(|| {
                            format!("no free VIP left in {range}; undeploy something or widen --vip-cidr")
                        })?;
                        (vip, Some((self.key(Key::Vip(vip)), ours)))
                    }
                },
            };
            let mut when = vec![match &old {
                Some((_, rev)) => Compare::mod_revision(pkey.clone(), CompareOp::Equal, *rev),
                None => Compare::create_revision(pkey.clone(), CompareOp::Equal, 0),
            }];
            let record = serde_json::to_vec(&PlacementRecord {
                hosts: hosts.clone(),
                vip,
            })?;
            let mut ops = vec![TxnOp::put(pkey.clone(), record, None)];
            let mut on_refusal = Vec::new();
            if let Some((claim, ours)) = &claim {
                // Create-only: two hosts can never take one VIP. A claim already in this
                // name (left by an earlier placement) is taken over as it is.
                when.push(if *ours {
                    Compare::value(claim.clone(), CompareOp::Equal, service)
                } else {
                    Compare::version(claim.clone(), CompareOp::Equal, 0)
                });
                ops.push(TxnOp::put(claim.clone(), service, None));
                // On failure, say who holds the slot, so the probe moves on without a read.
                on_refusal.push(TxnOp::get(claim.clone(), None));
            }
            // etcd_client's builder wants when, and_then, or_else in this order.
            let txn = Txn::new().when(when).and_then(ops).or_else(on_refusal);
            let resp = within_retrying_auth_race(self.timeout(), || {
                let (mut kv, txn) = (self.client.kv_client(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await?;
            if !resp.succeeded() {
                if claim.is_some() {
                    probe.refused(vip, claim_holder(&resp).as_deref(), service);
                }
                continue;
            }
            if self.secured() {
                let before = old.map(|(r, _)| r.hosts).unwrap_or_default();
                for added in hosts.difference(&before) {
                    // A host not admitted yet has no role; admission grants from placement.
                    if let Err(e) = access::grant_service(
                        &self.client,
                        self.prefix(),
                        added,
                        service,
                        self.timeout(),
                    )
                    .await
                        && !format!("{e:#}").contains("not found")
                    {
                        return Err(e);
                    }
                }
                for removed in before.difference(&hosts) {
                    access::revoke_service(
                        &self.client,
                        self.prefix(),
                        removed,
                        service,
                        self.timeout(),
                    )
                    .await?;
                }
            }
            self.caught_up(resp.header().map(|h| h.revision()).unwrap_or(0))
                .await;
            tracing::info!(%service, ?hosts, "placement set");
            return Ok(hosts);
        }
        bail!("placing `{service}` kept racing with other writes; try again")
    }

    /// The VIP `node` deploys `service` with: the placement's. The operator (and anyone,
    /// without TLS) places the service on itself first; a host it is not placed on is told
    /// what to run.
    pub(super) async fn placed_vip(
        &self,
        service: &str,
        node: &str,
    ) -> anyhow::Result<std::net::Ipv4Addr> {
        if let Some((rec, _)) = self.get_placement(service).await?
            && rec.hosts.contains(node)
        {
            return Ok(rec.vip);
        }
        if self.secured() && !self.opts.operator {
            bail!(
                "`{service}` is not placed on {node}, so this host may not deploy it; on the CA host run `hms-ctl place {service} --on {node}` (add the hosts that already run it), then deploy again"
            );
        }
        let mut hosts = self
            .get_placement(service)
            .await?
            .map(|(r, _)| r.hosts)
            .unwrap_or_default();
        hosts.insert(node.to_string());
        self.place(service, hosts).await?;
        let (rec, _) = self
            .get_placement(service)
            .await?
            .context("the placement just written is gone")?;
        Ok(rec.vip)
    }

    /// Records a host the CA admitted; refuses a name that is already a member.
    pub(super) async fn admit(&self, node: &str) -> anyhow::Result<()> {
        self.require_operator("admitting a host")?;
        keys::validate_node_name(node)?;
        if !self.secured() {
            // Without TLS nothing can hold a host to its name, and membership is not
            // enforced; a host moving to etcds:// later joins again and is admitted then.
            return Ok(());
        }
        let key = self.key(Key::Member(node.to_string()));
        let joined_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let value = serde_json::to_vec(&MemberRecord { joined_unix })?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let resp = within(self.timeout(), self.client.kv_client().txn(txn)).await?;
        if !resp.succeeded() {
            bail!(
                "`{node}` is already a member of the mesh; a name cannot be taken twice (`hms-ctl node remove {node}` on the CA host first, if that host is gone)"
            );
        }
        let placed = self.lock_view().services_placed_on(node);
        access::admit_member(&self.client, self.prefix(), node, &placed, self.timeout()).await?;
        self.caught_up(resp.header().map(|h| h.revision()).unwrap_or(0))
            .await;
        Ok(())
    }

    /// Whether `node` is a member, read from etcd (not the snapshot).
    pub(super) async fn is_member(&self, node: &str) -> anyhow::Result<bool> {
        let key = self.key(Key::Member(node.to_string()));
        let resp = within(self.timeout(), self.client.kv_client().get(key, None)).await?;
        Ok(!resp.kvs().is_empty())
    }

    /// Takes a host out of the mesh: its etcd user, membership, records and placements.
    pub(super) async fn remove_node(&self, node: &str) -> anyhow::Result<RemovedNode> {
        self.require_operator("removing a host")?;
        keys::validate_node_name(node)?;
        if node == self.opts.node {
            bail!("this host holds the CA and cannot remove itself");
        }
        let mut out = RemovedNode {
            was_member: self.is_member(node).await?,
            ..RemovedNode::default()
        };
        // Registry access first: from here on the host cannot write anything back.
        if self.secured() {
            access::remove_member(&self.client, node, self.timeout()).await?;
            access::remove_join_user(&self.client, node, self.timeout()).await?;
        }
        let mut kv = self.client.kv_client();
        let resp = within(
            self.timeout(),
            kv.get(
                self.prefix(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        )
        .await?;
        let mut doomed = Vec::new();
        for item in resp.kvs() {
            let theirs = match Key::parse(self.prefix(), item.key()) {
                Some(Key::Instances { node: n, .. }) => {
                    if n == node {
                        out.instances_removed += 1;
                    }
                    n == node
                }
                Some(Key::Node(n)) | Some(Key::Member(n)) => n == node,
                Some(Key::Blob(b)) => {
                    b == format!("ca/renew/{node}")
                        || b == format!("ca/issued/{node}")
                        || b == format!("ca/join/{node}")
                }
                _ => false,
            };
            if theirs {
                doomed.push(item.key().to_vec());
            }
        }
        for chunk in doomed.chunks(super::MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::delete(k.clone(), None::<DeleteOptions>))
                .collect();
            within(self.timeout(), kv.txn(Txn::new().and_then(ops))).await?;
        }
        let placed: Vec<String> = self.lock_view().placed_services();
        for service in placed {
            if let Some((rec, _)) = self.get_placement(&service).await?
                && rec.hosts.contains(node)
            {
                let mut hosts = rec.hosts.clone();
                hosts.remove(node);
                self.place(&service, hosts).await?;
                out.placements_changed.push(service);
            }
        }
        tracing::warn!(%node, ?out, "removed a host from the mesh");
        Ok(out)
    }

    /// A registry written before placement existed (a plaintext mesh moving to etcds://):
    /// every service without a placement is placed on the hosts that have instances of it,
    /// so it keeps working once hosts can write only what is placed on them.
    pub(super) async fn migrate_unplaced(&self) -> anyhow::Result<usize> {
        let unplaced: Vec<(String, BTreeSet<String>)> = {
            let snapshot = self.snapshot.borrow().clone();
            let view = self.lock_view();
            let placed: BTreeSet<String> = view.placed_services().into_iter().collect();
            view.service_names()
                .into_iter()
                .filter(|s| !placed.contains(s))
                .map(|s| {
                    let hosts = snapshot
                        .service(&s)
                        .map(|i| i.instances.iter().map(|x| x.node.clone()).collect())
                        .unwrap_or_default();
                    (s, hosts)
                })
                .collect()
        };
        for (service, hosts) in &unplaced {
            tracing::info!(%service, ?hosts, "placing a service deployed before placement existed on the hosts that run it");
            self.place(service, hosts.clone()).await?;
        }
        Ok(unplaced.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_starts_at_the_names_slot_and_learns_from_refusals() {
        let range: Ipv4Cidr = "127.77.0.0/16".parse().unwrap();
        let mut probe = VipProbe::default();
        let (first, ours) = probe.next(range, "pay").unwrap();
        assert!(!ours);
        // The slot every earlier version gave this name.
        assert_eq!(first, vip::allocate(range, "pay", &HashSet::new()).unwrap());
        // Nobody holds it (the placement compare failed): the same slot again.
        probe.refused(first, None, "pay");
        assert_eq!(probe.next(range, "pay").unwrap(), (first, false));
        // Another name holds it: the next slot.
        probe.refused(first, Some("other"), "pay");
        let (second, _) = probe.next(range, "pay").unwrap();
        assert_ne!(second, first);
        // A claim already in this name is taken over.
        probe.refused(second, Some("pay"), "pay");
        assert_eq!(probe.next(range, "pay").unwrap(), (second, true));
        assert!(!probe.crowded());
    }

    #[test]
    fn a_crowded_range_is_listed_once_and_a_full_one_refused() {
        let range: Ipv4Cidr = "127.77.0.0/24".parse().unwrap();
        let mut probe = VipProbe::default();
        for _ in 0..MAX_VIP_PROBES {
            let (ip, _) = probe.next(range, "pay").unwrap();
            probe.refused(ip, Some("other"), "pay");
        }
        assert!(probe.crowded());
        let all: HashSet<Ipv4Addr> = (1..255).map(|i| Ipv4Addr::new(127, 77, 0, i)).collect();
        probe.list_all(all);
        assert!(!probe.crowded());
        assert_eq!(probe.next(range, "pay"), None);
    }
}
