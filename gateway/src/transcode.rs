//! REST/JSON ⇄ protobuf, by the proto3 JSON mapping (prost-reflect's serde):
//! lowerCamelCase and original field names accepted, 64-bit integers as
//! strings, enums by name, Timestamp, Duration and wrappers in their JSON form.
//!
//! A request message is assembled as one JSON object, the body first, then
//! the query parameters, then the path variables (which win), and decoded
//! once, so every error names the field that was wrong.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost_reflect::{DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions};
use serde_json::{Map, Value as Json};

use crate::{
    routes::{BodyTarget, Route, is_scalar_like},
    template::Captures,
};

/// The request was wrong; the message says how (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn bad(message: impl Into<String>) -> BadRequest {
    BadRequest(message.into())
}

/// Builds the request message of `route` from the path's captures, the raw
/// query string and the body.
pub fn request_message(
    route: &Route,
    captures: Captures,
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, BadRequest> {
    let input = route.method.input();
    let body_text = body.iter().all(u8::is_ascii_whitespace);
    let mut root = match &route.body {
        BodyTarget::None if body_text => Map::new(),
        BodyTarget::None => {
            return Err(bad(format!("{} {} takes no request body", route.http_method, route.template)));
        }
        BodyTarget::All if body_text => Map::new(),
        BodyTarget::All => match parse_json(body)? {
            Json::Object(map) => map,
            other => return Err(bad(format!("the request body must be a JSON object, found {}", json_kind(&other)))),
        },
        BodyTarget::Field(_) if body_text => Map::new(),
        BodyTarget::Field(field) => {
            let mut map = Map::new();
            map.insert(field.name().to_owned(), parse_json(body)?);
            map
        }
    };
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        if matches!(route.body, BodyTarget::All) {
            // With `body: "*"` every field comes from the body.
            if let Some((key, _)) = form_urlencoded::parse(query.as_bytes()).next() {
                return Err(bad(format!(
                    "unknown query parameter `{key}`: this method takes its fields from the body"
                )));
            }
        }
        let mut seen: Vec<String> = Vec::new();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            if let BodyTarget::Field(f) = &route.body {
                if path[0] == f.name() || path[0] == f.json_name() {
                    return Err(bad(format!("query parameter `{key}` sets the body field `{}`", f.name())));
                }
            }
            let repeated = set_path(&mut root, &input, &path, &value, true)
                .map_err(|e| bad(format!("query parameter `{key}`: {e}")))?;
            if !repeated {
                if seen.iter().any(|k| *k == key) {
                    return Err(bad(format!("query parameter `{key}` is given more than once")));
                }
                seen.push(key.into_owned());
            }
        }
    }
    for (path, value) in captures {
        set_path(&mut root, &input, &path, &value, false)
            .map_err(|e| bad(format!("path variable `{}`: {e}", path.join("."))))?;
    }
    decode_json(input, Json::Object(root))
}

fn parse_json(body: &[u8]) -> Result<Json, BadRequest> {
    serde_json::from_slice(body).map_err(|e| bad(format!("malformed JSON in the request body: {e}")))
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Decodes a JSON value as `desc`, naming the field at fault in errors.
pub fn decode_json(desc: MessageDescriptor, json: Json) -> Result<DynamicMessage, BadRequest> {
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(json, &mut track);
    let name = desc.full_name().to_owned();
    DynamicMessage::deserialize_with_options(desc, de, &DeserializeOptions::new()).map_err(|e| {
        let path = track.path().to_string();
        if path == "." || path.is_empty() { bad(format!("{name}: {e}")) } else { bad(format!("field `{path}`: {e}")) }
    })
}

/// Sets `path` in the JSON object `root` (a message of type `desc`) from a
/// string. Returns whether the field is repeated (the value was appended).
fn set_path(
    root: &mut Map<String, Json>,
    desc: &MessageDescriptor,
    path: &[String],
    raw: &str,
    from_query: bool,
) -> Result<bool, String> {
    let mut map = root;
    let mut current = desc.clone();
    for (i, name) in path.iter().enumerate() {
        let field = current
            .get_field_by_name(name)
            .or_else(|| current.get_field_by_json_name(name))
            .ok_or_else(|| format!("{} has no field `{name}`", current.full_name()))?;
        // The body may have used the JSON name; keep one key, the proto name.
        if field.json_name() != field.name() {
            if let Some(v) = map.remove(field.json_name()) {
                map.entry(field.name().to_owned()).or_insert(v);
            }
        }
        let last = i + 1 == path.len();
        if !last {
            let Kind::Message(inner) = field.kind() else {
                return Err(format!("`{}` is not a message field", path[..=i].join(".")));
            };
            if field.is_list() || field.is_map() {
                return Err(format!(
                    "`{}` is repeated; only singular fields can be set this way",
                    path[..=i].join(".")
                ));
            }
            let slot = map.entry(field.name().to_owned()).or_insert_with(|| Json::Object(Map::new()));
            let Json::Object(next) = slot else {
                return Err(format!("`{}` is set to a non-object", path[..=i].join(".")));
            };
            map = next;
            current = inner;
            continue;
        }
        if field.is_map() {
            return Err(format!("`{name}` is a map field"));
        }
        let value = scalar_json(&field.kind(), raw)?;
        if field.is_list() {
            if !from_query {
                return Err(format!("`{name}` is repeated"));
            }
            match map.entry(field.name().to_owned()).or_insert_with(|| Json::Array(Vec::new())) {
                Json::Array(items) => items.push(value),
                _ => return Err(format!("`{name}` is set to a non-array")),
            }
            return Ok(true);
        }
        map.insert(field.name().to_owned(), value);
        return Ok(false);
    }
    Err("empty field path".into())
}

/// The JSON value a query or path string stands for, by the field's kind.
fn scalar_json(kind: &Kind, raw: &str) -> Result<Json, String> {
    let boolean = |raw: &str| match raw {
        "true" => Ok(Json::Bool(true)),
        "false" => Ok(Json::Bool(false)),
        other => Err(format!("{other:?} is not true or false")),
    };
    match kind {
        Kind::Bool => boolean(raw),
        Kind::Enum(_) => Ok(raw.parse::<i32>().map(Json::from).unwrap_or_else(|_| Json::String(raw.to_owned()))),
        Kind::Message(m) if m.full_name() == "google.protobuf.BoolValue" => boolean(raw),
        Kind::Message(m) if is_scalar_like(m) => Ok(Json::String(raw.to_owned())),
        Kind::Message(m) => Err(format!("is a message ({}), which a string cannot set", m.full_name())),
        // Numbers (64-bit ones included), strings and bytes (base64) all
        // accept their string form in the proto3 JSON mapping.
        _ => Ok(Json::String(raw.to_owned())),
    }
}

/// A message in gRPC's length-prefixed framing, uncompressed.
pub fn frame(message: &DynamicMessage) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Encoding into a buffer with room for the message cannot fail.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// Splits a gRPC response body into its messages.
pub fn split_frames(mut body: Bytes) -> Result<Vec<Bytes>, String> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 5 {
            return Err("truncated gRPC frame in the response".into());
        }
        if body[0] != 0 {
            return Err("the upstream sent a compressed message the gateway did not ask for".into());
        }
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        if body.len() < 5 + len {
            return Err("truncated gRPC frame in the response".into());
        }
        let _ = body.split_to(5);
        out.push(body.split_to(len));
    }
    Ok(out)
}

/// Renders response messages as JSON: one object for a unary method, an
/// array for a server-streaming one.
pub fn render(route: &Route, messages: &[Bytes]) -> Result<Vec<u8>, String> {
    let output = route.method.output();
    let mut rendered = Vec::with_capacity(messages.len());
    for bytes in messages {
        let message = DynamicMessage::decode(output.clone(), bytes.as_ref())
            .map_err(|e| format!("the upstream's response is not a valid {}: {e}", output.full_name()))?;
        rendered.push(to_json(route, &message));
    }
    if route.method.is_server_streaming() {
        return serde_json::to_vec(&Json::Array(rendered)).map_err(|e| e.to_string());
    }
    match rendered.pop() {
        Some(one) if messages.len() == 1 => serde_json::to_vec(&one).map_err(|e| e.to_string()),
        _ => Err(format!("a unary method answered {} messages", messages.len())),
    }
}

fn to_json(route: &Route, message: &DynamicMessage) -> Json {
    let json = message_json(message);
    match (&route.response_body, json) {
        (Some(field), Json::Object(mut map)) => map.remove(field.json_name()).unwrap_or(Json::Null),
        (_, json) => json,
    }
}

/// Renders any message as proto3 JSON.
pub fn message_json(message: &DynamicMessage) -> Json {
    message.serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new()).unwrap_or(Json::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        contracts::Contracts,
        routes::{RouteMatch, Router},
    };
    use http::Method;

    fn build(method: Method, path_and_query: &str, body: &str) -> Result<Json, BadRequest> {
        let router = Router::from_contracts(&Contracts::meshkit().unwrap()).unwrap();
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let RouteMatch::Found(route, caps) = router.find(&method, path) else { panic!("no route for {path}") };
        let msg = request_message(route, caps, query, body.as_bytes())?;
        Ok(message_json(&msg))
    }

    #[test]
    fn body_star_takes_both_field_name_styles() {
        let a = build(Method::POST, "/v1/orders", r#"{"user_id":"u1","items":[{"sku":"a","quantity":2}]}"#).unwrap();
        let b = build(Method::POST, "/v1/orders", r#"{"userId":"u1","items":[{"sku":"a","quantity":"2"}]}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(a["userId"], "u1");
        assert_eq!(a["items"][0]["quantity"], 2);
    }

    #[test]
    fn path_and_query_fill_fields() {
        let j = build(Method::GET, "/v1/users/u%201/orders?page_size=5&pageToken=abc", "").unwrap();
        assert_eq!(j["userId"], "u 1");
        assert_eq!(j["pageSize"], 5);
        assert_eq!(j["pageToken"], "abc");
        let j = build(Method::GET, "/v1/orders?user_id=u2", "").unwrap();
        assert_eq!(j["userId"], "u2");
    }

    #[test]
    fn errors_name_the_problem() {
        let e = build(Method::POST, "/v1/orders", "{\"user_id\": ").unwrap_err();
        assert!(e.0.contains("malformed JSON"), "{e}");
        let e = build(Method::POST, "/v1/orders", r#"{"user_id":"u","colour":"red"}"#).unwrap_err();
        assert!(e.0.contains("colour"), "{e}");
        let e = build(Method::POST, "/v1/orders", r#"{"user_id":"u","items":[{"sku":"a","quantity":"many"}]}"#)
            .unwrap_err();
        assert!(e.0.contains("items[0].quantity"), "{e}");
        let e = build(Method::POST, "/v1/orders", r#"[1,2]"#).unwrap_err();
        assert!(e.0.contains("must be a JSON object"), "{e}");
        let e = build(Method::GET, "/v1/users/u1/orders?page_size=ten", "").unwrap_err();
        assert!(e.0.contains("page_size"), "{e}");
        let e = build(Method::GET, "/v1/users/u1/orders?colour=red", "").unwrap_err();
        assert!(e.0.contains("query parameter `colour`"), "{e}");
        let e = build(Method::GET, "/v1/users/u1/orders?page_size=1&page_size=2", "").unwrap_err();
        assert!(e.0.contains("more than once"), "{e}");
        let e = build(Method::GET, "/v1/users/u1", "{\"x\":1}").unwrap_err();
        assert!(e.0.contains("takes no request body"), "{e}");
        let e = build(Method::POST, "/v1/users?name=x", "{}").unwrap_err();
        assert!(e.0.contains("query parameter `name`"), "{e}");
    }

    #[test]
    fn frames_round_trip() {
        let contracts = Contracts::meshkit().unwrap();
        let desc = contracts.pool().get_message_by_name("meshkit.user.v1.GetUserRequest").unwrap();
        let msg = decode_json(desc, serde_json::json!({"id": "x"})).unwrap();
        let mut body = BytesMut::new();
        body.extend_from_slice(&frame(&msg));
        body.extend_from_slice(&frame(&msg));
        let frames = split_frames(body.freeze()).unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], msg.encode_to_vec());
        assert!(split_frames(Bytes::from_static(&[0, 0, 0, 0, 9, 1])).is_err());
        assert!(split_frames(Bytes::from_static(&[1, 0, 0, 0, 0])).is_err());
    }
}
