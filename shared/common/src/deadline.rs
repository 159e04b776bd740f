//! The caller's deadline: gRPC sends it as `grpc-timeout` (up to eight
//! digits and a unit: `H`, `M`, `S`, `m`, `u`, `n`). A service that calls
//! others on the caller's behalf gives each hop what is left of it, minus a
//! margin to answer in, so the caller hears which hop was late instead of
//! its own deadline passing.

use std::time::{Duration, Instant};

/// The deadline the request's `grpc-timeout` sets, counted from now; `None`
/// when the caller set none (or an unreadable one).
pub fn of(metadata: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    Some(Instant::now() + parse(text)?)
}

/// The same, from an HTTP request's headers (in a server layer).
pub fn from_headers(headers: &http::HeaderMap) -> Option<Instant> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    Some(Instant::now() + parse(text)?)
}

/// A `grpc-timeout` value as a duration.
pub fn parse(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// What a hop started now may take of the time left before `deadline`:
/// all of it but a tenth (at least 20 ms, at most 250 ms) kept to answer.
pub fn for_a_hop(deadline: Instant) -> Duration {
    let left = deadline.saturating_duration_since(Instant::now());
    left.saturating_sub((left / 10).clamp(Duration::from_millis(20), Duration::from_millis(250)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_nonsense_is_no_deadline() {
        assert_eq!(parse("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("250000u"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "12x", "-5S", "1.5S", "S1"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_hop_gets_the_time_left_less_a_margin_to_answer_in() {
        let hop = for_a_hop(Instant::now() + Duration::from_secs(1));
        assert!(hop <= Duration::from_millis(900) && hop > Duration::from_millis(500), "{hop:?}");
        let long = for_a_hop(Instant::now() + Duration::from_secs(60));
        assert!(long <= Duration::from_millis(59_750), "{long:?}");
        assert_eq!(for_a_hop(Instant::now()), Duration::ZERO, "nothing left: nothing to give");
    }
}
