//! Validation rules of `meshkit.user.v1`, as documented in user.proto.

use meshkit_common::status::invalid_argument;
use tonic::Status;

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_EMAIL_LEN: usize = 254;

/// Trims and checks a user's name.
pub fn name(raw: &str) -> Result<String, Status> {
    let name = raw.trim();
    if name.is_empty() {
        return Err(invalid_argument("name", "must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(invalid_argument("name", format!("must be at most {MAX_NAME_CHARS} characters")));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid_argument("name", "must not contain control characters"));
    }
    Ok(name.to_owned())
}

/// Trims, lower-cases and checks an email address: `local@domain.tld`.
pub fn email(raw: &str) -> Result<String, Status> {
    let email = raw.trim().to_lowercase();
    let malformed = || invalid_argument("email", format!("{raw:?} is not an address like name@example.com"));
    if email.is_empty() {
        return Err(invalid_argument("email", "must not be empty"));
    }
    if email.len() > MAX_EMAIL_LEN {
        return Err(invalid_argument("email", format!("must be at most {MAX_EMAIL_LEN} characters")));
    }
    let (local, domain) = email.split_once('@').ok_or_else(malformed)?;
    let labels: Vec<&str> = domain.split('.').collect();
    let bad_char = |c: char| {
        c.is_whitespace()
            || c.is_control()
            || matches!(c, '@' | ',' | ';' | '<' | '>' | '(' | ')' | '[' | ']' | '\\' | '"')
    };
    if local.is_empty()
        || local.len() > 64
        || local.chars().any(bad_char)
        || labels.len() < 2
        || labels.iter().any(|l| l.is_empty() || l.starts_with('-') || l.ends_with('-'))
        || domain.chars().any(|c| !(c.is_alphanumeric() || c == '-' || c == '.'))
    {
        return Err(malformed());
    }
    Ok(email)
}

/// Checks an id argument (a UUID) and returns it normalised.
pub fn id(field: &str, raw: &str) -> Result<String, Status> {
    if raw.is_empty() {
        return Err(invalid_argument(field, "must not be empty"));
    }
    uuid::Uuid::parse_str(raw)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| invalid_argument(field, format!("{raw:?} is not a valid id")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name("  Ada ").unwrap(), "Ada");
        for bad in ["", "   ", "a\u{7}b"] {
            let err = name(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with("name:"), "{}", err.message());
        }
        assert!(name(&"x".repeat(201)).is_err());
        assert!(name(&"é".repeat(200)).is_ok(), "counts characters, not bytes");
    }

    #[test]
    fn emails() {
        assert_eq!(email(" Ada@Example.COM ").unwrap(), "ada@example.com");
        assert!(email("a.b+tag@mail.example.co.uk").is_ok());
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "ada@@example.com",
            "a da@example.com",
            "ada@exa mple.com",
            "ada@.com",
            "ada@example..com",
            "ada@-x.com",
        ] {
            let err = email(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(err.message().starts_with("email:"), "{bad:?}: {}", err.message());
        }
    }

    #[test]
    fn ids() {
        let u = uuid::Uuid::now_v7().to_string();
        assert_eq!(id("id", &u).unwrap(), u);
        assert!(id("id", "").unwrap_err().message().starts_with("id:"));
        assert!(id("user_id", "42").unwrap_err().message().starts_with("user_id:"));
    }
}
