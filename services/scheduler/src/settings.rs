//! The scheduler's settings: its `scheduler` section (jobs, misfires,
//! retries) beside the mesh's and the database's.

use meshkit_common::{
    MeshConfig,
    config::{Result, Settings, bad},
    db::DatabaseSettings,
};
use serde::{Deserialize, Serialize};

use crate::schedule::Schedule;

/// What the scheduler reads: the mesh's sections, `[database]` (the job log)
/// and `[scheduler]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub mesh: MeshConfig,
    pub database: DatabaseSettings,
    pub scheduler: SchedulerSettings,
}

meshkit_common::compose_settings!(Config { database, scheduler });

/// The scheduler's jobs and how it fires them: hot-reloadable from the config
/// center (`scheduler.jobs.NAME`). See `docs/SCHEDULER.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSettings {
    pub jobs: std::collections::BTreeMap<String, JobSpec>,
    /// Slots missed by less than this (a leader change, a slow tick) still
    /// fire, late; older ones follow the job's misfire policy.
    pub misfire_threshold_ms: u64,
    /// Pause between retries of a failed run.
    pub retry_backoff_ms: u64,
}

/// One job: when it fires, where it runs and what happens when it fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSpec {
    /// Cron with seconds: `sec min hour day-of-month month day-of-week [year]`
    /// (Quartz style: `0/5 * * * * *`, `0 0 2 * * MON-FRI`). Or set `every_ms`.
    pub cron: String,
    /// IANA time zone the cron expression is read in (`Asia/Shanghai`).
    pub time_zone: String,
    /// Fixed rate: slots at every multiple of this many milliseconds.
    pub every_ms: u64,
    /// The executors: processes registering the `JobExecutor` service with
    /// this `component` metadata (`order`).
    pub target: String,
    /// The handler the executor runs.
    pub handler: String,
    /// Text passed to the handler.
    pub param: String,
    /// round_robin, random, first, last, consistent_hash, failover or sharding_broadcast.
    pub route: String,
    /// Shards of a sharding broadcast; 0 gives one per live executor.
    pub shards: u32,
    /// How long one run may take; the executor is told by the call's deadline.
    pub timeout_ms: u64,
    /// Further attempts after a failed one, on another executor when there is one.
    pub retries: u32,
    /// What happens to slots missed by more than the threshold: `skip` (none
    /// of them fires) or `fire_once` (the newest fires once, now).
    pub misfire: String,
    /// When a slot comes while the previous run still goes: `serial` (it
    /// waits for that run to end, then runs; at most 10 wait), `skip` it
    /// (logged as skipped) or `allow` both at once.
    pub overlap: String,
    /// Paused jobs do not fire on schedule; manual triggers still run.
    pub paused: bool,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self { jobs: Default::default(), misfire_threshold_ms: 5_000, retry_backoff_ms: 500 }
    }
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            cron: String::new(),
            time_zone: "UTC".into(),
            every_ms: 0,
            target: String::new(),
            handler: String::new(),
            param: String::new(),
            route: "round_robin".into(),
            shards: 0,
            timeout_ms: 60_000,
            retries: 0,
            misfire: "skip".into(),
            overlap: "serial".into(),
            paused: false,
        }
    }
}

/// The route strategies a job may name.
pub const JOB_ROUTES: &[&str] =
    &["round_robin", "random", "first", "last", "consistent_hash", "failover", "sharding_broadcast"];

impl Settings for SchedulerSettings {
    /// Checks every job, its schedule included; the error names it
    /// (`scheduler.jobs.NAME.cron`).
    fn validate(&self) -> Result<()> {
        if self.misfire_threshold_ms > 86_400_000 {
            return bad("scheduler.misfire_threshold_ms", "is above one day");
        }
        for (name, job) in &self.jobs {
            let at = |key: &str| format!("scheduler.jobs.{name}.{key}");
            if name.is_empty()
                || name.len() > 100
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            {
                return bad(format!("scheduler.jobs.{name:?}"), "a job name is 1-100 of a-z, A-Z, 0-9, - and _");
            }
            if job.cron.trim().is_empty() == (job.every_ms == 0) {
                return bad(at("cron"), "set cron or every_ms (one of them)");
            }
            if job.every_ms > 0 && job.every_ms < 100 {
                return bad(at("every_ms"), format!("{} is below 100", job.every_ms));
            }
            if job.target.is_empty() {
                return bad(at("target"), "must name the executors' component");
            }
            if job.handler.is_empty() {
                return bad(at("handler"), "must name the handler to run");
            }
            if !JOB_ROUTES.contains(&job.route.as_str()) {
                return bad(at("route"), format!("{:?} is not one of {}", job.route, JOB_ROUTES.join(", ")));
            }
            if job.shards > 1024 {
                return bad(at("shards"), format!("{} is above 1024", job.shards));
            }
            if job.shards > 0 && job.route != "sharding_broadcast" {
                return bad(at("shards"), "only a sharding_broadcast job has shards");
            }
            if !(1..=86_400_000).contains(&job.timeout_ms) {
                return bad(at("timeout_ms"), format!("{} is outside 1..=86400000", job.timeout_ms));
            }
            if job.retries > 10 {
                return bad(at("retries"), format!("{} is above 10", job.retries));
            }
            if !matches!(job.misfire.as_str(), "skip" | "fire_once") {
                return bad(at("misfire"), format!("{:?} is neither skip nor fire_once", job.misfire));
            }
            if !matches!(job.overlap.as_str(), "serial" | "skip" | "allow") {
                return bad(at("overlap"), format!("{:?} is not serial, skip or allow", job.overlap));
            }
        }
        for (name, job) in &self.jobs {
            if let Err((key, problem)) = Schedule::from_spec(job) {
                return bad(format!("scheduler.jobs.{name}.{key}"), problem);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use meshkit_common::config::Env;

    use super::*;

    impl Config {
        fn load(env: &dyn Env) -> Result<Self> {
            meshkit_common::config::load_process(crate::COMPONENT, env)
        }
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn jobs_load_from_a_file_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("scheduler.toml");
        std::fs::write(
            &file,
            "[scheduler.jobs.cancel-unpaid]\ncron = \"0 */5 * * * *\"\ntime_zone = \"Asia/Shanghai\"\n\
             target = \"order\"\nhandler = \"cancel-unpaid-orders\"\n",
        )
        .unwrap();
        let c = Config::load(&env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap();
        let job = &c.scheduler.jobs["cancel-unpaid"];
        assert_eq!((job.route.as_str(), job.overlap.as_str(), job.misfire.as_str()), ("round_robin", "serial", "skip"));
        let base = "target = \"order\"\nhandler = \"h\"\n";
        for (fields, expect) in [
            ("", "scheduler.jobs.j.cron: set cron or every_ms"),
            ("cron = \"0 * * * * *\"\nevery_ms = 1000\n", "scheduler.jobs.j.cron: set cron or every_ms"),
            ("every_ms = 1000\nroute = \"nearest\"\n", "scheduler.jobs.j.route: \"nearest\" is not one of"),
            ("every_ms = 1000\nshards = 3\n", "only a sharding_broadcast job has shards"),
            ("every_ms = 1000\nmisfire = \"all\"\n", "scheduler.jobs.j.misfire"),
            ("every_ms = 1000\novrelap = \"skip\"\n", "unknown field `ovrelap`"),
        ] {
            std::fs::write(&file, format!("[scheduler.jobs.j]\n{base}{fields}")).unwrap();
            let err = Config::load(&env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap_err();
            assert!(err.to_string().contains(expect), "{fields}: {err}");
        }
        std::fs::write(&file, "[scheduler.jobs.j]\nevery_ms = 1000\nhandler = \"h\"\n").unwrap();
        let err = Config::load(&env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap_err();
        assert!(err.to_string().contains("scheduler.jobs.j.target"), "{err}");
    }

    #[test]
    fn schedules_are_checked_when_the_settings_are() {
        let mut settings = SchedulerSettings::default();
        let job = JobSpec {
            cron: "0 * * * * *".into(),
            time_zone: "Mars/Olympus".into(),
            target: "order".into(),
            handler: "h".into(),
            ..JobSpec::default()
        };
        settings.jobs.insert("j".into(), job);
        let err = settings.validate().expect_err("an unknown time zone");
        assert!(err.to_string().contains("scheduler.jobs.j.time_zone"), "{err}");
    }
}
