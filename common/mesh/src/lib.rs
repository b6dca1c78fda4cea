//! The front of the mesh library: what a meshkit service starts from.
//!
//! - [`Mesh`]: a process's etcd client, config center, governance and
//!   channel builder; [`MeshServer`]: health, reflection, registration,
//!   drain; [`admin`]: `/healthz`, `/pools`, `/metrics`, `/reports`.
//! - [`config`]: the sections every process reads ([`MeshConfig`]) and how a
//!   binary composes its own beside them.
//!
//! Each concern is its own crate, re-exported here under the module names
//! services use: `base` (time, shutdown, status, deadline, methods),
//! `telemetry` (logs, traces, metrics), `tls` (with authz), `registry` (etcd,
//! registry sessions, discovery, ownership, config center), `governance`,
//! `balance`, and behind features `db`, `events` and `jobs` (see
//! docs/ARCHITECTURE.md).
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod error;
pub mod h2guard;
pub mod preface;
pub mod server;

pub use meshkit_balance as balance;
pub use meshkit_base::{deadline, methods, shutdown, status, time};
#[cfg(feature = "db")]
pub use meshkit_db as db;
#[cfg(feature = "events")]
pub use meshkit_events as events;
pub use meshkit_governance as governance;
#[cfg(feature = "jobs")]
pub use meshkit_jobs as jobs;
pub use meshkit_registry::{config_center, control, discovery, etcd, history, keys, ownership, registry};
pub use meshkit_telemetry as telemetry;
pub use meshkit_telemetry::{metrics, trace};
pub use meshkit_tls as tls;
pub use meshkit_tls::authz;

pub use balance::{BalancedChannel, ChannelBuilder, ChannelConfig};
pub use config::{MeshConfig, ProcessConfig};
pub use error::{Error, Result};
pub use registry::{Instance, RegistrySession};
pub use server::{Mesh, MeshServer, RunningServer};
