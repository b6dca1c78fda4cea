//! Property tests of the transcoder: whatever a client sends, the gateway
//! answers with a result or a 400 message, never a panic; and what it
//! accepts round-trips through protobuf unchanged.

#![allow(clippy::unwrap_used)]

use http::Method;
use meshkit_gateway::{
    contracts::Contracts,
    routes::{RouteMatch, Router},
    template::Template,
    transcode::{message_json, render, request_message, split_frames},
};
use proptest::prelude::*;
use serde_json::{Value, json};

fn router() -> Router {
    Router::from_contracts(&Contracts::meshkit().unwrap()).unwrap()
}

/// Arbitrary JSON, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![Just("userId"), Just("user_id"), Just("items"), Just("quantity"), Just("sku"), Just("name")]
            .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("userId".to_owned()),
                    Just("user_id".to_owned()),
                    Just("items".to_owned()),
                    Just("sku".to_owned()),
                    Just("quantity".to_owned()),
                    "[a-z_]{1,8}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_body_is_answered_without_panicking(body in any_json(), raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let router = router();
        let RouteMatch::Found(route, caps) = router.find(&Method::POST, "/v1/orders") else { panic!() };
        let _ = request_message(route, caps.clone(), None, body.to_string().as_bytes());
        let _ = request_message(route, caps, None, &raw);
    }

    #[test]
    fn any_path_and_query_is_answered_without_panicking(path in "/[a-z0-9/%{}.:*=_-]{0,40}", query in "[a-zA-Z0-9_.=&%+-]{0,40}") {
        let router = router();
        for method in [Method::GET, Method::POST, Method::DELETE] {
            if let RouteMatch::Found(route, caps) = router.find(&method, &path) {
                let _ = request_message(route, caps, Some(&query), b"");
            }
        }
        let _ = Template::parse(&path).map(|t| t.matches(&path));
    }

    #[test]
    fn accepted_orders_round_trip(
        user in "[a-zA-Z0-9 _./-]{0,20}",
        items in prop::collection::vec(("[a-z0-9-]{0,10}", any::<i32>()), 0..6),
        camel in any::<bool>(),
        quantities_as_strings in any::<bool>(),
    ) {
        let router = router();
        let RouteMatch::Found(route, caps) = router.find(&Method::POST, "/v1/orders") else { panic!() };
        let items_json: Vec<Value> = items
            .iter()
            .map(|(sku, q)| if quantities_as_strings { json!({"sku": sku, "quantity": q.to_string()}) } else { json!({"sku": sku, "quantity": q}) })
            .collect();
        let body = if camel { json!({"userId": user, "items": items_json}) } else { json!({"user_id": user, "items": items_json}) };
        let message = request_message(route, caps, None, body.to_string().as_bytes()).unwrap();
        let back = message_json(&message);
        // The proto3 JSON form leaves out default values.
        let expected_items: Vec<Value> = items
            .iter()
            .map(|(sku, q)| {
                let mut m = serde_json::Map::new();
                if !sku.is_empty() { m.insert("sku".into(), json!(sku)); }
                if *q != 0 { m.insert("quantity".into(), json!(q)); }
                Value::Object(m)
            })
            .collect();
        let mut expected = serde_json::Map::new();
        if !user.is_empty() { expected.insert("userId".into(), json!(user)); }
        if !expected_items.is_empty() { expected.insert("items".into(), Value::Array(expected_items)); }
        prop_assert_eq!(back, Value::Object(expected));
    }

    #[test]
    fn any_upstream_body_is_answered_without_panicking(raw in prop::collection::vec(any::<u8>(), 0..256)) {
        let router = router();
        let RouteMatch::Found(route, _) = router.find(&Method::GET, "/v1/users/x") else { panic!() };
        if let Ok(frames) = split_frames(bytes::Bytes::from(raw)) {
            let _ = render(route, &frames);
        }
    }
}
