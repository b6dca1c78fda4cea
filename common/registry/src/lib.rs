//! Everything meshkit keeps in etcd.
//!
//! - [`keys`]: the whole etcd keyspace, in one place.
//! - [`etcd`]: connecting with the timeouts, TLS and auth every process wants.
//! - [`registry`]: the registry contract and the lease session that keeps an
//!   instance's keys alive.
//! - [`discovery`]: a resumable prefix watch per service, as tower `Change`s.
//! - [`ownership`]: numbered slots shared out among live members by leases,
//!   with fences.
//! - [`config_center`]: settings kept in etcd, watched and layered over a
//!   process's own.
//! - [`control`]: an operator's drain or weight for a live instance.
//! - [`history`]: settings changes recorded past etcd's compaction, and the
//!   operators' audit log.
//! - [`settings`]: the `etcd` and `registry` sections.
#![forbid(unsafe_code)]

pub mod config_center;
pub mod control;
pub mod discovery;
pub mod error;
pub mod etcd;
pub mod history;
pub mod keys;
pub mod ownership;
pub mod registry;
pub mod settings;

pub use error::{Error, Result};
pub use registry::{Instance, RegistrySession};
pub use settings::{EtcdSettings, RegistrySettings};
