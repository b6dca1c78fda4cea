//! order-service's settings.

use meshkit_common::{MeshConfig, db::DatabaseSettings, events::EventSettings};
use serde::{Deserialize, Serialize};

/// What this service reads: the mesh's sections and its own
/// (`[database]`, `[events]`); sections of other components are left alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub mesh: MeshConfig,
    pub database: DatabaseSettings,
    pub events: EventSettings,
}

meshkit_common::compose_settings!(Config { database, events });
