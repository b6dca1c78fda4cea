//! meshkit's scheduler: cron and fixed-rate jobs run on the mesh's
//! executors, XXL-Job style, with a fenced leader and a job log.
//!
//! Jobs are defined in the config center (`scheduler.jobs.NAME`) and change
//! live. Every instance joins the etcd slot group `scheduler` (one slot); the
//! one holding it leads, and the create revision of its key is the fencing
//! token every trigger carries. Executors (any meshkit process serving
//! `meshkit.scheduler.v1.JobExecutor`) check it against etcd before they run
//! anything; the job log in the database accepts a slot only under the newest
//! leader's fence, so no slot fires twice. See `docs/SCHEDULER.md`.
#![forbid(unsafe_code)]

pub mod api;
pub mod entity;
pub mod executors;
pub mod log;
pub mod migrations;
pub mod schedule;
pub mod scheduler;
pub mod settings;

use std::{sync::atomic::Ordering, time::Duration};

use meshkit_common::{
    Mesh, MeshServer, RunningServer, db,
    jobs::{LEADER_GROUP, format_slot},
    ownership::{GroupSpec, SlotGroup},
};
use meshkit_proto::scheduler::job_scheduler_server::JobSchedulerServer;

pub use api::SchedulerApi;
pub use scheduler::Scheduler;
pub use settings::{Config, JobSpec, SchedulerSettings};

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SlotLabels {
    outcome: &'static str,
}

/// The component name: config-center scope, default database file, migration records.
pub const COMPONENT: &str = "scheduler";

/// The scheduler's own API in the registry.
pub const SCHEDULER_SERVICE: &str = meshkit_proto::scheduler::job_scheduler_server::SERVICE_NAME;

/// Connects etcd and the database, joins the leader election, serves and registers.
pub async fn start(config: Config) -> meshkit_common::Result<RunningServer> {
    let mesh = Mesh::connect(&config, COMPONENT).await?;
    let config = mesh.config();
    let database = db::connect(&config.database).await?;
    db::migrate(&database, COMPONENT, migrations::MIGRATIONS).await?;
    let instance = config.registry.instance_id.clone();
    let executors = executors::Executors::watch(mesh.etcd.clone(), &config.etcd.prefix, mesh.tls.clone());
    let scheduler = Scheduler::new(
        instance.clone(),
        mesh.center.section(|c| c.scheduler.clone()),
        log::JobLog::new(database.clone()),
        executors.clone(),
    );

    let leader = scheduler.clone();
    let group = SlotGroup::spawn(
        mesh.etcd.clone(),
        GroupSpec {
            prefix: config.etcd.prefix.clone(),
            group: LEADER_GROUP.into(),
            member: instance,
            slots: 1,
            ttl_secs: config.registry.ttl_secs,
            stop_timeout: Duration::from_secs(5),
        },
        Box::new(move |slot| Box::pin(leader.clone().lead(slot))),
    );
    // Connections to executors that left are dropped now and then.
    let pruned = executors.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            pruned.prune();
        }
    });

    let report = scheduler.clone();
    let metrics = scheduler.clone();
    let api = SchedulerApi::new(scheduler, mesh.etcd.clone(), config.etcd.prefix.clone(), mesh.tls.clone());
    MeshServer::new(config)
        .with_mesh(&mesh)
        .metadata("component", COMPONENT)
        .add_service(JobSchedulerServer::new(api))
        .report("scheduler", move || {
            let leading = *report.leading.borrow();
            let next: serde_json::Map<String, serde_json::Value> = report
                .next
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(job, slot)| (job.clone(), format_slot(*slot).into()))
                .collect();
            serde_json::json!({
                "leading": leading.is_some(),
                "fence": leading.map(|l| l.fence.revision),
                "next_fire": next,
                "slots_fired": report.fired.load(Ordering::Relaxed),
                "slots_misfired": report.misfired.load(Ordering::Relaxed),
                "executors": report.executors.all().into_iter()
                    .map(|(id, component, addr)| serde_json::json!({"id": id, "component": component, "addr": addr}))
                    .collect::<Vec<_>>(),
            })
        })
        .metrics(meshkit_common::metrics::source(move || {
            let leading = metrics.leading.borrow().is_some();
            let fired = metrics.fired.load(Ordering::Relaxed);
            let misfired = metrics.misfired.load(Ordering::Relaxed);
            async move {
                let mut scrape = meshkit_common::metrics::Scrape::default();
                scrape
                    .gauge("meshkit_scheduler_leading", "1 while this scheduler instance leads (fires the schedules).")
                    .set(f64::from(u8::from(leading)));
                let slots = scrape.counters::<SlotLabels>(
                    "meshkit_scheduler_slots",
                    "Schedule slots this instance handled while leading, by outcome (fired, misfired).",
                );
                slots.get_or_create(&SlotLabels { outcome: "fired" }).inc_by(fired);
                slots.get_or_create(&SlotLabels { outcome: "misfired" }).inc_by(misfired);
                scrape
            }
        }))
        .metrics(db::metrics_source(&database, COMPONENT))
        .on_shutdown(group.close())
        .start()
        .await
}
