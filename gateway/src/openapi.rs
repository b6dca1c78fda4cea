//! An OpenAPI 3.1 document generated from the same descriptors and
//! `google.api.http` annotations the router reads; served at `/openapi.json`.
//! Schemas follow the proto3 JSON mapping (64-bit integers as strings, enums
//! by name, Timestamp as date-time); descriptions come from the comments in
//! the `.proto` files.

use std::collections::{BTreeMap, BTreeSet};

mod rules;

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
            // Required when a field the path does not set must be sent.
            let required = input.fields().any(|f| !bound.contains(f.name()) && rules::is_required(&f));
            op.insert(
                "requestBody".into(),
                json!({"required": required, "content": {"application/json": {"schema": schema_ref(&input, wanted)}}}),
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
    let error = || json!({"application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}});
    let mut responses = Map::new();
    responses
        .insert("200".into(), json!({"description": "OK", "content": {"application/json": {"schema": ok_schema}}}));
    for (code, description) in error_responses(route) {
        responses.insert(code, json!({"description": description, "content": error()}));
    }
    responses
        .insert("default".into(), json!({"description": "An error, with the gRPC status code", "content": error()}));
    op.insert("responses".into(), Json::Object(responses));
    Json::Object(op)
}

/// The errors an operation documents: 400 for a request the gateway or the
/// contract's rules refuse, and each gRPC code the method's comment names
/// (`NOT_FOUND`, `ALREADY_EXISTS`, …) as its HTTP status.
fn error_responses(route: &Route) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert(
        "400".to_owned(),
        "INVALID_ARGUMENT: the request breaks a rule; google.rpc.BadRequest lists each".to_owned(),
    );
    let doc = comment(route.method.parent_file().file_descriptor_proto(), route.method.path()).unwrap_or_default();
    for code in [
        tonic::Code::NotFound,
        tonic::Code::AlreadyExists,
        tonic::Code::FailedPrecondition,
        tonic::Code::PermissionDenied,
        tonic::Code::Unauthenticated,
        tonic::Code::ResourceExhausted,
        tonic::Code::Aborted,
        tonic::Code::OutOfRange,
        tonic::Code::Unavailable,
    ] {
        let name = code_name(code);
        if doc.split(|c: char| !(c.is_ascii_uppercase() || c == '_')).any(|word| word == name) {
            let http = crate::errors::http_status(code).as_u16().to_string();
            let text = out.entry(http).or_default();
            if !text.is_empty() {
                text.push_str("; ");
            }
            text.push_str(name);
        }
    }
    out
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unavailable => "UNAVAILABLE",
        _ => "",
    }
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
                let required = depth == 0 && rules::is_required(&field);
                let mut p =
                    json!({"name": name, "in": "query", "required": required, "schema": field_schema(&field, wanted)});
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
    let required: Vec<String> = message.fields().filter(rules::is_required).map(|f| f.json_name().to_owned()).collect();
    // The transcoder refuses a field the message does not have.
    let mut schema = json!({"type": "object", "properties": properties, "additionalProperties": false});
    if !required.is_empty() {
        schema["required"] = json!(required);
    }
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
    let mut schema = if field.is_list() { json!({"type": "array", "items": single}) } else { single };
    rules::apply(field, &mut schema);
    schema
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

    #[test]
    fn the_contracts_rules_are_in_the_schemas() {
        let contracts = Contracts::meshkit().unwrap();
        let router = Router::from_contracts(&contracts).unwrap();
        let doc = document(&contracts, &router);
        let schemas = &doc["components"]["schemas"];
        let create_user = &schemas["meshkit.user.v1.CreateUserRequest"];
        assert_eq!(create_user["required"], json!(["name", "email"]), "{create_user}");
        let name = &create_user["properties"]["name"];
        assert_eq!((name["minLength"].as_u64(), name["maxLength"].as_u64()), (Some(1), Some(200)), "{name}");
        assert!(name["pattern"].as_str().unwrap().contains("\\x20"), "{name}");
        let email = &create_user["properties"]["email"];
        assert_eq!((email["format"].as_str(), email["maxLength"].as_u64()), (Some("email"), Some(254)), "{email}");
        let create_order = &schemas["meshkit.order.v1.CreateOrderRequest"];
        let items = &create_order["properties"]["items"];
        assert_eq!((items["minItems"].as_u64(), items["maxItems"].as_u64()), (Some(1), Some(100)), "{items}");
        assert_eq!(create_order["properties"]["userId"]["format"], "uuid");
        let quantity = &schemas["meshkit.order.v1.OrderItem"]["properties"]["quantity"];
        assert_eq!((quantity["minimum"].as_i64(), quantity["maximum"].as_i64()), (Some(1), Some(10000)), "{quantity}");
        assert_eq!(schemas["meshkit.order.v1.OrderItem"]["required"], json!(["sku", "quantity"]), "0 is out of range");

        let list = &doc["paths"]["/v1/users"]["get"];
        let param = |n: &str| list["parameters"].as_array().unwrap().iter().find(|p| p["name"] == n).unwrap().clone();
        let size = param("page_size");
        assert_eq!((size["schema"]["minimum"].as_i64(), size["schema"]["maximum"].as_i64()), (Some(0), Some(1000)));
        let token = param("page_token");
        assert_eq!(token["required"], false);
        assert_eq!(token["schema"]["anyOf"][0]["maxLength"], 0, "empty is the first page: {token}");
        assert_eq!(token["schema"]["anyOf"][1]["format"], "uuid", "{token}");

        // A body when the binding needs one, and the errors each operation names.
        let create = &doc["paths"]["/v1/users"]["post"];
        assert_eq!(create["requestBody"]["required"], true);
        assert!(create["responses"]["409"].is_object(), "ALREADY_EXISTS: {}", create["responses"]);
        assert!(create["responses"]["400"].is_object());
        let trigger = &doc["paths"]["/v1/jobs/{name}:trigger"]["post"];
        assert_eq!(trigger["requestBody"]["required"], false, "name is in the path, param optional");
        assert!(doc["paths"]["/v1/users/{id}"]["get"]["responses"]["404"].is_object());
    }
}
