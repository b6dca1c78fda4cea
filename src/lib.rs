//! meshkit's protobuf contracts.
//!
//! Generated from `proto/` by `build.rs`: message types, Tonic servers and
//! clients for every service, and [`FILE_DESCRIPTOR_SET`], the encoded
//! descriptors (custom options such as `google.api.http` included) that
//! reflection and the gateway's transcoding read.
//!
//! [`events`]: the event contract (topics, schema names, record headers).
#![forbid(unsafe_code)]
#![allow(clippy::all, missing_docs)]

pub mod events;

/// Every file in `proto/` and its imports, encoded as a `FileDescriptorSet`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/meshkit_descriptor.bin"));

pub mod google {
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

pub mod meshkit {
    pub mod user {
        pub mod v1 {
            tonic::include_proto!("meshkit.user.v1");
        }
    }
    pub mod order {
        pub mod v1 {
            tonic::include_proto!("meshkit.order.v1");
        }
    }
    pub mod notification {
        pub mod v1 {
            tonic::include_proto!("meshkit.notification.v1");
        }
    }
    pub mod scheduler {
        pub mod v1 {
            tonic::include_proto!("meshkit.scheduler.v1");
        }
    }
}

pub use meshkit::{notification::v1 as notification, order::v1 as order, scheduler::v1 as scheduler, user::v1 as user};
