//! Helpers that turn validation failures into gRPC statuses
//! with messages a caller can act on. Internal detail is logged, not sent.

use tonic::Status;

/// INVALID_ARGUMENT naming the field, e.g. `email: must look like name@example.com`.
pub fn invalid_argument(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

/// Checks an id argument (a UUID; surrounding blanks ignored) and returns it
/// normalised; INVALID_ARGUMENT naming the field otherwise.
pub fn id(field: &str, raw: &str) -> Result<String, Status> {
    if raw.trim().is_empty() {
        return Err(invalid_argument(field, "must not be empty"));
    }
    uuid::Uuid::parse_str(raw.trim())
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| invalid_argument(field, format!("{raw:?} is not a valid id")))
}

/// Validates a page size: 0 means `default`; negative or above `max` is refused.
pub fn page_size(field: &str, requested: i32, default: u64, max: u64) -> Result<u64, Status> {
    match requested {
        0 => Ok(default),
        n if n < 0 => Err(invalid_argument(field, "must not be negative")),
        n if n as u64 > max => Err(invalid_argument(field, format!("must be at most {max}"))),
        n => Ok(n as u64),
    }
}

/// Ends a keyset page: `rows` were read with a limit of `limit + 1`; the
/// extra row, if any, is dropped and the last kept row's key becomes the
/// next page token (empty on the last page).
pub fn finish_page<T>(mut rows: Vec<T>, limit: u64, key: impl Fn(&T) -> String) -> (Vec<T>, String) {
    if rows.len() as u64 > limit {
        rows.truncate(limit as usize);
        let token = rows.last().map(key).unwrap_or_default();
        (rows, token)
    } else {
        (rows, String::new())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_page_keeps_limit_rows_and_points_past_the_last() {
        let (rows, token) = super::finish_page(vec![1, 2, 3], 2, |n| n.to_string());
        assert_eq!((rows, token.as_str()), (vec![1, 2], "2"));
        let (rows, token) = super::finish_page(vec![1, 2], 2, |n| n.to_string());
        assert_eq!((rows, token.as_str()), (vec![1, 2], ""));
    }
}
