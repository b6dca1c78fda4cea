//! What the contracts say about each method, read from the descriptor set:
//! whether it may be retried after it reached the server (marked
//! `idempotency_level = NO_SIDE_EFFECTS` or `IDEMPOTENT`) and whether its
//! request streams (then it cannot be replayed).

use std::collections::HashMap;

use prost::Message;
use prost_types::{FileDescriptorSet, method_options::IdempotencyLevel};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MethodInfo {
    pub idempotent: bool,
    pub client_streaming: bool,
}

/// `/package.Service/Method` → what its descriptor says.
#[derive(Debug, Clone, Default)]
pub struct MethodTable {
    // Looked up on every call by its path: a fast hash (the keys come from
    // the contracts, not from callers).
    methods: HashMap<String, MethodInfo, foldhash::fast::RandomState>,
}

impl MethodTable {
    /// Reads every method of an encoded `FileDescriptorSet`.
    pub fn from_descriptor_set(encoded: &[u8]) -> Result<Self, prost::DecodeError> {
        let set = FileDescriptorSet::decode(encoded)?;
        let mut methods = HashMap::default();
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    let path = if package.is_empty() {
                        format!("/{}/{}", service.name(), method.name())
                    } else {
                        format!("/{package}.{}/{}", service.name(), method.name())
                    };
                    let idempotent = method.options.as_ref().is_some_and(|o| {
                        matches!(o.idempotency_level(), IdempotencyLevel::NoSideEffects | IdempotencyLevel::Idempotent)
                    });
                    methods.insert(path, MethodInfo { idempotent, client_streaming: method.client_streaming() });
                }
            }
        }
        Ok(Self { methods })
    }

    /// The contracts of this workspace, plus the standard health check.
    pub fn meshkit() -> Self {
        let mut table = Self::from_descriptor_set(meshkit_proto::FILE_DESCRIPTOR_SET).unwrap_or_default();
        table.insert("/grpc.health.v1.Health/Check", MethodInfo { idempotent: true, client_streaming: false });
        table
    }

    /// Adds every method of `other`, replacing entries of the same path.
    pub fn extend(&mut self, other: MethodTable) {
        self.methods.extend(other.methods);
    }

    pub fn insert(&mut self, path: &str, info: MethodInfo) {
        self.methods.insert(path.to_owned(), info);
    }

    pub fn get(&self, path: &str) -> Option<MethodInfo> {
        self.methods.get(path).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_idempotency_from_the_contracts() {
        let t = MethodTable::meshkit();
        assert_eq!(
            t.get("/meshkit.user.v1.UserService/GetUser"),
            Some(MethodInfo { idempotent: true, client_streaming: false })
        );
        assert_eq!(t.get("/meshkit.user.v1.UserService/CreateUser").map(|m| m.idempotent), Some(false));
        assert_eq!(t.get("/meshkit.order.v1.OrderService/CreateOrder").map(|m| m.idempotent), Some(false));
        assert_eq!(t.get("/meshkit.order.v1.OrderService/ListOrders").map(|m| m.idempotent), Some(true));
        assert_eq!(t.get("/nope.Service/Method"), None);
    }
}
