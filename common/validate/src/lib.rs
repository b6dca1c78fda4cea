//! The contract's validation rules, enforced.
//!
//! The protos in `proto/` carry their rules as protovalidate annotations
//! (`buf.validate`): lengths, patterns, formats, ranges, required fields,
//! repeated sizes and CEL expressions for the rest. [`Validator`] reads them
//! from the descriptors and checks a request message against them
//! (`prost-protovalidate` evaluates the rules); [`ValidateLayer`] does it in
//! a server for every call whose method's input has rules, after the message
//! arrives and before the handler runs, so no service validates by hand.
//!
//! One error contract, on every side (Rust servers, the Spring Boot starter,
//! the gateway's REST answers): INVALID_ARGUMENT whose message lists the
//! violations as `{field}: {message} [{rule}]`, joined by `; `, and a
//! `google.rpc.BadRequest` in `grpc-status-details-bin` with one
//! `FieldViolation` per violation (`field` the field path such as
//! `items[1].sku`, `description` the message, `reason` the rule id).
#![forbid(unsafe_code)]

mod layer;
mod wording;

use std::collections::HashMap;
use std::sync::Arc;

use prost_protovalidate::{Error as RuleError, Violation};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, ReflectMessage};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use layer::{ValidateLayer, ValidateService};

/// The package of protovalidate's options and rule messages (`buf.validate`).
pub(crate) const RULES_PACKAGE: &str = "buf.validate";

/// A request's broken rule: where, which, and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field path (`name`, `items[1].sku`); empty for a rule on the whole message.
    pub field: String,
    /// The rule's id (`string.max_len`, or a CEL rule's own id).
    pub rule: String,
    /// What the rule says, for a person.
    pub message: String,
}

impl FieldViolation {
    fn from_violation(v: &Violation) -> Self {
        Self { field: v.field_path(), rule: v.rule_id().to_owned(), message: v.message().to_owned() }
    }
}

impl std::fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{} [{}]", self.message, self.rule)
    }
}

/// How many violations the message of a refusal lists; the rest are counted.
pub const LISTED_IN_MESSAGE: usize = 5;
/// How many violations the `google.rpc.BadRequest` of a refusal lists. Both
/// travel in the trailers, which peers bound (8 to 16 KiB is common): a
/// request with a hundred broken items must not be answered with a status
/// too large to deliver.
pub const LISTED_IN_DETAILS: usize = 20;

/// INVALID_ARGUMENT listing `violations` in its message (the first
/// [`LISTED_IN_MESSAGE`], then how many more) and in a
/// `google.rpc.BadRequest` detail (the first [`LISTED_IN_DETAILS`]).
pub fn invalid_argument(violations: &[FieldViolation]) -> Status {
    let mut message = violations.iter().take(LISTED_IN_MESSAGE).map(ToString::to_string).collect::<Vec<_>>().join("; ");
    if violations.len() > LISTED_IN_MESSAGE {
        message.push_str(&format!("; and {} more", violations.len() - LISTED_IN_MESSAGE));
    }
    let mut details = ErrorDetails::new();
    details.set_bad_request(
        violations
            .iter()
            .take(LISTED_IN_DETAILS)
            .map(|v| tonic_types::FieldViolation {
                field: v.field.clone(),
                description: v.message.clone(),
                reason: v.rule.clone(),
                localized_message: None,
            })
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// The violations an INVALID_ARGUMENT status carries in its
/// `google.rpc.BadRequest` detail (empty when it has none).
pub fn violations_of(status: &Status) -> Vec<FieldViolation> {
    status
        .get_details_bad_request()
        .map(|bad| {
            bad.field_violations
                .into_iter()
                .map(|v| FieldViolation { field: v.field, rule: v.reason, message: v.description })
                .collect()
        })
        .unwrap_or_default()
}

/// Why a message could not be checked at all: its rules do not compile, or
/// evaluating one failed. A fault of the contract, not of the caller.
#[derive(Debug, Clone)]
pub struct RuleFault {
    /// The message whose rules failed.
    pub message: String,
    /// What failed.
    pub cause: String,
}

impl std::fmt::Display for RuleFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the validation rules of {}: {}", self.message, self.cause)
    }
}

impl std::error::Error for RuleFault {}

/// Checks messages against the protovalidate rules in their descriptors.
/// Cheap to clone; rules are compiled once per message type.
#[derive(Clone)]
pub struct Validator {
    rules: Arc<prost_protovalidate::Validator>,
    /// `/package.Service/Method` → the input type, for methods whose input has rules.
    methods: Arc<HashMap<String, MessageDescriptor>>,
    /// Rule messages as validate.proto (or the contract's own CEL rule)
    /// words them: the evaluator leaves some empty and words others its own
    /// way; protovalidate's other runtimes show validate.proto's.
    wording: Arc<wording::Wording>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator").field("methods", &self.methods.len()).finish()
    }
}

impl Validator {
    /// A validator for the methods of `services` (full names) in `pool`.
    /// Every input's rules are compiled here, so a rule that does not
    /// compile fails at start rather than on a call.
    pub fn for_services(pool: &DescriptorPool, services: &[&str]) -> Result<Self, RuleFault> {
        let rules = prost_protovalidate::Validator::new();
        let mut methods = HashMap::new();
        for service in pool.services().filter(|s| services.contains(&s.full_name())) {
            for method in service.methods() {
                let input = method.input();
                if !has_rules(&input, &mut Vec::new()) {
                    continue;
                }
                // Compiles the rules; a default message may break them, which is fine.
                match rules.validate(&DynamicMessage::new(input.clone())) {
                    Ok(()) | Err(RuleError::Validation(_)) => {}
                    Err(e) => return Err(RuleFault { message: input.full_name().to_owned(), cause: e.to_string() }),
                }
                methods.insert(format!("/{}/{}", service.full_name(), method.name()), input);
            }
        }
        Ok(Self { rules: Arc::new(rules), methods: Arc::new(methods), wording: Arc::new(wording::Wording::new(pool)) })
    }

    /// A validator for every service of meshkit's contracts.
    pub fn for_contracts(services: &[&str]) -> Result<Self, RuleFault> {
        let pool = DescriptorPool::decode(meshkit_proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| RuleFault { message: "meshkit_proto::FILE_DESCRIPTOR_SET".into(), cause: e.to_string() })?;
        Self::for_services(&pool, services)
    }

    /// The input type of the method at `path` (`/package.Service/Method`)
    /// when it has rules to check.
    pub fn method(&self, path: &str) -> Option<&MessageDescriptor> {
        self.methods.get(path)
    }

    /// How many methods have rules.
    pub fn methods(&self) -> usize {
        self.methods.len()
    }

    /// Checks `message`: the violations, in the order of the fields.
    pub fn check(&self, message: &DynamicMessage) -> Result<Vec<FieldViolation>, RuleFault> {
        match self.rules.validate(message) {
            Ok(()) => Ok(Vec::new()),
            Err(RuleError::Validation(e)) => Ok(e
                .violations()
                .iter()
                .map(|v| {
                    let mut violation = FieldViolation::from_violation(v);
                    if let Some(message) = self.wording.word(v) {
                        violation.message = message;
                    }
                    violation
                })
                .collect()),
            Err(e) => Err(RuleFault { message: message.descriptor().full_name().to_owned(), cause: e.to_string() }),
        }
    }

    /// Checks an encoded `desc` message: `Ok` when it keeps every rule (or
    /// does not decode: the handler's codec refuses that itself), else the
    /// status to answer with.
    pub fn check_encoded(&self, desc: &MessageDescriptor, encoded: &[u8]) -> Result<(), Status> {
        let Ok(message) = DynamicMessage::decode(desc.clone(), encoded) else { return Ok(()) };
        match self.check(&message) {
            Ok(violations) if violations.is_empty() => Ok(()),
            Ok(violations) => Err(invalid_argument(&violations)),
            Err(fault) => {
                tracing::error!(error = %fault, "a request could not be validated");
                Err(Status::internal(format!("{} could not be validated", desc.full_name())))
            }
        }
    }
}

/// Whether `desc`, or a message it holds, carries protovalidate rules.
fn has_rules(desc: &MessageDescriptor, seen: &mut Vec<String>) -> bool {
    if seen.iter().any(|s| s == desc.full_name()) {
        return false;
    }
    seen.push(desc.full_name().to_owned());
    let annotated =
        |options: DynamicMessage| options.extensions().any(|(ext, _)| ext.full_name().starts_with(RULES_PACKAGE));
    if annotated(desc.options()) || desc.oneofs().any(|o| annotated(o.options())) {
        return true;
    }
    desc.fields().any(|field| {
        annotated(field.options())
            || match field.kind() {
                prost_reflect::Kind::Message(inner) => has_rules(&inner, seen),
                _ => false,
            }
    })
}
