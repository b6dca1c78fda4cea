//! The executor protovalidate's conformance runner drives: it reads a
//! `buf.validate.conformance.harness.TestConformanceRequest` (the test
//! cases' descriptors and one message per case) on stdin, validates each case
//! with the evaluator meshkit's servers run (`prost-protovalidate`, as
//! `meshkit-validate` uses it), and writes a `TestConformanceResponse` on
//! stdout.
//!
//! ```text
//! protovalidate-conformance [--expected_failures F] target/debug/protovalidate-executor
//! ```

use std::collections::HashMap;
use std::io::{Read, Write};

use prost::Message;
use prost_protovalidate::{Error, ValidatorOption};
use prost_reflect::{DescriptorPool, DynamicMessage};

#[derive(Clone, PartialEq, Message)]
struct TestConformanceRequest {
    /// Kept encoded: prost-types' option messages would drop the rules,
    /// which are extensions.
    #[prost(bytes = "vec", tag = "2")]
    fdset: Vec<u8>,
    #[prost(map = "string, message", tag = "3")]
    cases: HashMap<String, prost_types::Any>,
}

#[derive(Clone, PartialEq, Message)]
struct TestConformanceResponse {
    #[prost(map = "string, message", tag = "1")]
    results: HashMap<String, TestResult>,
}

#[derive(Clone, PartialEq, Message)]
struct TestResult {
    #[prost(oneof = "Outcome", tags = "1, 2, 3, 4, 5")]
    result: Option<Outcome>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Outcome {
    #[prost(bool, tag = "1")]
    Success(bool),
    #[prost(message, tag = "2")]
    ValidationError(prost_protovalidate::types::Violations),
    #[prost(string, tag = "3")]
    CompilationError(String),
    #[prost(string, tag = "4")]
    RuntimeError(String),
    #[prost(string, tag = "5")]
    UnexpectedError(String),
}

fn main() -> anyhow::Result<()> {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    let request = TestConformanceRequest::decode(input.as_slice())?;
    let fdset = request.fdset;
    // The whole set at once; else file by file, so a file prost-reflect
    // cannot take (it panics building the error for some editions files)
    // fails its own cases, not the run.
    let mut pool = DescriptorPool::new();
    let mut refused = Vec::new();
    if let Ok(Ok(all)) = std::panic::catch_unwind(|| DescriptorPool::decode(fdset.as_slice())) {
        pool = all;
    } else {
        for file in files(&fdset)? {
            let mut candidate = pool.clone();
            let added = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                candidate.decode_file_descriptor_proto(file).map(|()| candidate)
            }));
            match added {
                Ok(Ok(bigger)) => pool = bigger,
                Ok(Err(e)) => refused.push(e.to_string()),
                Err(_) => refused.push("prost-reflect panicked loading a file".into()),
            }
        }
    }
    let validator =
        prost_protovalidate::Validator::with_options(&[ValidatorOption::AdditionalDescriptorSetBytes(fdset.clone())]);
    let results = request
        .cases
        .into_iter()
        .map(|(name, case)| {
            let outcome = match run(&pool, &validator, &case) {
                Ok(outcome) => outcome,
                Err(e) => Outcome::UnexpectedError(format!("{e} (files not loaded: {})", refused.join("; "))),
            };
            (name, TestResult { result: Some(outcome) })
        })
        .collect();
    std::io::stdout().write_all(&TestConformanceResponse { results }.encode_to_vec())?;
    Ok(())
}

/// The encoded files of an encoded `FileDescriptorSet` (its field 1).
fn files(fdset: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut rest = fdset;
    while !rest.is_empty() {
        let (tag, wire) = prost::encoding::decode_key(&mut rest)?;
        anyhow::ensure!(tag == 1 && wire == prost::encoding::WireType::LengthDelimited, "not a FileDescriptorSet");
        let len = prost::encoding::decode_varint(&mut rest)? as usize;
        anyhow::ensure!(len <= rest.len(), "a file cut short");
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    Ok(out)
}

fn run(
    pool: &DescriptorPool,
    validator: &prost_protovalidate::Validator,
    case: &prost_types::Any,
) -> anyhow::Result<Outcome> {
    let name = case.type_url.rsplit('/').next().unwrap_or_default();
    let desc = pool.get_message_by_name(name).ok_or_else(|| anyhow::anyhow!("no message {name}"))?;
    let message = DynamicMessage::decode(desc, case.value.as_slice())?;
    // A panic in the evaluator is a failed case, not a failed run.
    let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| validator.validate(&message)));
    Ok(match verdict {
        Ok(Ok(())) => Outcome::Success(true),
        Ok(Err(Error::Validation(e))) => Outcome::ValidationError(prost_protovalidate::types::Violations {
            violations: e.violations().iter().map(|v| v.to_proto()).collect(),
        }),
        Ok(Err(Error::Compilation(e))) => Outcome::CompilationError(e.to_string()),
        Ok(Err(Error::Runtime(e))) => Outcome::RuntimeError(e.to_string()),
        Ok(Err(e)) => Outcome::UnexpectedError(e.to_string()),
        Err(_) => Outcome::UnexpectedError("the evaluator panicked".into()),
    })
}
