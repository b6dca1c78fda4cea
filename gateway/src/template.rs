//! `google.api.http` path templates: parsing and matching.
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! A variable without `=` matches one segment (`{id}` is `{id=*}`). `**`
//! matches the rest of the path and may only come last. A single-segment
//! variable's value is fully percent-decoded; a multi-segment one keeps `%2F`
//! encoded, as the annotation's documentation asks.

use std::fmt;

/// One segment of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    Any,
    /// `**`: zero or more segments, at the end only.
    Rest,
}

/// A variable: the field it sets and the segments it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// Dotted field path, for example `shelf.name`.
    pub field_path: Vec<String>,
    /// Index of the variable's first segment.
    pub start: usize,
    /// One past its last segment.
    pub end: usize,
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub segments: Vec<Segment>,
    pub variables: Vec<Variable>,
    pub verb: Option<String>,
    source: String,
}

/// Why a template could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad path template {template:?}: {problem}")]
pub struct TemplateError {
    pub template: String,
    pub problem: String,
}

/// The values a match captured, in the template's variable order.
pub type Captures = Vec<(Vec<String>, String)>;

impl Template {
    /// Parses `source`.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let fail = |problem: &str| TemplateError { template: source.to_owned(), problem: problem.to_owned() };
        let Some(body) = source.strip_prefix('/') else { return Err(fail("must start with /")) };
        // The verb is a `:` after the last segment, outside any braces.
        let (path, verb) = split_verb(body).map_err(|p| fail(&p))?;
        let mut segments = Vec::new();
        let mut variables = Vec::new();
        let mut rest = path;
        while !rest.is_empty() || segments.is_empty() {
            if let Some(inner) = rest.strip_prefix('{') {
                let close = inner.find('}').ok_or_else(|| fail("a { has no closing }"))?;
                let (var, after) = (&inner[..close], &inner[close + 1..]);
                let (field, pattern) = match var.split_once('=') {
                    Some((f, p)) => (f, p),
                    None => (var, "*"),
                };
                let field_path: Vec<String> = field.split('.').map(str::to_owned).collect();
                if field_path.iter().any(|p| !is_ident(p)) {
                    return Err(fail(&format!("{field:?} is not a field path")));
                }
                if variables.iter().any(|v: &Variable| v.field_path == field_path) {
                    return Err(fail(&format!("{field:?} is bound twice")));
                }
                let start = segments.len();
                for seg in pattern.split('/') {
                    if seg.contains(['{', '}']) {
                        return Err(fail("variables cannot nest"));
                    }
                    segments.push(parse_segment(seg).map_err(|p| fail(&p))?);
                }
                variables.push(Variable { field_path, start, end: segments.len() });
                rest = after;
            } else {
                let end = rest.find('/').unwrap_or(rest.len());
                let seg = &rest[..end];
                if seg.contains(['{', '}']) {
                    return Err(fail("a variable must fill a whole segment"));
                }
                segments.push(parse_segment(seg).map_err(|p| fail(&p))?);
                rest = &rest[end..];
            }
            match rest.strip_prefix('/') {
                Some("") => return Err(fail("must not end with /")),
                Some(r) => rest = r,
                None if rest.is_empty() => break,
                None => return Err(fail("a variable must fill a whole segment")),
            }
        }
        if let Some(i) = segments.iter().position(|s| *s == Segment::Rest) {
            if i + 1 != segments.len() {
                return Err(fail("** may only be the last segment"));
            }
        }
        Ok(Self { segments, variables, verb, source: source.to_owned() })
    }

    /// Matches a request path (still percent-encoded) and returns what its
    /// variables captured, or `None` when the path does not fit.
    pub fn matches(&self, path: &str) -> Option<Captures> {
        let body = path.strip_prefix('/')?;
        let body = match &self.verb {
            Some(verb) => body.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => body,
        };
        let parts: Vec<&str> = body.split('/').collect();
        let has_rest = self.segments.last() == Some(&Segment::Rest);
        let fixed = self.segments.len() - usize::from(has_rest);
        if parts.len() < fixed || (!has_rest && parts.len() != fixed) {
            return None;
        }
        for (seg, part) in self.segments.iter().zip(&parts) {
            match seg {
                Segment::Literal(lit) => {
                    if lit != part {
                        return None;
                    }
                }
                Segment::Any | Segment::Rest => {
                    if part.is_empty() {
                        return None;
                    }
                }
            }
        }
        if has_rest && parts[fixed..].iter().any(|p| p.is_empty()) {
            return None;
        }
        let mut captures = Vec::with_capacity(self.variables.len());
        for var in &self.variables {
            let end = if var.end == self.segments.len() && has_rest { parts.len() } else { var.end };
            let value = if end - var.start == 1 && self.segments[var.start] != Segment::Rest {
                decode(parts[var.start], true)?
            } else {
                parts[var.start..end].iter().map(|p| decode(p, false)).collect::<Option<Vec<_>>>()?.join("/")
            };
            captures.push((var.field_path.clone(), value));
        }
        Some(captures)
    }

    /// How specific the template is: literal segments count most, then
    /// fixed-width ones; the router tries the most specific first.
    pub fn specificity(&self) -> (usize, usize, bool) {
        let literals = self.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
        let fixed = self.segments.iter().filter(|s| **s != Segment::Rest).count();
        (literals, fixed, self.verb.is_some())
    }

    /// The template in OpenAPI's form: each variable as `{field.path}`.
    pub fn openapi_path(&self) -> String {
        let mut out = String::new();
        let mut i = 0;
        while i < self.segments.len() {
            out.push('/');
            if let Some(var) = self.variables.iter().find(|v| v.start == i) {
                out.push('{');
                out.push_str(&var.field_path.join("."));
                out.push('}');
                i = var.end;
                continue;
            }
            match &self.segments[i] {
                Segment::Literal(l) => out.push_str(l),
                Segment::Any => out.push('*'),
                Segment::Rest => out.push_str("**"),
            }
            i += 1;
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn split_verb(body: &str) -> Result<(&str, Option<String>), String> {
    let mut depth = 0i32;
    let mut colon = None;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ':' if depth == 0 => colon = Some(i),
            '/' if depth == 0 => colon = None,
            _ => {}
        }
    }
    match colon {
        Some(i) => {
            let verb = &body[i + 1..];
            if verb.is_empty() || verb.contains(['/', '{', '}', '*']) {
                return Err(format!("{verb:?} is not a verb"));
            }
            Ok((&body[..i], Some(verb.to_owned())))
        }
        None => Ok((body, None)),
    }
}

fn parse_segment(seg: &str) -> Result<Segment, String> {
    match seg {
        "" => Err("empty segment".into()),
        "*" => Ok(Segment::Any),
        "**" => Ok(Segment::Rest),
        lit if lit.contains('*') => Err(format!("{lit:?} mixes * with text")),
        lit => Ok(Segment::Literal(lit.to_owned())),
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Percent-decodes a segment; `%2F` stays encoded unless `all`. `None` when
/// the result is not UTF-8.
fn decode(part: &str, all: bool) -> Option<String> {
    if !part.contains('%') {
        return Some(part.to_owned());
    }
    if all {
        return percent_encoding::percent_decode_str(part).decode_utf8().ok().map(|c| c.into_owned());
    }
    // `%2F` stays as it is: split on it, decode the pieces, join them back.
    let lower = part.to_ascii_lowercase();
    let mut pieces = Vec::new();
    let mut start = 0;
    for (i, _) in lower.match_indices("%2f") {
        pieces.push(&part[start..i]);
        start = i + 3;
    }
    pieces.push(&part[start..]);
    let decoded: Option<Vec<String>> = pieces
        .into_iter()
        .map(|p| percent_encoding::percent_decode_str(p).decode_utf8().ok().map(|c| c.into_owned()))
        .collect();
    Some(decoded?.join("%2F"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        Template::parse(t).unwrap().matches(path).map(|c| c.into_iter().map(|(f, v)| (f.join("."), v)).collect())
    }

    fn pairs(p: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect())
    }

    #[test]
    fn simple_variables() {
        assert_eq!(caps("/v1/users/{id}", "/v1/users/42"), pairs(&[("id", "42")]));
        assert_eq!(caps("/v1/users/{user_id}/orders", "/v1/users/u1/orders"), pairs(&[("user_id", "u1")]));
        assert_eq!(caps("/v1/users/{id}", "/v1/users"), None);
        assert_eq!(caps("/v1/users/{id}", "/v1/users/"), None);
        assert_eq!(caps("/v1/users/{id}", "/v1/users/1/2"), None);
        assert_eq!(caps("/v1/users", "/v1/users"), pairs(&[]));
    }

    #[test]
    fn nested_fields_and_multi_segment_variables() {
        assert_eq!(
            caps("/v1/{book.name=shelves/*/books/*}", "/v1/shelves/1/books/2"),
            pairs(&[("book.name", "shelves/1/books/2")])
        );
        assert_eq!(caps("/v1/{name=shelves/*}/books", "/v1/shelves/s1/books"), pairs(&[("name", "shelves/s1")]));
        assert_eq!(caps("/v1/{name=shelves/*}/books", "/v1/racks/s1/books"), None);
        assert_eq!(caps("/v1/files/{path=**}", "/v1/files/a/b/c.txt"), pairs(&[("path", "a/b/c.txt")]));
        assert_eq!(caps("/v1/files/{path=**}", "/v1/files"), pairs(&[("path", "")]));
    }

    #[test]
    fn verbs() {
        assert_eq!(caps("/v1/orders/{id}:cancel", "/v1/orders/7:cancel"), pairs(&[("id", "7")]));
        assert_eq!(caps("/v1/orders/{id}:cancel", "/v1/orders/7"), None);
        assert_eq!(caps("/v1/orders/{id}", "/v1/orders/7:cancel"), pairs(&[("id", "7:cancel")]));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(caps("/v1/users/{id}", "/v1/users/a%20b"), pairs(&[("id", "a b")]));
        assert_eq!(caps("/v1/users/{id}", "/v1/users/a%2Fb"), pairs(&[("id", "a/b")]));
        assert_eq!(caps("/v1/{name=shelves/*}", "/v1/shelves/a%2Fb"), pairs(&[("name", "shelves/a%2Fb")]));
        assert_eq!(caps("/v1/users/{id}", "/v1/users/%FF"), None, "not UTF-8");
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in [
            "v1/users",
            "/v1/users/",
            "/v1/{id",
            "/v1/{a.}",
            "/v1/**/x",
            "/v1/x{id}",
            "/v1/{id}/{id}",
            "/v1/a*",
            "/v1/{a={b}}",
            "/v1/x:",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn openapi_form() {
        let t = Template::parse("/v1/{book.name=shelves/*/books/*}:archive").unwrap();
        assert_eq!(t.openapi_path(), "/v1/{book.name}:archive");
        assert_eq!(Template::parse("/v1/users/{id}").unwrap().openapi_path(), "/v1/users/{id}");
    }
}
