//! REST routes read from the `google.api.http` annotations: one route per
//! binding (the rule and each of its `additional_bindings`), no hand-written
//! route per method.

use std::sync::Arc;

use http::Method;
use meshkit_proto::google::api::{HttpRule, http_rule::Pattern};
use prost::Message;
use prost_reflect::{Cardinality, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor};

use crate::{
    contracts::{Contracts, grpc_path},
    template::{Captures, Template},
};

/// Where the request body goes.
#[derive(Debug, Clone)]
pub enum BodyTarget {
    /// No body; every field not in the path comes from the query.
    None,
    /// `body: "*"`: the whole request message; no query parameters.
    All,
    /// `body: "field"`: that field; the rest from the path and query.
    Field(FieldDescriptor),
}

/// One REST binding of a method.
#[derive(Debug, Clone)]
pub struct Route {
    pub http_method: Method,
    pub template: Template,
    pub method: MethodDescriptor,
    /// `/package.Service/Method`.
    pub grpc_path: String,
    pub body: BodyTarget,
    /// `response_body`: answer with this field of the response only.
    pub response_body: Option<FieldDescriptor>,
    /// `Service_Method`, with `_N` for the N-th additional binding.
    pub operation_id: String,
}

/// All REST routes, most specific first.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Arc<Route>>,
}

/// What the router found for a request.
#[derive(Debug)]
pub enum RouteMatch<'a> {
    Found(&'a Arc<Route>, Captures),
    /// The path exists, but not for this HTTP method.
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

/// A bad annotation in a contract; the gateway refuses to start on one.
#[derive(Debug, thiserror::Error)]
#[error("{method}: {problem}")]
pub struct RouteError {
    pub method: String,
    pub problem: String,
}

impl Router {
    /// Reads every annotated method of `contracts`.
    pub fn from_contracts(contracts: &Contracts) -> Result<Self, RouteError> {
        let Some(http_ext) = contracts.pool().get_extension_by_name("google.api.http") else {
            return Ok(Self::default());
        };
        let mut routes = Vec::new();
        for service in contracts.services() {
            for method in service.methods() {
                let options = method.options();
                if !options.has_extension(&http_ext) {
                    continue;
                }
                let fail = |problem: String| RouteError { method: method.full_name().to_owned(), problem };
                let value = options.get_extension(&http_ext);
                let Some(message) = value.as_message() else { continue };
                let rule = HttpRule::decode(message.encode_to_vec().as_slice())
                    .map_err(|e| fail(format!("unreadable google.api.http: {e}")))?;
                if method.is_client_streaming() {
                    tracing::warn!(
                        method = method.full_name(),
                        "client-streaming methods have no REST binding; skipped"
                    );
                    continue;
                }
                let base = format!("{}_{}", service.name(), method.name());
                routes.push(Arc::new(route(&method, &rule, base.clone()).map_err(fail)?));
                for (i, extra) in rule.additional_bindings.iter().enumerate() {
                    if !extra.additional_bindings.is_empty() {
                        return Err(fail("additional_bindings cannot nest".into()));
                    }
                    routes.push(Arc::new(route(&method, extra, format!("{base}_{}", i + 1)).map_err(fail)?));
                }
            }
        }
        // Most specific first, so `/v1/users/me` beats `/v1/users/{id}`.
        routes.sort_by_key(|r| std::cmp::Reverse(r.template.specificity()));
        Ok(Self { routes })
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The route for `method` and `path` (the raw, percent-encoded path).
    pub fn find(&self, method: &Method, path: &str) -> RouteMatch<'_> {
        let mut allowed = Vec::new();
        for route in &self.routes {
            let Some(captures) = route.template.matches(path) else { continue };
            if route.http_method == method {
                return RouteMatch::Found(route, captures);
            }
            if !allowed.contains(&route.http_method) {
                allowed.push(route.http_method.clone());
            }
        }
        if allowed.is_empty() { RouteMatch::NotFound } else { RouteMatch::MethodNotAllowed(allowed) }
    }
}

fn route(method: &MethodDescriptor, rule: &HttpRule, operation_id: String) -> Result<Route, String> {
    let (http_method, path) = match &rule.pattern {
        Some(Pattern::Get(p)) => (Method::GET, p),
        Some(Pattern::Put(p)) => (Method::PUT, p),
        Some(Pattern::Post(p)) => (Method::POST, p),
        Some(Pattern::Delete(p)) => (Method::DELETE, p),
        Some(Pattern::Patch(p)) => (Method::PATCH, p),
        Some(Pattern::Custom(c)) => {
            (Method::from_bytes(c.kind.as_bytes()).map_err(|_| format!("{:?} is not an HTTP method", c.kind))?, &c.path)
        }
        None => return Err("google.api.http has no pattern".into()),
    };
    let template = Template::parse(path).map_err(|e| e.to_string())?;
    let input = method.input();
    for var in &template.variables {
        let field = resolve_path(&input, &var.field_path)?;
        if field.is_list() || field.is_map() || !is_path_bindable(&field) {
            return Err(format!("path variable {} must name a singular scalar field", var.field_path.join(".")));
        }
    }
    let body = match rule.body.as_str() {
        "" => BodyTarget::None,
        "*" => BodyTarget::All,
        name => BodyTarget::Field(
            input
                .get_field_by_name(name)
                .ok_or_else(|| format!("body field {name:?} is not in {}", input.full_name()))?,
        ),
    };
    let response_body = match rule.response_body.as_str() {
        "" => None,
        name => Some(
            method
                .output()
                .get_field_by_name(name)
                .ok_or_else(|| format!("response_body field {name:?} is not in {}", method.output().full_name()))?,
        ),
    };
    Ok(Route {
        http_method,
        template,
        grpc_path: grpc_path(method),
        method: method.clone(),
        body,
        response_body,
        operation_id,
    })
}

/// The field a dotted path names, through singular message fields.
pub fn resolve_path(message: &MessageDescriptor, path: &[String]) -> Result<FieldDescriptor, String> {
    let mut current = message.clone();
    let mut field = None;
    for (i, name) in path.iter().enumerate() {
        let f = current
            .get_field_by_name(name)
            .or_else(|| current.get_field_by_json_name(name))
            .ok_or_else(|| format!("{} has no field {name:?}", current.full_name()))?;
        if i + 1 < path.len() {
            match f.kind() {
                Kind::Message(m) if f.cardinality() != Cardinality::Repeated => current = m,
                _ => return Err(format!("{} is not a singular message field", path[..=i].join("."))),
            }
        }
        field = Some(f);
    }
    field.ok_or_else(|| "empty field path".to_owned())
}

/// Scalars, enums and the well-known types whose JSON form is a string.
fn is_path_bindable(field: &FieldDescriptor) -> bool {
    match field.kind() {
        Kind::Message(m) => is_scalar_like(&m),
        _ => true,
    }
}

/// Well-known messages that stand for one value in JSON (and in a query string).
pub fn is_scalar_like(message: &MessageDescriptor) -> bool {
    matches!(
        message.full_name(),
        "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::from_contracts(&Contracts::meshkit().unwrap()).unwrap()
    }

    #[test]
    fn reads_every_binding_of_the_contracts() {
        let r = router();
        let mut seen: Vec<String> =
            r.routes().iter().map(|r| format!("{} {} {}", r.http_method, r.template, r.grpc_path)).collect();
        seen.sort();
        for expected in [
            "GET /v1/orders meshkit.order.v1.OrderService/ListOrders",
            "GET /v1/users/{user_id}/orders meshkit.order.v1.OrderService/ListOrders",
            "POST /v1/users meshkit.user.v1.UserService/CreateUser",
            "GET /v1/users/{id} meshkit.user.v1.UserService/GetUser",
        ] {
            let expected = expected.replace(" meshkit", " /meshkit");
            assert!(seen.contains(&expected), "{expected} not in {seen:#?}");
        }
    }

    #[test]
    fn finds_routes_and_says_which_methods_a_path_allows() {
        let r = router();
        match r.find(&Method::GET, "/v1/users/u1/orders") {
            RouteMatch::Found(route, caps) => {
                assert_eq!(route.grpc_path, "/meshkit.order.v1.OrderService/ListOrders");
                assert_eq!(caps, vec![(vec!["user_id".to_owned()], "u1".to_owned())]);
            }
            other => panic!("{other:?}"),
        }
        match r.find(&Method::DELETE, "/v1/users") {
            RouteMatch::MethodNotAllowed(allowed) => {
                assert!(allowed.contains(&Method::GET) && allowed.contains(&Method::POST), "{allowed:?}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(r.find(&Method::GET, "/v2/nothing"), RouteMatch::NotFound));
    }
}
