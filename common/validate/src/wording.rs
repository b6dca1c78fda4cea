//! Violation messages in validate.proto's own words.
//!
//! protovalidate defines each standard rule in validate.proto as a CEL rule:
//! a fixed `message` (`must be a valid UUID`), or an expression that words
//! it from the rule's values (`'must be at most %s characters'.format([rules.max_len])`).
//! The Java and Python runtimes show those words; the Rust evaluator leaves
//! some messages empty and words others its own way. This puts back
//! validate.proto's, so every runtime refuses a request in the same words.

use std::collections::HashMap;

use prost_protovalidate::Violation;
use prost_reflect::{DescriptorPool, DynamicMessage, ExtensionDescriptor, Value};

use crate::RULES_PACKAGE;

#[derive(Debug)]
enum Text {
    Fixed(String),
    /// A `%s`/`%d` template and the names of the rule values it takes, in order.
    Template {
        template: String,
        args: Vec<String>,
    },
}

#[derive(Debug, Default)]
pub struct Wording {
    texts: HashMap<String, Text>,
    field_rules: Option<ExtensionDescriptor>,
}

impl Wording {
    pub fn new(pool: &DescriptorPool) -> Self {
        let mut wording = Self { texts: HashMap::new(), field_rules: pool.get_extension_by_name("buf.validate.field") };
        if let Some(predefined) = pool.get_extension_by_name("buf.validate.predefined") {
            for rules in pool.all_messages().filter(|m| m.package_name() == RULES_PACKAGE) {
                for field in rules.fields() {
                    wording.add(&field.options(), &predefined);
                }
            }
        }
        // A message-level CEL rule's message is left empty by the evaluator:
        // taken from the contracts (by id; the first of a repeated id wins).
        if let Some(on_message) = pool.get_extension_by_name("buf.validate.message") {
            for desc in pool.all_messages().filter(|m| m.package_name() != RULES_PACKAGE) {
                wording.add(&desc.options(), &on_message);
            }
        }
        wording
    }

    /// Adds the CEL rules in `options`' `extension`.
    fn add(&mut self, options: &DynamicMessage, extension: &ExtensionDescriptor) {
        if !options.has_extension(extension) {
            return;
        }
        let value = options.get_extension(extension);
        let Some(cel) = value.as_message().and_then(|m| m.get_field_by_name("cel")) else { return };
        for rule in cel.as_list().unwrap_or_default().iter().filter_map(|r| r.as_message()) {
            let text = |name: &str| rule.get_field_by_name(name).and_then(|v| v.as_str().map(str::to_owned));
            let (Some(id), message, expression) = (text("id"), text("message"), text("expression")) else { continue };
            let text = match message.filter(|m| !m.is_empty()) {
                Some(message) => Text::Fixed(message),
                None => match expression.as_deref().and_then(template) {
                    Some((template, args)) => Text::Template { template, args },
                    None => continue,
                },
            };
            self.texts.entry(id).or_insert(text);
        }
    }

    /// The message of `v` in validate.proto's words, when they are known.
    pub fn word(&self, v: &Violation) -> Option<String> {
        match self.texts.get(v.rule_id())? {
            Text::Fixed(message) => Some(message.clone()),
            Text::Template { template, args } => {
                let rules = self.rules_of(v)?;
                let values = args.iter().map(|a| scalar(&*rules.get_field_by_name(a)?)).collect::<Option<Vec<_>>>()?;
                fill(template, &values)
            }
        }
    }

    /// The rules message (`Int32Rules`, `StringRules`, …) the violated rule is in:
    /// the field's `(buf.validate.field)`, followed along the rule path.
    fn rules_of(&self, v: &Violation) -> Option<DynamicMessage> {
        let options = v.field_descriptor()?.options();
        let ext = self.field_rules.as_ref()?;
        if !options.has_extension(ext) {
            return None;
        }
        let mut rules = options.get_extension(ext).as_message()?.clone();
        let path = v.rule_path();
        let segments: Vec<&str> = path.split('.').collect();
        for segment in &segments[..segments.len().saturating_sub(1)] {
            rules = rules.get_field_by_name(segment)?.as_message()?.clone();
        }
        Some(rules)
    }
}

/// The template and argument names of `'…'.format([rules.a, rules.b])` in a
/// rule's expression.
fn template(expression: &str) -> Option<(String, Vec<String>)> {
    let at = expression.find("'.format([")?;
    let start = expression[..at].rfind('\'')?;
    let template = expression[start + 1..at].to_owned();
    let rest = &expression[at + "'.format([".len()..];
    let args = rest[..rest.find("])")?]
        .split(',')
        .map(|a| a.trim().strip_prefix("rules.").map(str::to_owned))
        .collect::<Option<Vec<_>>>()?;
    Some((template, args))
}

/// A rule value as CEL's `%s`/`%d` prints it; none for lists, messages, bytes.
fn scalar(value: &Value) -> Option<String> {
    Some(match value {
        Value::I32(n) => n.to_string(),
        Value::I64(n) => n.to_string(),
        Value::U32(n) => n.to_string(),
        Value::U64(n) => n.to_string(),
        Value::F32(n) => n.to_string(),
        Value::F64(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::String(s) => s.clone(),
        _ => return None,
    })
}

/// `template` with each `%s` or `%d` replaced by the next value.
fn fill(template: &str, values: &[String]) -> Option<String> {
    let mut out = String::new();
    let mut values = values.iter();
    let mut rest = template;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        match rest.get(at + 1..at + 2) {
            Some("s") | Some("d") => out.push_str(values.next()?),
            Some("%") => out.push('%'),
            _ => return None,
        }
        rest = &rest[at + 2..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_and_their_arguments() {
        let e = "has(rules.lte) && (this > rules.lte || this < rules.gte)\
                 ? 'must be greater than or equal to %s and less than or equal to %s'.format([rules.gte, rules.lte]) : ''";
        let (t, args) = template(e).unwrap();
        assert_eq!(args, ["gte", "lte"]);
        assert_eq!(
            fill(&t, &["0".into(), "1000".into()]).unwrap(),
            "must be greater than or equal to 0 and less than or equal to 1000"
        );
        let (t, args) = template(
            "uint(this.size()) < rules.min_items ? 'must contain at least %d item(s)'.format([rules.min_items]) : ''",
        )
        .unwrap();
        assert_eq!(
            (fill(&t, &["1".into()]).unwrap(), args),
            ("must contain at least 1 item(s)".into(), vec!["min_items".into()])
        );
        assert!(template("this.size() > 3").is_none());
        assert!(fill("%s and %s", &["1".into()]).is_none(), "a value short");
        assert_eq!(fill("100%% of %s", &["x".into()]).unwrap(), "100% of x");
    }
}
