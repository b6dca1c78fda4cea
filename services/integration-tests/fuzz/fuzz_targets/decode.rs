//! What every meshkit server does with a request's bytes before its
//! handler: decode them as the method's input (every method of the
//! contracts) and check the contract's rules. Any bytes give a message and
//! its violations, or a decode error; never a panic.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshkit_validate::Validator;
use prost_reflect::{DescriptorPool, MessageDescriptor};

static METHODS: LazyLock<(Validator, Vec<MessageDescriptor>)> = LazyLock::new(|| {
    let pool = DescriptorPool::decode(meshkit_proto::FILE_DESCRIPTOR_SET).expect("the contracts decode");
    let services: Vec<String> =
        pool.services().filter(|s| s.full_name().starts_with("meshkit.")).map(|s| s.full_name().to_owned()).collect();
    let names: Vec<&str> = services.iter().map(String::as_str).collect();
    let validator = Validator::for_services(&pool, &names).expect("the rules compile");
    let inputs = pool
        .services()
        .filter(|s| s.full_name().starts_with("meshkit."))
        .flat_map(|s| s.methods().map(|m| m.input()).collect::<Vec<_>>())
        .collect();
    (validator, inputs)
});

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    let (validator, inputs) = &*METHODS;
    let input = &inputs[usize::from(which) % inputs.len()];
    // The server layer's path: decode, check, and the status it would answer.
    let _ = validator.check_encoded(input, bytes);
    if let Ok(message) = prost_reflect::DynamicMessage::decode(input.clone(), bytes) {
        let _ = validator.check(&message);
    }
});
