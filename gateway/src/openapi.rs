//! An OpenAPI 3.1 document generated from the same descriptors and
//! `google.api.http` annotations the router reads; served at `/openapi.json`.
//! Schemas follow the proto3 JSON mapping (64-bit integers as strings, enums
//! by name, Timestamp as date-time); descriptions come from the comments in
//! the `.proto` files.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use prost_types::FileDescriptorProto;
use serde_json::{Map, Value as Json, json};

use crate::{
    contracts::Contracts,
    routes::{BodyTarget, Route, Router, is_scalar_like},
};

/// The document for every route of `router`.
pub fn document(contracts: &Contracts, router: &Router) -> Json {
    let mut paths: BTreeMap<String, Map<String, Json>> = BTreeMap::new();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for route in router.routes() {
        let op = operation(route, &mut wanted);
        paths.entry(route.template.openapi_path()).or_default().insert(route.http_method.as_str().to_lowercase(), op);
    }
    let mut schemas = Map::new();
    let mut done = BTreeSet::new();
    while let Some(name) = wanted.pop_first() {
        if !done.insert(name.clone()) {
            continue;
        }
        if let Some(message) = contracts.pool().get_message_by_name(&name) {
            schemas.insert(name, message_schema(&message, &mut wanted));
        }
    }
    schemas.insert(
        "google.rpc.Status".into(),
        json!({
            "type": "object",
            "description": "The error body: the gRPC status code, a message, and details.",
            "properties": {
                "code": {"type": "integer", "format": "int32", "description": "gRPC status code"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object"}}
            }
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {"title": "meshkit gateway", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
        }
    })
}

fn operation(route: &Route, wanted: &mut BTreeSet<String>) -> Json {
    let method = &route.method;
    let input = method.input();
    let mut parameters = Vec::new();
    let mut bound: BTreeSet<String> = BTreeSet::new();
    for var in &route.template.variables {
        let name = var.field_path.join(".");
        let field = crate::routes::resolve_path(&input, &var.field_path).ok();
        let schema = field.as_ref().map_or(json!({"type": "string"}), |f| field_schema(f, wanted));
        let mut p = json!({"name": name, "in": "path", "required": true, "schema": schema});
        if let Some(d) = field.as_ref().and_then(field_comment) {
            p["description"] = Json::String(d);
        }
        parameters.push(p);
        bound.insert(var.field_path[0].clone());
    }
    let mut op = Map::new();
    op.insert("operationId".into(), Json::String(route.operation_id.clone()));
    op.insert("tags".into(), json!([method.parent_service().name()]));
    if let Some(doc) = comment(method.parent_file().file_descriptor_proto(), method.path()) {
        let summary = doc.lines().next().unwrap_or_default().to_owned();
        op.insert("summary".into(), Json::String(summary));
        op.insert("description".into(), Json::String(doc));
    }
    match &route.body {
        BodyTarget::All => {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": schema_ref(&input, wanted)}}}),
            );
        }
        BodyTarget::Field(field) => {
            bound.insert(field.name().to_owned());
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": field_schema(field, wanted)}}}),
            );
        }
        BodyTarget::None => {}
    }
    if !matches!(route.body, BodyTarget::All) {
        query_parameters(&input, "", &bound, 0, &mut parameters, wanted);
    }
    if !parameters.is_empty() {
        op.insert("parameters".into(), Json::Array(parameters));
    }
    let output = method.output();
    let ok_schema = match &route.response_body {
        Some(field) => field_schema(field, wanted),
        None => schema_ref(&output, wanted),
    };
    let ok_schema = if method.is_server_streaming() { json!({"type": "array", "items": ok_schema}) } else { ok_schema };
    op.insert(
        "responses".into(),
        json!({
            "200": {"description": "OK", "content": {"application/json": {"schema": ok_schema}}},
            "default": {"description": "An error, with the gRPC status code", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}}}
        }),
    );
    Json::Object(op)
}

/// Every field the query may set: scalars at the top, and inside singular
/// messages (as `a.b`), not those the path or the body already set.
fn query_parameters(
    message: &MessageDescriptor,
    prefix: &str,
    bound: &BTreeSet<String>,
    depth: usize,
    out: &mut Vec<Json>,
    wanted: &mut BTreeSet<String>,
) {
    for field in message.fields() {
        if depth == 0 && bound.contains(field.name()) {
            continue;
        }
        let name = format!("{prefix}{}", field.name());
        match field.kind() {
            Kind::Message(m) if !is_scalar_like(&m) => {
                if !field.is_list() && !field.is_map() && depth < 3 {
                    query_parameters(&m, &format!("{name}."), bound, depth + 1, out, wanted);
                }
            }
            _ if field.is_map() => {}
            _ => {
                let mut p =
                    json!({"name": name, "in": "query", "required": false, "schema": field_schema(&field, wanted)});
                if field.is_list() {
                    p["explode"] = Json::Bool(true);
                }
                if let Some(d) = field_comment(&field) {
                    p["description"] = Json::String(d);
                }
                out.push(p);
            }
        }
    }
}

fn schema_ref(message: &MessageDescriptor, wanted: &mut BTreeSet<String>) -> Json {
    wanted.insert(message.full_name().to_owned());
    json!({"$ref": format!("#/components/schemas/{}", message.full_name())})
}

fn message_schema(message: &MessageDescriptor, wanted: &mut BTreeSet<String>) -> Json {
    let mut properties = Map::new();
    for field in message.fields() {
        let mut schema = field_schema(&field, wanted);
        if let (Some(d), Json::Object(map)) = (field_comment(&field), &mut schema) {
            if !map.contains_key("$ref") {
                map.insert("description".into(), Json::String(d));
            }
        }
        properties.insert(field.json_name().to_owned(), schema);
    }
    let mut schema = json!({"type": "object", "properties": properties});
    if let Some(d) = comment(message.parent_file_descriptor_proto(), message.path()) {
        schema["description"] = Json::String(d);
    }
    schema
}

fn field_schema(field: &FieldDescriptor, wanted: &mut BTreeSet<String>) -> Json {
    if field.is_map() {
        if let Kind::Message(entry) = field.kind() {
            let value = entry.map_entry_value_field();
            return json!({"type": "object", "additionalProperties": kind_schema(&value.kind(), wanted)});
        }
    }
    let single = kind_schema(&field.kind(), wanted);
    if field.is_list() { json!({"type": "array", "items": single}) } else { single }
}

fn kind_schema(kind: &Kind, wanted: &mut BTreeSet<String>) -> Json {
    match kind {
        Kind::Double => json!({"type": "number", "format": "double"}),
        Kind::Float => json!({"type": "number", "format": "float"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({"type": "integer", "format": "int32"}),
        Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "format": "int64", "minimum": 0}),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({"type": "string", "format": "int64"}),
        Kind::Uint64 | Kind::Fixed64 => json!({"type": "string", "format": "uint64"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Enum(e) => json!({"type": "string", "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>()}),
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
            "google.protobuf.Duration" => json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"}),
            "google.protobuf.FieldMask" => json!({"type": "string"}),
            "google.protobuf.Struct" => json!({"type": "object"}),
            "google.protobuf.Value" => json!({}),
            "google.protobuf.ListValue" => json!({"type": "array"}),
            "google.protobuf.Empty" => json!({"type": "object"}),
            "google.protobuf.Any" => json!({"type": "object", "properties": {"@type": {"type": "string"}}}),
            "google.protobuf.BoolValue" => json!({"type": ["boolean", "null"]}),
            "google.protobuf.StringValue" | "google.protobuf.BytesValue" => json!({"type": ["string", "null"]}),
            "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => json!({"type": ["string", "null"]}),
            "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => json!({"type": ["number", "null"]}),
            "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => json!({"type": ["integer", "null"]}),
            _ => schema_ref(m, wanted),
        },
    }
}

fn field_comment(field: &FieldDescriptor) -> Option<String> {
    comment(field.parent_file().file_descriptor_proto(), field.path())
}

/// The leading (or trailing) comment at `path` in a file's source info.
fn comment(file: &FileDescriptorProto, path: &[i32]) -> Option<String> {
    let info = file.source_code_info.as_ref()?;
    let location = info.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments.as_deref().or(location.trailing_comments.as_deref())?;
    let text = text.lines().map(str::trim).collect::<Vec<_>>().join("\n").trim().to_owned();
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_every_route_with_schemas() {
        let contracts = Contracts::meshkit().unwrap();
        let router = Router::from_contracts(&contracts).unwrap();
        let doc = document(&contracts, &router);
        assert_eq!(doc["openapi"], "3.1.0");
        let create = &doc["paths"]["/v1/orders"]["post"];
        assert_eq!(create["operationId"], "OrderService_CreateOrder");
        assert!(create["summary"].as_str().unwrap().starts_with("Places an order"), "{create}");
        assert_eq!(
            create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/meshkit.order.v1.CreateOrderRequest"
        );
        let list = &doc["paths"]["/v1/users/{user_id}/orders"]["get"];
        let names: Vec<&str> =
            list["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["user_id", "page_size", "page_token"]);
        let order = &doc["components"]["schemas"]["meshkit.order.v1.Order"];
        assert_eq!(order["properties"]["createTime"]["format"], "date-time");
        assert_eq!(order["properties"]["status"]["enum"][1], "ORDER_STATUS_PENDING");
        assert_eq!(order["properties"]["items"]["items"]["$ref"], "#/components/schemas/meshkit.order.v1.OrderItem");
        assert!(doc["components"]["schemas"]["meshkit.order.v1.OrderItem"].is_object());
    }
}
