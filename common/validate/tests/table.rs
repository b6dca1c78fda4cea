//! The shared table of requests and the violations every validator of the
//! contracts must report for them (`services/integration-tests/fixtures/
//! validation-cases.json`; protovalidate-java and protovalidate-python run
//! the same table).

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use meshkit_validate::{FieldViolation, Validator, violations_of};
use prost_reflect::{DescriptorPool, DynamicMessage};

const SERVICES: &[&str] = &[
    "meshkit.user.v1.UserService",
    "meshkit.order.v1.OrderService",
    "meshkit.notification.v1.NotificationService",
    "meshkit.scheduler.v1.JobScheduler",
    "meshkit.scheduler.v1.JobExecutor",
];

fn cases() -> Vec<serde_json::Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../services/integration-tests/fixtures/validation-cases.json");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

fn pool() -> DescriptorPool {
    DescriptorPool::decode(meshkit_proto::FILE_DESCRIPTOR_SET).unwrap()
}

#[test]
fn every_case_of_the_shared_table() {
    let pool = pool();
    let validator = Validator::for_services(&pool, SERVICES).unwrap();
    let mut wrong = Vec::new();
    let cases = cases();
    for case in &cases {
        let name = case["message"].as_str().unwrap();
        let desc = pool.get_message_by_name(name).unwrap_or_else(|| panic!("no message {name}"));
        let message = DynamicMessage::deserialize(desc, &case["input"]).unwrap_or_else(|e| panic!("{case}: {e}"));
        let violations = validator.check(&message).unwrap();
        if let Some(v) = violations.iter().find(|v| v.message.is_empty()) {
            wrong.push(format!("{name} {}: {v:?} has no message", case["input"]));
        }
        let got: Vec<(String, String, String)> = violations.into_iter().map(|v| (v.field, v.rule, v.message)).collect();
        let want: Vec<(String, String, String)> = case["violations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                let text = |k: &str| v[k].as_str().unwrap().to_owned();
                (text("field"), text("rule"), text("message"))
            })
            .collect();
        if got != want {
            wrong.push(format!("{name} {}: want {want:?}, got {got:?}", case["input"]));
        }
    }
    assert!(wrong.is_empty(), "{} of {} cases disagree:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
}

#[test]
fn the_status_lists_every_violation_with_its_path_and_rule() {
    let pool = pool();
    let validator = Validator::for_services(&pool, SERVICES).unwrap();
    let desc = pool.get_message_by_name("meshkit.order.v1.CreateOrderRequest").unwrap();
    let message = DynamicMessage::deserialize(
        desc.clone(),
        &serde_json::json!({"userId": "nope", "items": [{"sku": "book-1", "quantity": 0}]}),
    )
    .unwrap();
    let status = validator.check_encoded(&desc, &prost::Message::encode_to_vec(&message)).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("user_id: "), "{}", status.message());
    assert!(status.message().contains("; items[0].quantity: "), "{}", status.message());
    assert!(status.message().ends_with("[int32.gte_lte]"), "{}", status.message());
    let violations = violations_of(&status);
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, ["user_id", "items[0].quantity"]);
    assert_eq!(violations[1].rule, "int32.gte_lte");
    assert!(!violations[1].message.is_empty());
}

#[test]
fn a_request_with_many_broken_items_gets_a_status_of_bounded_size() {
    let pool = pool();
    let validator = Validator::for_services(&pool, SERVICES).unwrap();
    let desc = pool.get_message_by_name("meshkit.order.v1.CreateOrderRequest").unwrap();
    let items: Vec<_> = (0..100).map(|_| serde_json::json!({"sku": "book"})).collect();
    let message =
        DynamicMessage::deserialize(desc.clone(), &serde_json::json!({"userId": "nope", "items": items})).unwrap();
    let status = validator.check_encoded(&desc, &prost::Message::encode_to_vec(&message)).unwrap_err();
    assert!(status.message().starts_with("user_id: must be a valid UUID [string.uuid]; items[0].quantity: "));
    assert!(status.message().ends_with("; and 96 more"), "{}", status.message());
    assert_eq!(violations_of(&status).len(), meshkit_validate::LISTED_IN_DETAILS);
    assert!(
        status.message().len() + status.details().len() < 4096,
        "{} + {}",
        status.message().len(),
        status.details().len()
    );
}

#[test]
fn only_methods_with_rules_are_checked_and_bytes_that_do_not_decode_pass_to_the_codec() {
    let pool = pool();
    let validator = Validator::for_services(&pool, SERVICES).unwrap();
    assert!(validator.method("/meshkit.user.v1.UserService/CreateUser").is_some());
    assert!(validator.method("/meshkit.scheduler.v1.JobScheduler/ListJobs").is_none(), "no rules");
    assert!(validator.method("/grpc.health.v1.Health/Check").is_none());
    let desc = validator.method("/meshkit.user.v1.UserService/GetUser").unwrap().clone();
    assert!(validator.check_encoded(&desc, &[0xff, 0xff, 0xff]).is_ok());
    let violation = FieldViolation { field: String::new(), rule: "shard".into(), message: "m".into() };
    assert_eq!(violation.to_string(), "m [shard]");
}
