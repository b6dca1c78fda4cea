//! The scheduler tests' cluster: etcd, scheduler-service processes sharing
//! one job log, and job-executor processes that record every run in a file.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use meshkit_common::{Instance, jobs::leader_key};
use meshkit_proto::scheduler::job_scheduler_client::JobSchedulerClient;
use tonic::transport::Channel;

use crate::{Etcd, ServiceProcess, eventually, free_port, sqlite_url};

pub const SCHEDULER: &str = "meshkit.scheduler.v1.JobScheduler";
pub const EXECUTOR: &str = "meshkit.scheduler.v1.JobExecutor";
pub const SIGKILL: i32 = 9;
pub const SIGCONT: i32 = 18;
pub const SIGSTOP: i32 = 19;

/// Lease TTL of every process in these tests.
pub const TTL_SECS: u64 = 2;

/// One line an executor wrote: `EVENT JOB SLOT_MS SHARD/TOTAL ATTEMPT INSTANCE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub event: String,
    pub job: String,
    pub slot_ms: i64,
    pub shard: u32,
    pub total: u32,
    pub attempt: u32,
    pub instance: String,
}

pub struct JobCluster {
    pub etcd: Etcd,
    pub dir: tempfile::TempDir,
    pub schedulers: BTreeMap<String, ServiceProcess>,
    pub executors: BTreeMap<String, ServiceProcess>,
}

impl JobCluster {
    pub async fn start() -> Self {
        let etcd = Etcd::start().await.expect("etcd starts");
        let dir = tempfile::Builder::new().prefix("meshkit-jobs-").tempdir().expect("temp dir");
        Self { etcd, dir, schedulers: BTreeMap::new(), executors: BTreeMap::new() }
    }

    pub fn records_file(&self) -> PathBuf {
        self.dir.path().join("runs.log")
    }

    fn env(&self, id: &str) -> Vec<(&'static str, String)> {
        vec![
            ("MESHKIT_ETCD_ENDPOINTS", self.etcd.endpoint()),
            ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{}", free_port())),
            ("MESHKIT_REGISTRY_INSTANCE_ID", id.to_owned()),
            ("MESHKIT_REGISTRY_TTL_SECS", TTL_SECS.to_string()),
            ("MESHKIT_SERVER_DRAIN_DELAY_MS", "100".to_owned()),
            ("RUST_LOG", "info,h2=warn,hyper=warn,tower=warn,sqlx=warn".to_owned()),
        ]
    }

    /// Starts a scheduler instance; all share one SQLite job log.
    pub fn scheduler(&mut self, id: &str) {
        let mut env = self.env(id);
        env.push(("MESHKIT_DATABASE_URL", sqlite_url(self.dir.path(), "scheduler")));
        let process = ServiceProcess::spawn("scheduler-service", &env, self.dir.path()).expect("scheduler starts");
        self.schedulers.insert(id.to_owned(), process);
    }

    /// Starts a job-executor of component `worker`.
    pub fn executor(&mut self, id: &str) {
        let mut env = self.env(id);
        env.push(("JOB_RECORD_FILE", self.records_file().display().to_string()));
        let process = ServiceProcess::spawn("job-executor", &env, self.dir.path()).expect("executor starts");
        self.executors.insert(id.to_owned(), process);
    }

    /// Defines (or replaces) a job through the config center.
    pub async fn define(&self, name: &str, job: serde_json::Value) {
        let mut client = self.etcd.client().await;
        client
            .put(format!("/meshkit/config/scheduler/scheduler.jobs.{name}"), job.to_string(), None)
            .await
            .expect("job written to etcd");
    }

    /// The ids registered for `service`.
    pub async fn registered(&self, service: &str) -> Vec<String> {
        let mut client = self.etcd.client().await;
        let prefix = format!("/meshkit/services/{service}/");
        let options = etcd_client::GetOptions::new().with_prefix().with_keys_only();
        match client.get(prefix.as_str(), Some(options)).await {
            Ok(resp) => {
                resp.kvs().iter().map(|kv| kv.key_str().unwrap_or("").trim_start_matches(&prefix).to_owned()).collect()
            }
            Err(_) => Vec::new(),
        }
    }

    pub async fn wait_registered(&self, service: &str, ids: &[&str]) {
        eventually(&format!("{ids:?} registered as {service}"), Duration::from_secs(20), || async {
            let now = self.registered(service).await;
            ids.iter().all(|id| now.iter().any(|n| n == id)).then_some(())
        })
        .await;
    }

    /// The leading scheduler and its fencing token (the leader key's create revision).
    pub async fn leader(&self) -> Option<(String, i64)> {
        let mut client = self.etcd.client().await;
        let resp = client.get(leader_key("/meshkit"), None).await.ok()?;
        resp.kvs().first().map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.create_revision()))
    }

    pub async fn wait_leader(&self) -> (String, i64) {
        eventually("a scheduler leads", Duration::from_secs(20), || self.leader()).await
    }

    /// The registered address of `id` serving `service`.
    pub async fn addr(&self, service: &str, id: &str) -> String {
        let mut client = self.etcd.client().await;
        let resp = client.get(format!("/meshkit/services/{service}/{id}"), None).await.expect("etcd answers");
        let kv = resp.kvs().first().unwrap_or_else(|| panic!("{id} is not registered as {service}"));
        serde_json::from_slice::<Instance>(kv.value()).expect("instance JSON").addr
    }

    /// A client of scheduler instance `id`.
    pub async fn api(&self, id: &str) -> JobSchedulerClient<Channel> {
        let addr = self.addr(SCHEDULER, id).await;
        let channel =
            Channel::from_shared(format!("http://{addr}")).expect("address").connect().await.expect("connects");
        JobSchedulerClient::new(channel)
    }

    /// Waits until scheduler `id` lists every job of `names` (its config
    /// center applies a definition a moment after etcd has it).
    pub async fn wait_jobs_known(&self, id: &str, names: &[&str]) {
        let api = self.api(id).await;
        eventually(&format!("{id} knows jobs {names:?}"), Duration::from_secs(10), || {
            let mut api = api.clone();
            async move {
                let jobs = api.list_jobs(meshkit_proto::scheduler::ListJobsRequest {}).await.ok()?.into_inner().jobs;
                names.iter().all(|n| jobs.iter().any(|j| j.name == *n)).then_some(())
            }
        })
        .await;
    }

    /// Waits until scheduler `id` knows `count` live executors (its registry
    /// watch may trail etcd by a moment).
    pub async fn wait_executors_known(&self, id: &str, count: usize) {
        let mut client = self.etcd.client().await;
        let resp = client.get(format!("/meshkit/services/{SCHEDULER}/{id}"), None).await.expect("etcd answers");
        let instance: Instance = serde_json::from_slice(resp.kvs()[0].value()).expect("instance JSON");
        let admin = instance.metadata["admin"].clone();
        eventually(&format!("{id} knows {count} executors"), Duration::from_secs(10), || async {
            let text = meshkit_common::admin::http_get(&admin, "/reports").await.ok()?;
            let reports: serde_json::Value = serde_json::from_str(&text).ok()?;
            (reports["scheduler"]["executors"].as_array()?.len() == count).then_some(())
        })
        .await;
    }

    /// Every line the executors wrote so far.
    pub fn records(&self) -> Vec<Record> {
        read_records(&self.records_file())
    }
}

pub fn read_records(path: &Path) -> Vec<Record> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let (shard, total) = f.get(3)?.split_once('/')?;
            Some(Record {
                event: f.first()?.to_string(),
                job: f.get(1)?.to_string(),
                slot_ms: f.get(2)?.parse().ok()?,
                shard: shard.parse().ok()?,
                total: total.parse().ok()?,
                attempt: f.get(4)?.parse().ok()?,
                instance: f.get(5)?.to_string(),
            })
        })
        .collect()
}
