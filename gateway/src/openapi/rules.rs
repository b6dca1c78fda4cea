//! The contract's protovalidate rules (`buf.validate`) as JSON Schema
//! keywords, so a client generated from `/openapi.json` knows what the
//! servers refuse: lengths, patterns, formats, ranges, sizes, allowed values.
//! CEL rules have no JSON Schema form; they are listed under `x-cel` with
//! their id and message.

use prost_reflect::{DynamicMessage, FieldDescriptor, ReflectMessage, Value};
use serde_json::{Map, Value as Json, json};

/// protovalidate's pattern for `string.uuid`, as JSON Schema writes it.
const UUID_PATTERN: &str = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// The `(buf.validate.field)` rules of `field`, if it has any.
fn field_rules(field: &FieldDescriptor) -> Option<DynamicMessage> {
    let ext = field.parent_pool().get_extension_by_name("buf.validate.field")?;
    let options = field.options();
    if !options.has_extension(&ext) {
        return None;
    }
    options.get_extension(&ext).as_message().cloned()
}

fn set(rules: &DynamicMessage, name: &str) -> Option<Value> {
    let field = rules.descriptor().get_field_by_name(name)?;
    rules.has_field(&field).then(|| rules.get_field(&field).into_owned())
}

/// Whether the field's rules make it required (`required`, or a rule its
/// zero value breaks: a minimum length, a format, a minimum count).
pub fn is_required(field: &FieldDescriptor) -> bool {
    let Some(rules) = field_rules(field) else { return false };
    if ignores_zero(&rules) {
        return false;
    }
    if set(&rules, "required").and_then(|v| v.as_bool()).unwrap_or(false) {
        return true;
    }
    let positive = |kind: &str, name: &str| {
        set(&rules, kind).and_then(|m| m.as_message().and_then(|m| set(m, name))).is_some_and(|v| v.as_u64() > Some(0))
    };
    let format = |name: &str| {
        set(&rules, "string")
            .and_then(|m| m.as_message().and_then(|m| set(m, name)))
            .is_some_and(|v| v.as_bool() == Some(true))
    };
    positive("string", "min_len")
        || positive("string", "len")
        || positive("repeated", "min_items")
        || ["email", "uuid", "hostname", "uri", "ip", "address"].iter().any(|f| format(f))
        || zero_out_of_range(&rules)
}

/// Whether a number rule leaves 0 out (`gte: 1`, `lt: 0`, …), so the field
/// must be sent.
fn zero_out_of_range(rules: &DynamicMessage) -> bool {
    for kind in ["int32", "sint32", "sfixed32", "uint32", "fixed32", "double", "float"] {
        let Some(numbers) = set(rules, kind) else { continue };
        let Some(n) = numbers.as_message() else { return false };
        let bound = |name: &str| set(n, name).and_then(|v| number_json(&v)).and_then(|j| j.as_f64());
        return bound("gte").is_some_and(|b| b > 0.0)
            || bound("gt").is_some_and(|b| b >= 0.0)
            || bound("lte").is_some_and(|b| b < 0.0)
            || bound("lt").is_some_and(|b| b <= 0.0)
            || bound("const").is_some_and(|b| b != 0.0);
    }
    false
}

fn ignores_zero(rules: &DynamicMessage) -> bool {
    // buf.validate.Ignore: 1 = IGNORE_IF_ZERO_VALUE, 3 = IGNORE_ALWAYS.
    set(rules, "ignore").and_then(|v| v.as_enum_number()).is_some_and(|n| n == 1 || n == 3)
}

/// Adds the keywords of `field`'s rules to its `schema` (the schema of one
/// value, or of the array for a repeated field).
pub fn apply(field: &FieldDescriptor, schema: &mut Json) {
    let Some(rules) = field_rules(field) else { return };
    let Json::Object(map) = schema else { return };
    let mut keywords = Map::new();
    let mut cel = Vec::new();
    collect(&rules, field.is_list(), &mut keywords, map, &mut cel);
    if let (prost_reflect::Kind::Enum(e), false) = (field.kind(), field.is_list()) {
        // Enums are listed by name already; `in` narrows the list.
        let allowed: Vec<Json> = set(&rules, "enum")
            .and_then(|r| r.as_message().and_then(|r| set(r, "in")))
            .and_then(|v| v.as_list().map(|l| l.iter().filter_map(Value::as_i32).collect::<Vec<_>>()))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| e.get_value(n).map(|v| json!(v.name())))
            .collect();
        if !allowed.is_empty() {
            keywords.insert("enum".into(), Json::Array(allowed));
        }
    }
    if !cel.is_empty() {
        map.insert("x-cel".into(), Json::Array(cel));
    }
    if keywords.is_empty() {
        return;
    }
    if ignores_zero(&rules) {
        // The zero value (an empty string, 0) is allowed besides the rules.
        let zero = match map.get("type").and_then(Json::as_str) {
            Some("string") => json!({"maxLength": 0}),
            Some("integer") | Some("number") => json!({"const": 0}),
            _ => json!({}),
        };
        map.insert("anyOf".into(), json!([zero, Json::Object(keywords)]));
    } else {
        for (k, v) in keywords {
            add(map, &k, v);
        }
    }
}

/// Adds a keyword; a second `pattern` goes into `allOf`.
fn add(map: &mut Map<String, Json>, key: &str, value: Json) {
    if key == "pattern" && map.contains_key("pattern") {
        let all = map.entry("allOf").or_insert_with(|| json!([]));
        if let Json::Array(all) = all {
            all.push(json!({"pattern": value}));
        }
        return;
    }
    map.insert(key.to_owned(), value);
}

fn collect(
    rules: &DynamicMessage,
    list: bool,
    out: &mut Map<String, Json>,
    schema: &mut Map<String, Json>,
    cel: &mut Vec<Json>,
) {
    for rule in set(rules, "cel").and_then(|v| v.as_list().map(<[Value]>::to_vec)).unwrap_or_default() {
        if let Some(rule) = rule.as_message() {
            let text = |n: &str| set(rule, n).and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            cel.push(json!({"id": text("id"), "message": text("message"), "expression": text("expression")}));
        }
    }
    if list {
        if let Some(repeated) = set(rules, "repeated") {
            let Some(repeated) = repeated.as_message() else { return };
            number(repeated, "min_items", "minItems", out);
            number(repeated, "max_items", "maxItems", out);
            if set(repeated, "unique").and_then(|v| v.as_bool()) == Some(true) {
                out.insert("uniqueItems".into(), Json::Bool(true));
            }
            if let (Some(items), Some(Json::Object(item_schema))) = (set(repeated, "items"), schema.get_mut("items")) {
                if let Some(items) = items.as_message() {
                    let mut keywords = Map::new();
                    let mut ignored = Map::new();
                    collect(items, false, &mut keywords, &mut ignored, cel);
                    for (k, v) in keywords {
                        add(item_schema, &k, v);
                    }
                }
            }
        }
        return;
    }
    if set(rules, "required").and_then(|v| v.as_bool()) == Some(true)
        && schema.get("type").and_then(Json::as_str) == Some("string")
    {
        out.insert("minLength".into(), json!(1));
    }
    if let Some(strings) = set(rules, "string") {
        let Some(s) = strings.as_message() else { return };
        number(s, "min_len", "minLength", out);
        number(s, "max_len", "maxLength", out);
        if let Some(len) = set(s, "len").and_then(|v| v.as_u64()) {
            out.insert("minLength".into(), json!(len));
            out.insert("maxLength".into(), json!(len));
        }
        if let Some(pattern) = set(s, "pattern").and_then(|v| v.as_str().map(str::to_owned)) {
            out.insert("pattern".into(), Json::String(pattern));
        }
        if let Some(c) = set(s, "const").and_then(|v| v.as_str().map(str::to_owned)) {
            out.insert("const".into(), Json::String(c));
        }
        let allowed: Vec<Json> = set(s, "in")
            .and_then(|v| v.as_list().map(|l| l.iter().filter_map(|x| x.as_str().map(|x| json!(x))).collect()))
            .unwrap_or_default();
        if !allowed.is_empty() {
            out.insert("enum".into(), Json::Array(allowed));
        }
        for (name, format) in [
            ("email", "email"),
            ("hostname", "hostname"),
            ("uri", "uri"),
            ("uri_ref", "uri-reference"),
            ("ipv4", "ipv4"),
            ("ipv6", "ipv6"),
        ] {
            if set(s, name).and_then(|v| v.as_bool()) == Some(true) {
                out.insert("format".into(), json!(format));
            }
        }
        if set(s, "uuid").and_then(|v| v.as_bool()) == Some(true) {
            out.insert("format".into(), json!("uuid"));
            add(out, "pattern", json!(UUID_PATTERN));
        }
        return;
    }
    for kind in ["int32", "sint32", "sfixed32", "uint32", "fixed32", "double", "float"] {
        let Some(numbers) = set(rules, kind) else { continue };
        let Some(n) = numbers.as_message() else { return };
        for (rule, keyword) in [
            ("gte", "minimum"),
            ("gt", "exclusiveMinimum"),
            ("lte", "maximum"),
            ("lt", "exclusiveMaximum"),
            ("const", "const"),
        ] {
            if let Some(v) = set(n, rule).and_then(|v| number_json(&v)) {
                out.insert(keyword.into(), v);
            }
        }
        let allowed: Vec<Json> = set(n, "in")
            .and_then(|v| v.as_list().map(|l| l.iter().filter_map(number_json).collect()))
            .unwrap_or_default();
        if !allowed.is_empty() {
            out.insert("enum".into(), Json::Array(allowed));
        }
        return;
    }
}

fn number(rules: &DynamicMessage, name: &str, keyword: &str, out: &mut Map<String, Json>) {
    if let Some(v) = set(rules, name).and_then(|v| v.as_u64()) {
        out.insert(keyword.into(), json!(v));
    }
}

fn number_json(v: &Value) -> Option<Json> {
    match v {
        Value::I32(n) => Some(json!(n)),
        Value::U32(n) => Some(json!(n)),
        Value::F32(n) => Some(json!(n)),
        Value::F64(n) => Some(json!(n)),
        _ => None,
    }
}
