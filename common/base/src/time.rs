//! Timestamps as the services store them (microseconds since the Unix epoch)
//! and as the contracts carry them (`google.protobuf.Timestamp`).

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    now_us() / 1000
}

/// Microseconds since the epoch as a protobuf `Timestamp`.
pub fn timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: us.div_euclid(1_000_000), nanos: (us.rem_euclid(1_000_000) * 1000) as i32 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_split_seconds_and_nanos() {
        let t = super::timestamp(1_500_000_250);
        assert_eq!((t.seconds, t.nanos), (1500, 250_000));
        let t = super::timestamp(-1);
        assert_eq!((t.seconds, t.nanos), (-1, 999_999_000));
    }
}
