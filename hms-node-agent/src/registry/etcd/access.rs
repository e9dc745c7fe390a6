//! etcd's role-based access, as the operator (the CA host, etcd's `root` user) keeps it.
//! Owns the users and roles of the mesh; never decides who may join (the CA does that) and is
//! never called by a host that is not the operator.
//!
//! With `--client-cert-auth` etcd takes the user name from the CN of a verified client
//! certificate (`identity/etcd_ca.rs`), so a host's credential is worth exactly its role:
//!
//! | user | role grants |
//! | --- | --- |
//! | `root` | everything (the operator; outside the threat model) |
//! | `<node>` (a member) | read the whole prefix; write `nodes/<node>`, `blobs/ca/renew/<node>`, and for each service placed on it `services/<svc>` and `instances/<svc>/<node>` |
//! | `hms-join-<node>` (a join token's bootstrap) | write `blobs/ca/join/<node>`; read `blobs/ca/issued/<node>` and `blobs/ca/bundle` |
//!
//! So a host cannot write another host's instances, an unplaced service's spec, placement,
//! membership, VIP claims or anything the CA publishes; and deleting its user (`hms-ctl node
//! remove`) ends its registry access at once, whatever certificate it still holds.

use std::time::Duration;

use anyhow::Context;
use etcd_client::{Client, Permission, UserAddOptions};

use super::keys::Key;
use super::{within, within_retrying_auth_race};
use crate::identity::etcd_ca::join_user;

fn node_role(node: &str) -> String {
    format!("hms-node-{node}")
}

/// etcd answers a second add of a user or role with an error naming it as existing.
fn tolerate_existing(r: anyhow::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(e) if format!("{e:#}").contains("already exist") => Ok(()),
        other => other,
    }
}

fn tolerate_missing(r: anyhow::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(e) if format!("{e:#}").contains("not found") => Ok(()),
        other => other,
    }
}

/// Turns on etcd's access control with `root` as its administrator; idempotent (an agent
/// restarting on the CA host runs it again).
pub async fn bootstrap(client: &Client, _prefix: &str, t: Duration) -> anyhow::Result<()> {
    let mut c = client.clone();
    tolerate_existing(
        within(
            t,
            c.user_add("root", "", Some(UserAddOptions::new().with_no_pwd())),
        )
        .await
        .map(drop),
    )
    .context("adding etcd's root user")?;
    tolerate_existing(within(t, c.role_add("root")).await.map(drop))?;
    tolerate_existing(within(t, c.user_grant_role("root", "root")).await.map(drop))?;
    within(t, c.auth_enable())
        .await
        .context("enabling etcd's authentication")?;
    Ok(())
}

async fn add_user_with_role(
    client: &Client,
    user: &str,
    role: &str,
    grants: Vec<Permission>,
    t: Duration,
) -> anyhow::Result<()> {
    let mut c = client.clone();
    tolerate_existing(within(t, c.role_add(role)).await.map(drop))
        .with_context(|| format!("adding etcd role {role}"))?;
    for perm in grants {
        within(t, c.role_grant_permission(role, perm))
            .await
            .with_context(|| format!("granting etcd role {role} its keys"))?;
    }
    tolerate_existing(
        within(
            t,
            c.user_add(user, "", Some(UserAddOptions::new().with_no_pwd())),
        )
        .await
        .map(drop),
    )
    .with_context(|| format!("adding etcd user {user}"))?;
    within(t, c.user_grant_role(user, role))
        .await
        .with_context(|| format!("giving etcd user {user} its role"))?;
    Ok(())
}

async fn delete_user_and_role(
    client: &Client,
    user: &str,
    role: &str,
    t: Duration,
) -> anyhow::Result<()> {
    let mut c = client.clone();
    tolerate_missing(within(t, c.user_delete(user)).await.map(drop))
        .with_context(|| format!("deleting etcd user {user}"))?;
    tolerate_missing(within(t, c.role_delete(role)).await.map(drop))
        .with_context(|| format!("deleting etcd role {role}"))?;
    Ok(())
}

/// The keys a member writes for one service placed on it.
fn service_keys(prefix: &str, node: &str, service: &str) -> [String; 2] {
    [
        Key::Service(service.to_string()).encode(prefix),
        Key::Instances {
            service: service.to_string(),
            node: node.to_string(),
        }
        .encode(prefix),
    ]
}

/// A member host: its own records, and the services already placed on it.
pub async fn admit_member(
    client: &Client,
    prefix: &str,
    node: &str,
    placed: &[String],
    t: Duration,
) -> anyhow::Result<()> {
    let mut grants = vec![
        Permission::read(prefix).with_prefix(),
        Permission::read_write(Key::Node(node.to_string()).encode(prefix)),
        Permission::read_write(Key::Blob(format!("ca/renew/{node}")).encode(prefix)),
    ];
    for service in placed {
        grants.extend(
            service_keys(prefix, node, service)
                .into_iter()
                .map(Permission::read_write),
        );
    }
    add_user_with_role(client, node, &node_role(node), grants, t).await
}

/// Ends a member's registry access (its user and role), whatever certificate it holds.
pub async fn remove_member(client: &Client, node: &str, t: Duration) -> anyhow::Result<()> {
    delete_user_and_role(client, node, &node_role(node), t).await
}

/// Lets `node` write `service`'s spec and its own instances of it.
pub async fn grant_service(
    client: &Client,
    prefix: &str,
    node: &str,
    service: &str,
    t: Duration,
) -> anyhow::Result<()> {
    for key in service_keys(prefix, node, service) {
        within_retrying_auth_race(t, || {
            let mut c = client.clone();
            let (role, perm) = (node_role(node), Permission::read_write(key.clone()));
            async move { c.role_grant_permission(role, perm).await }
        })
        .await
        .with_context(|| format!("letting {node} write {service}"))?;
    }
    Ok(())
}

pub async fn revoke_service(
    client: &Client,
    prefix: &str,
    node: &str,
    service: &str,
    t: Duration,
) -> anyhow::Result<()> {
    for key in service_keys(prefix, node, service) {
        tolerate_missing(
            within_retrying_auth_race(t, || {
                let mut c = client.clone();
                let (role, key) = (node_role(node), key.clone());
                async move { c.role_revoke_permission(role, key, None).await }
            })
            .await
            .map(drop),
        )
        .with_context(|| format!("taking {service} from {node}"))?;
    }
    Ok(())
}

/// The user a join token's bootstrap credential names: it can post one join request and
/// read the answer, nothing else.
pub async fn add_join_user(
    client: &Client,
    prefix: &str,
    node: &str,
    t: Duration,
) -> anyhow::Result<()> {
    let user = join_user(node);
    let grants = vec![
        Permission::read_write(Key::Blob(format!("ca/join/{node}")).encode(prefix)),
        Permission::read(Key::Blob(format!("ca/issued/{node}")).encode(prefix)),
        Permission::read(Key::Blob("ca/bundle".into()).encode(prefix)),
    ];
    add_user_with_role(client, &user, &user, grants, t).await
}

pub async fn remove_join_user(client: &Client, node: &str, t: Duration) -> anyhow::Result<()> {
    let user = join_user(node);
    delete_user_and_role(client, &user, &user, t).await
}

/// The mesh's join users (`hms-join-<node>`) that still exist, by node.
pub async fn join_users(client: &Client, t: Duration) -> anyhow::Result<Vec<String>> {
    let mut c = client.clone();
    let resp = within(t, c.user_list()).await?;
    Ok(resp
        .users()
        .iter()
        .filter_map(|u| u.strip_prefix("hms-join-").map(str::to_string))
        .collect())
}
