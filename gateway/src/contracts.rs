//! The contracts the gateway fronts: meshkit's own descriptor set plus any
//! set named in `gateway.descriptor_sets`, in one `prost-reflect` pool.

use std::{collections::BTreeMap, path::Path};

use meshkit_common::methods::MethodTable;
use prost_reflect::{DescriptorPool, MethodDescriptor, ServiceDescriptor};

/// The descriptors, and the encoded sets they came from (for reflection).
#[derive(Debug, Clone)]
pub struct Contracts {
    pool: DescriptorPool,
    encoded: Vec<Vec<u8>>,
    services: BTreeMap<String, ServiceDescriptor>,
}

/// Why the contracts could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ContractsError {
    #[error("cannot read descriptor set {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("descriptor set {path} is not a valid FileDescriptorSet: {message}")]
    Decode { path: String, message: String },
}

/// Services only the mesh itself calls: never routed from the edge.
/// (`JobExecutor` runs job handlers for the scheduler.)
pub const INTERNAL_SERVICES: &[&str] = &[meshkit_common::jobs::EXECUTOR_SERVICE];

impl Contracts {
    /// meshkit's own contracts.
    pub fn meshkit() -> Result<Self, ContractsError> {
        Self::load(&[])
    }

    /// meshkit's contracts plus the descriptor set files in `extra`.
    pub fn load(extra: &[String]) -> Result<Self, ContractsError> {
        let mut sets = vec![("meshkit-proto".to_owned(), meshkit_proto::FILE_DESCRIPTOR_SET.to_vec())];
        for path in extra {
            let bytes =
                std::fs::read(Path::new(path)).map_err(|source| ContractsError::Read { path: path.clone(), source })?;
            sets.push((path.clone(), bytes));
        }
        let mut pool = DescriptorPool::new();
        for (path, bytes) in &sets {
            pool.decode_file_descriptor_set(bytes.as_slice())
                .map_err(|e| ContractsError::Decode { path: path.clone(), message: e.to_string() })?;
        }
        // google.rpc's error details (BadRequest, …), so a REST error body
        // shows them as JSON; not served by reflection.
        pool.decode_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .map_err(|e| ContractsError::Decode { path: "google.rpc error details".into(), message: e.to_string() })?;
        let services = pool
            .services()
            .filter(|s| !INTERNAL_SERVICES.contains(&s.full_name()))
            .map(|s| (s.full_name().to_owned(), s))
            .collect();
        Ok(Self { pool, encoded: sets.into_iter().map(|(_, b)| b).collect(), services })
    }

    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// The encoded descriptor sets, for the reflection service.
    pub fn encoded(&self) -> &[Vec<u8>] {
        &self.encoded
    }

    /// Every service, by fully qualified name.
    pub fn services(&self) -> impl Iterator<Item = &ServiceDescriptor> {
        self.services.values()
    }

    pub fn service(&self, name: &str) -> Option<&ServiceDescriptor> {
        self.services.get(name)
    }

    /// The method a gRPC path (`/package.Service/Method`) names.
    pub fn method(&self, path: &str) -> Option<MethodDescriptor> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        self.services.get(service)?.methods().find(|m| m.name() == method)
    }

    /// Retry facts of every method, for the balanced channels.
    pub fn method_table(&self) -> MethodTable {
        let mut table = MethodTable::default();
        for bytes in &self.encoded {
            if let Ok(t) = MethodTable::from_descriptor_set(bytes) {
                table.extend(t);
            }
        }
        table
    }
}

/// `/package.Service/Method` of a method.
pub fn grpc_path(method: &MethodDescriptor) -> String {
    format!("/{}/{}", method.parent_service().full_name(), method.name())
}
