//! `meshctl etcd-user` and `etcd-auth`: etcd roles scoped to one component.

use std::fmt::Write as _;

use anyhow::Context;
use etcd_client::Client;
use meshkit_common::keys;

/// The key prefixes a component may write, and the role that grants them:
/// its own registrations and their operator controls, its own slot groups (outbox relay, consumers,
/// the scheduler's election) and its own config scope; read on the whole mesh.
pub fn role_grants(prefix: &str, component: &str, services: &[&str]) -> Vec<(String, bool)> {
    let mut grants = vec![(format!("{prefix}/"), false)];
    for service in services {
        grants.push((keys::service(prefix, service), true));
        // An operator's drain or weight, written again under a new lease.
        grants.push((format!("{}{service}/", keys::controls(prefix)), true));
    }
    grants.push((keys::group(prefix, &keys::outbox_group(component)), true));
    grants.push((keys::group(prefix, &format!("consumers/{component}")), true));
    grants.push((keys::group(prefix, component), true));
    grants.push((keys::config(prefix, component), true));
    grants
}

/// `etcd-user COMPONENT SERVICE…`: creates (or updates) the role
/// `meshkit-COMPONENT` with [`role_grants`] and the user COMPONENT with it.
pub async fn etcd_user(
    client: &mut Client,
    prefix: &str,
    component: &str,
    services: &[&str],
    password: &str,
) -> anyhow::Result<String> {
    use etcd_client::{Permission, RoleRevokePermissionOptions};
    anyhow::ensure!(
        !component.is_empty() && component.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{component:?} is not a component name"
    );
    anyhow::ensure!(password.len() >= 8, "the password must have at least 8 characters");
    let role = format!("meshkit-{component}");
    if client.role_get(role.as_str()).await.is_err() {
        client.role_add(role.as_str()).await.context("adding the role")?;
    } else {
        // Start from nothing, so the role grants exactly what is listed.
        let existing = client.role_get(role.as_str()).await.context("reading the role")?;
        for perm in existing.permissions() {
            let options = RoleRevokePermissionOptions::new().with_range_end(perm.range_end());
            let _ = client.role_revoke_permission(role.as_str(), perm.key(), Some(options)).await;
        }
    }
    let mut out = String::new();
    for (key, write) in role_grants(prefix, component, services) {
        let permission =
            if write { Permission::read_write(key.as_str()) } else { Permission::read(key.as_str()) }.with_prefix();
        client.role_grant_permission(role.as_str(), permission).await.context("granting a permission")?;
        let _ = writeln!(out, "{role}: {} {key}*", if write { "readwrite" } else { "read" });
    }
    if client.user_get(component).await.is_err() {
        client.user_add(component, password, None).await.context("adding the user")?;
    } else {
        client.user_change_password(component, password).await.context("changing the user's password")?;
    }
    client.user_grant_role(component, role.as_str()).await.context("granting the role")?;
    let _ = writeln!(out, "user {component}: role {role}");
    Ok(out)
}

/// `etcd-auth-enable`: the `root` user (with the root role) and auth on.
pub async fn etcd_auth_enable(client: &mut Client, root_password: &str) -> anyhow::Result<String> {
    anyhow::ensure!(root_password.len() >= 8, "the root password must have at least 8 characters");
    if client.user_get("root").await.is_err() {
        client.user_add("root", root_password, None).await.context("adding root")?;
    }
    if client.role_get("root").await.is_err() {
        client.role_add("root").await.context("adding the root role")?;
    }
    client.user_grant_role("root", "root").await.context("granting root")?;
    client.auth_enable().await.context("enabling auth")?;
    Ok("etcd auth enabled; connect as root (MESHKIT_ETCD_USERNAME / MESHKIT_ETCD_PASSWORD) to manage it\n".into())
}
