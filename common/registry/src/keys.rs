//! The whole etcd keyspace under `etcd.prefix` (`/meshkit` by default), in
//! one place. Java and Go services, meshctl and the console read and write
//! the same keys (docs/REGISTRY.md):
//!
//! ```text
//! {prefix}/services/{service}/{instance_id}      an instance, under its lease (JSON Instance)
//! {prefix}/config/{component|_global}/{path}     a setting (JSON), see the config center
//! {prefix}/groups/{group}/members/{member}       a live member of a slot group, under its lease
//! {prefix}/groups/{group}/owners/{slot}          the owner of a slot, under its lease; the fence
//! {prefix}/control/{service}/{instance_id}       an operator's drain or weight for an instance, under its lease
//! {prefix}/history/config/{component}/{path}/{id} one change to a setting: who, when, the value (no lease)
//! {prefix}/audit/{id}                            one operator change: who, what, when (no lease)
//! ```
//!
//! Groups: `outbox/{component}` (the elected outbox relay),
//! `consumers/{group}/{topic}` (a topic's partitions), `scheduler` (the
//! scheduler's leader) and whatever a component names.

/// `{prefix}/services/`: every registration.
pub fn services(prefix: &str) -> String {
    format!("{prefix}/services/")
}

/// `{prefix}/services/{service}/`: the prefix a discovery watch reads.
pub fn service(prefix: &str, service: &str) -> String {
    format!("{prefix}/services/{service}/")
}

/// `{prefix}/services/{service}/{instance_id}`.
pub fn instance(prefix: &str, service: &str, instance_id: &str) -> String {
    format!("{prefix}/services/{service}/{instance_id}")
}

/// `{prefix}/config/`: every setting of every component.
pub fn config_root(prefix: &str) -> String {
    format!("{prefix}/config/")
}

/// `{prefix}/config/{component}/`: one component's settings (or `_global`'s).
pub fn config(prefix: &str, component: &str) -> String {
    format!("{prefix}/config/{component}/")
}

/// `{prefix}/groups/{group}/`: a slot group's members and owners.
pub fn group(prefix: &str, group: &str) -> String {
    format!("{prefix}/groups/{group}/")
}

/// `{prefix}/groups/{group}/members/{member}`.
pub fn group_member(prefix: &str, group: &str, member: &str) -> String {
    format!("{prefix}/groups/{group}/members/{member}")
}

/// `{prefix}/groups/{group}/owners/{slot}`.
pub fn slot_owner(prefix: &str, group: &str, slot: u32) -> String {
    format!("{prefix}/groups/{group}/owners/{slot}")
}

/// `{prefix}/control/`: every operator control of every instance.
pub fn controls(prefix: &str) -> String {
    format!("{prefix}/control/")
}

/// `{prefix}/control/{service}/{instance_id}`: an operator's drain or weight
/// for one registration, bound to the instance's lease.
pub fn control(prefix: &str, service: &str, instance_id: &str) -> String {
    format!("{prefix}/control/{service}/{instance_id}")
}

/// `{prefix}/history/config/{component}/`: the recorded changes of a component's settings.
pub fn config_history(prefix: &str, component: &str) -> String {
    format!("{prefix}/history/config/{component}/")
}

/// `{prefix}/history/config/{component}/{path}/`: one setting's recorded changes.
pub fn setting_history(prefix: &str, component: &str, path: &str) -> String {
    format!("{prefix}/history/config/{component}/{path}/")
}

/// `{prefix}/audit/`: the operators' changes, oldest first.
pub fn audit(prefix: &str) -> String {
    format!("{prefix}/audit/")
}

/// The group whose one slot elects `component`'s outbox relay.
pub fn outbox_group(component: &str) -> String {
    format!("outbox/{component}")
}

/// The group that shares out `topic`'s partitions among `group`'s consumers.
pub fn consumer_group(group: &str, topic: &str) -> String {
    format!("consumers/{group}/{topic}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_as_the_contract_says() {
        let p = "/meshkit";
        assert_eq!(
            instance(p, "meshkit.user.v1.UserService", "i-1"),
            "/meshkit/services/meshkit.user.v1.UserService/i-1"
        );
        assert!(instance(p, "s", "i").starts_with(&service(p, "s")) && service(p, "s").starts_with(&services(p)));
        assert!(config(p, "_global").starts_with(&config_root(p)));
        let g = consumer_group("notification", "order-events");
        assert_eq!(slot_owner(p, &g, 3), "/meshkit/groups/consumers/notification/order-events/owners/3");
        assert_eq!(group_member(p, &outbox_group("order"), "i-1"), "/meshkit/groups/outbox/order/members/i-1");
        assert!(slot_owner(p, "g", 0).starts_with(&group(p, "g")));
        assert!(control(p, "s", "i").starts_with(&controls(p)));
        assert!(setting_history(p, "user", "log.filter").starts_with(&config_history(p, "user")));
        // History and controls sit outside what the config and service watches read.
        assert!(!config_history(p, "user").starts_with(&config_root(p)));
        assert!(!controls(p).starts_with(&services(p)));
    }
}
