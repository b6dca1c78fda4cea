//! The mesh library every meshkit service and the gateway link.
//!
//! - [`config`]: layered settings (defaults < TOML file < `MESHKIT_*` env), validated
//!   at start with errors that name the setting.
//! - [`registry`]: the registry contract and the lease session that keeps an
//!   instance's keys alive in etcd.
//! - [`discovery`]: a resumable prefix watch per service, as tower `Change`s.
//! - [`balance`]: the [`ChannelBuilder`](balance::ChannelBuilder), which turns a
//!   service name into a load-balanced, tonic-compatible channel.
//! - [`server`]: the server builder: health, reflection, registration, drain.
//! - [`db`]: sea-orm connections and forward-only migrations.
//! - [`ownership`]: numbered slots shared out among live members by etcd leases, with fences.
//! - [`events`]: the transactional outbox and idempotent, fenced Kafka consumers.
//! - [`jobs`]: job schedules and the `JobExecutor` service that runs a process's job handlers.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod balance;
pub mod config;
pub mod config_center;
pub mod db;
pub mod deadline;
pub mod discovery;
pub mod error;
pub mod etcd;
pub mod events;
pub mod governance;
pub mod jobs;
pub mod methods;
pub mod metrics;
pub mod ownership;
pub mod registry;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod trace;

pub use balance::{BalancedChannel, ChannelBuilder, ChannelConfig};
pub use config::MeshConfig;
pub use error::{Error, Result};
pub use registry::{Instance, RegistrySession};
pub use server::{Mesh, MeshServer, RunningServer};
