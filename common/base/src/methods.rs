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

    /// The methods of `service` (its full name) as `(path, info)`, by path.
    pub fn of_service(&self, service: &str) -> Vec<(&str, MethodInfo)> {
        let mut methods: Vec<_> = self
            .methods
            .iter()
            .filter(|(path, _)| {
                path.strip_prefix('/').and_then(|p| p.strip_prefix(service)).is_some_and(|m| m.starts_with('/'))
            })
            .map(|(path, info)| (path.as_str(), *info))
            .collect();
        methods.sort_unstable_by_key(|(path, _)| *path);
        methods
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
        let user: Vec<_> =
            t.of_service("meshkit.user.v1.UserService").into_iter().map(|(p, m)| (p, m.idempotent)).collect();
        assert_eq!(
            user,
            [
                ("/meshkit.user.v1.UserService/CreateUser", false),
                ("/meshkit.user.v1.UserService/GetUser", true),
                ("/meshkit.user.v1.UserService/ListUsers", true)
            ]
        );
        assert!(t.of_service("meshkit.user.v1.User").is_empty());
        assert_eq!(t.get("/meshkit.order.v1.OrderService/CreateOrder").map(|m| m.idempotent), Some(false));
        assert_eq!(t.get("/meshkit.order.v1.OrderService/ListOrders").map(|m| m.idempotent), Some(true));
        assert_eq!(t.get("/nope.Service/Method"), None);
    }
}

/// A rule's method pattern: one method, every method of a service, or any
/// method. Written `/pkg.Service/Method`, `/pkg.Service/*` or `*`; the
/// leading `/` may be left out (`pkg.Service/Method`, as the gateway's JWT
/// rules spell it), so every rule of the mesh reads the same patterns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MethodPattern {
    /// `pkg.Service/Method`, without the leading `/`.
    Method(String),
    /// `pkg.Service`, from `pkg.Service/*`.
    Service(String),
    /// `*`.
    Any,
}

impl MethodPattern {
    /// Reads a pattern; the error says what shape it must have.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern == "*" {
            return Ok(Self::Any);
        }
        let bare = pattern.strip_prefix('/').unwrap_or(pattern);
        match bare.split_once('/') {
            Some((service, "*")) if !service.is_empty() => Ok(Self::Service(service.to_owned())),
            Some((service, method)) if !service.is_empty() && !method.is_empty() && !method.contains('/') => {
                Ok(Self::Method(bare.to_owned()))
            }
            _ => Err("the key must be /pkg.Service/Method, /pkg.Service/* or *".into()),
        }
    }

    /// Whether a call of `path` (`/pkg.Service/Method`, the `/` optional) matches.
    pub fn matches(&self, path: &str) -> bool {
        let bare = path.strip_prefix('/').unwrap_or(path);
        match self {
            Self::Any => true,
            Self::Service(service) => bare.split_once('/').is_some_and(|(s, _)| s == service),
            Self::Method(method) => bare == method,
        }
    }
}

/// Values by method pattern; a lookup by path finds the most specific:
/// the method's own, else its service's, else `*`'s.
#[derive(Debug, Clone)]
pub struct MethodMap<T> {
    exact: HashMap<String, T, foldhash::fast::RandomState>,
    by_service: HashMap<String, T, foldhash::fast::RandomState>,
    any: Option<T>,
}

impl<T> Default for MethodMap<T> {
    fn default() -> Self {
        Self { exact: HashMap::default(), by_service: HashMap::default(), any: None }
    }
}

impl<T> MethodMap<T> {
    /// No pattern has a value.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.by_service.is_empty() && self.any.is_none()
    }

    /// Sets the value of `pattern` (a later one for the same pattern wins).
    pub fn insert(&mut self, pattern: &MethodPattern, value: T) {
        match pattern {
            MethodPattern::Method(m) => {
                self.exact.insert(m.clone(), value);
            }
            MethodPattern::Service(s) => {
                self.by_service.insert(s.clone(), value);
            }
            MethodPattern::Any => self.any = Some(value),
        }
    }

    /// The most specific value for a call of `path` (`/pkg.Service/Method`).
    pub fn get(&self, path: &str) -> Option<&T> {
        let bare = path.strip_prefix('/').unwrap_or(path);
        if let Some(v) = self.exact.get(bare) {
            return Some(v);
        }
        let service = bare.split_once('/').map_or(bare, |(s, _)| s);
        self.by_service.get(service).or(self.any.as_ref())
    }
}

#[cfg(test)]
mod pattern_tests {
    use super::*;

    #[test]
    fn both_spellings_read_alike_and_the_most_specific_wins() {
        for (pattern, expect) in [
            ("/a.B/C", MethodPattern::Method("a.B/C".into())),
            ("a.B/C", MethodPattern::Method("a.B/C".into())),
            ("/a.B/*", MethodPattern::Service("a.B".into())),
            ("a.B/*", MethodPattern::Service("a.B".into())),
            ("*", MethodPattern::Any),
        ] {
            assert_eq!(MethodPattern::parse(pattern), Ok(expect), "{pattern}");
        }
        for bad in ["GetUser", "/a.B/", "//C", "/a.B/C/D", ""] {
            assert!(MethodPattern::parse(bad).is_err(), "{bad:?}");
        }
        let mut map = MethodMap::default();
        map.insert(&MethodPattern::parse("*").expect("valid"), 0);
        map.insert(&MethodPattern::parse("/a.B/*").expect("valid"), 1);
        map.insert(&MethodPattern::parse("a.B/C").expect("valid"), 2);
        assert_eq!(map.get("/a.B/C"), Some(&2));
        assert_eq!(map.get("/a.B/D"), Some(&1));
        assert_eq!(map.get("/x.Y/Z"), Some(&0));
        assert!(MethodPattern::parse("a.B/*").expect("valid").matches("/a.B/Anything"));
        assert!(!MethodPattern::parse("/a.B/C").expect("valid").matches("/a.B/CD"));
    }
}
