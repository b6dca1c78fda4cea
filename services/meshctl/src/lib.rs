//! meshctl's commands, as functions that return the text they print, so
//! tests can call them: one module per command group.
#![forbid(unsafe_code)]

mod auth;
pub mod certs;
mod config;
mod events;
mod governance;
mod jobs;
mod processes;
mod prometheus;
mod registry;
mod settings;
mod split;
pub mod xds;

pub use auth::{etcd_auth_enable, etcd_user, role_grants};
pub use config::{
    KNOWN_COMPONENTS, check_change, config_delete, config_diff, config_get, config_history, config_rollback,
    config_set, config_watch, delete_setting, json_value, rollback_setting, sections_of, set_setting, setting_changes,
    shown, utc,
};
pub use events::{audit_replay, events_dead_letters, events_replay, kafka, replay_dead_letter};
pub use governance::governance;
pub use jobs::{
    jobs_history, jobs_list, jobs_pause, jobs_trigger, list_jobs, list_runs, ms_of, pause_job, run_status, trigger_job,
    when,
};
pub use processes::{EndpointRow, PartitionRow, RelayRow, events, pools};
pub use prometheus::{prometheus_targets, watch_prometheus_targets, write_prometheus_targets};
pub use registry::{
    InstanceView, Registration, control_instance, instance_control, instance_views, instances, leases, registrations,
    services, ttls_left,
};
pub use settings::{CtlConfig, client_tls};
pub use split::{SPLIT_PATH, parse_shares, split_set, split_show};

/// Who meshctl says made a change: `MESHKIT_OPERATOR`, else the login
/// name, marked as meshctl's.
pub fn operator() -> String {
    match std::env::var("MESHKIT_OPERATOR") {
        Ok(name) if !name.trim().is_empty() => name.trim().to_owned(),
        _ => format!("{} (meshctl)", std::env::var("USER").unwrap_or_else(|_| "unknown".into())),
    }
}

/// `audit [--limit N]`: the operators' changes, newest first.
pub async fn audit(client: &mut etcd_client::Client, prefix: &str, limit: i64) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let entries = meshkit_common::history::audit_log(client, prefix, limit).await?;
    let mut out =
        format!("{:>8}  {:<20} {:<24} {:<16} {:<48} DETAIL\n", "REVISION", "WHEN (UTC)", "BY", "ACTION", "TARGET");
    for e in entries {
        let _ = writeln!(
            out,
            "{:>8}  {:<20} {:<24} {:<16} {:<48} {}",
            e.revision,
            utc(e.at_ms),
            e.by,
            e.action,
            e.target,
            e.detail
        );
    }
    Ok(out)
}

/// The scheduler's API in the registry.
pub(crate) const SCHEDULER_SERVICE: &str = meshkit_proto::scheduler::job_scheduler_server::SERVICE_NAME;

pub const USAGE: &str = "\
usage: meshctl [--etcd HOST:PORT[,…]] [--prefix /meshkit] COMMAND

commands:
  services                       services and how many instances each has
  instances [SERVICE]            instances with address, zone, version, weight, state, lease and TTL left
  instances drain INSTANCE_ID [--service S]
                                 take an instance out of rotation while it runs: it withdraws its
                                 registration (callers drop it) and answers NOT_SERVING; it lasts
                                 until undrained or the process ends
  instances undrain INSTANCE_ID [--service S]
                                 put a drained instance back in rotation
  instances weight INSTANCE_ID WEIGHT|default [--service S]
                                 the instance's weight (1..=10000, 100 as configured by default)
                                 until set again or the process ends
  leases                         leases held by instances, with TTL left and their keys
  pools INSTANCE_ID|ADMIN_ADDR   a process's balanced pools: endpoints, state, load, calls in flight
  events                         outbox relays (who publishes, how much) and consumed partitions
                                 (owner, fence, offset, lag, applied, duplicates, dead-lettered)
  events dead-letters [TOPIC] [--limit N]
                                 dead letters, newest first: where, event id, where from, group, error
                                 (Kafka from MESHKIT_EVENTS_BROKERS, its TLS and SASL, as the services)
  events replay DLQ_TOPIC PARTITION OFFSET
                                 put a dead letter back on its topic: the group that dead-lettered it
                                 applies it once (a second replay or a redelivery is skipped), groups
                                 that applied it skip it; recorded in the audit log
  config get COMPONENT           settings from etcd in force for a component (_global and its own)
  config set COMPONENT PATH JSON validate, then write a setting (`_global` for every process)
  config delete COMPONENT PATH   remove a setting
  config history COMPONENT PATH  a setting's changes, newest first: value, who, when (the last 100,
                                 kept past etcd's compaction)
  config diff COMPONENT FROM [TO]
                                 the component's own settings that differ between two revisions
  config rollback COMPONENT PATH REVISION
                                 set a setting back to its value at REVISION (checked like a set)
  config watch COMPONENT         print changes as they happen
  audit [--limit N]              the operators' changes (meshctl and the console), newest first:
                                 who, what, when
  governance INSTANCE_ID|ADMIN_ADDR
                                 a process's rules, breakers, shedding and refusals by rule
  split SERVICE [VERSION=PERCENT …] [--clear]
                                 the traffic split by version (e.g. spring-1=90 0.1.0=10, adding up to
                                 100), kept in the config center and applied live by every balanced
                                 channel and xDS client; alone: the split and instances by version
  jobs list                      the scheduler's jobs: schedule, executors, state, next and last run, leader
  jobs trigger NAME [PARAM]      run a job now (PARAM replaces the job's param for this run)
  jobs pause NAME | jobs resume NAME
                                 stop or restart firing a job on schedule
  jobs history [NAME] [--limit N]
                                 the job log, newest first: trigger, slot, shard, executor, status, time
  certs --dir DIR [--trust-domain meshkit] [--days 365] NAME…
                                 a development CA (made once) and a certificate per NAME with the
                                 identity spiffe://meshkit/NAME (rotation: issue a name again)
  etcd-user COMPONENT SERVICE…   (password on stdin) the role meshkit-COMPONENT: read the mesh, write
                                 only its own registrations, groups and config; a user with it
  etcd-auth-enable               (root password on stdin) the root user, then etcd auth on
  xds bootstrap [--server HOST:PORT] [--node ID] [--zone ZONE]
                                 a gRPC xDS bootstrap (GRPC_XDS_BOOTSTRAP) for grpc-java, grpc-go…
                                 clients of `xds:///SERVICE`; mTLS files from MESHKIT_TLS_* when on
  xds clients                    every xDS server's clients: node, zone, subscriptions, versions
                                 sent and accepted, NACKs
  prometheus-sd [--out FILE] [--watch]
                                 Prometheus file_sd targets: every process's admin endpoint from the
                                 registry; to stdout, or to FILE (kept current with --watch)

The etcd endpoints default to MESHKIT_ETCD_ENDPOINTS, then 127.0.0.1:2379; MESHKIT_ETCD_USERNAME,
MESHKIT_ETCD_PASSWORD and MESHKIT_ETCD_{CA,CERT,KEY}_FILE reach an etcd with auth and TLS on, and
MESHKIT_TLS_{ENABLED,CERT_FILE,KEY_FILE,CA_FILE} give meshctl a certificate for mTLS services.
Changes are recorded as made by MESHKIT_OPERATOR (default: the login name).";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_by_name_at_any_depth() {
        assert_eq!(shown("etcd.password", "\"p4ss\""), "\"<redacted>\"");
        assert_eq!(
            shown("events", r#"{"sasl_password":"p4ss","brokers":["a:1"]}"#),
            r#"{"brokers":["a:1"],"sasl_password":"<redacted>"}"#
        );
        assert_eq!(
            shown("gateway", r#"{"jwt":{"hs256_secret":"s3cret","issuer":"me"}}"#),
            r#"{"jwt":{"hs256_secret":"<redacted>","issuer":"me"}}"#
        );
        assert_eq!(shown("log.filter", "\"info\""), "\"info\"");
    }

    fn set(component: &str, path: &str, value: &str) -> Result<(), String> {
        let entry = meshkit_common::config_center::Entry {
            scope: component.into(),
            path: path.into(),
            value: value.into(),
            mod_revision: 0,
        };
        check_change(component, path, &[entry])
    }

    #[test]
    fn a_change_is_checked_as_the_component_it_names_reads_it() {
        assert_eq!(set("gateway", "gateway.workers", "2"), Ok(()));
        assert_eq!(set("_global", "gateway.workers", "2"), Ok(()), "the gateway reads it");
        assert_eq!(set("order", "events.relay_batch", "10"), Ok(()));
        let err = set("user", "gateway.workers", "2").expect_err("user-service reads no gateway section");
        assert!(err.contains("user reads no section `gateway`"), "{err}");
        let err = set("_global", "registy.ttl_secs", "5").expect_err("a misspelt section");
        assert!(err.contains("unknown setting `registy.ttl_secs`: no component reads a section `registy`"), "{err}");
        let err = set("_global", "registry.ttl_secs", "1").expect_err("out of range for everyone");
        assert!(err.contains("registry.ttl_secs"), "{err}");
        let err = set("gateway", "gateway.workers", "1000").expect_err("above 256");
        assert!(err.contains("gateway.workers"), "{err}");
        let err = set("scheduler", "scheduler.jobs.j", r#"{"cron":"* * * * *","target":"t","handler":"h"}"#)
            .expect_err("five fields");
        assert!(err.contains("scheduler.jobs.j.cron") && err.contains("has 5 fields"), "{err}");
        // A component meshctl does not know (a Java service) is checked on the mesh's sections only.
        assert_eq!(set("payments", "payments.provider", "\"x\""), Ok(()));
        assert!(set("payments", "registry.ttl_secs", "1").is_err());
    }
}
