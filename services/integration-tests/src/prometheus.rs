//! Reading what `/metrics` serves, strictly: a malformed line fails the test.

use std::collections::HashMap;

/// Parses Prometheus text: every sample line is `name{labels} value`,
/// every comment a `# HELP` or `# TYPE`; no family declared twice, no series
/// twice.
pub fn parse(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            assert!(line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "), "{line}");
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("no type: {line}"));
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(typed.insert(name.to_owned()), "family {name} declared twice");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels in {line}");
        }
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line}"));
        assert!(samples.insert(series.to_owned(), value).is_none(), "duplicate series {series}");
    }
    samples
}
