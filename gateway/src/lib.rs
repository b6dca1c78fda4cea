//! meshkit's edge gateway: REST/JSON transcoding from the `google.api.http`
//! annotations, grpc-web and gRPC passthrough over balanced channels.
//!
//! The gateway is built on the same `meshkit-common` discovery and balanced
//! channels the services use; its routes come from
//! `meshkit_proto::FILE_DESCRIPTOR_SET` (plus any descriptor sets named in
//! its settings), so it needs no routing table.
#![forbid(unsafe_code)]

pub mod admission;
pub mod auth;
pub mod contracts;
pub mod errors;
pub mod openapi;
pub mod routes;
pub mod server;
pub mod settings;
pub mod template;
pub mod transcode;
pub mod workers;

pub use server::{Gateway, RunningGateway, StartError, start};
pub use settings::{GatewayConfig, GatewaySettings};
