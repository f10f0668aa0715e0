//! Durations as Istio YAML writes them (`1s`, `100ms`, `1.5s`, `1m`, `1h30m`), kept with their original text.

use std::fmt;
use std::time::Duration as StdDuration;

use serde::{Deserialize, Serialize};

/// Largest duration protobuf can carry (`google.protobuf.Duration`: 10,000 years in seconds).
const MAX_SECONDS: u128 = 315_576_000_000;

/// Why a duration string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The text is not `<number><unit>` repeated.
    #[error(
        "invalid duration {text:?}: expected a number followed by a unit (ns, us, ms, s, m, h), e.g. \"1.5s\", \"100ms\" or \"1m30s\""
    )]
    Syntax {
        /// The text as written.
        text: String,
    },
    /// A leading `-`.
    #[error("invalid duration {text:?}: must not be negative")]
    Negative {
        /// The text as written.
        text: String,
    },
    /// Larger than protobuf allows.
    #[error("invalid duration {text:?}: must be at most {MAX_SECONDS}s")]
    TooLarge {
        /// The text as written.
        text: String,
    },
}

/// A duration with the text the user wrote, so it serializes back unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duration {
    text: String,
    value: StdDuration,
}

impl Duration {
    /// Parses Go/protobuf-style durations: one or more `<decimal><unit>` parts, unit one of
    /// `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`. A bare `0` is accepted, as Go does.
    pub fn parse(text: &str) -> Result<Self, DurationError> {
        let syntax = || DurationError::Syntax {
            text: text.to_string(),
        };
        let trimmed = text.trim();
        if trimmed.starts_with('-') {
            return Err(DurationError::Negative {
                text: text.to_string(),
            });
        }
        let body = trimmed.strip_prefix('+').unwrap_or(trimmed);
        if body == "0" {
            return Ok(Self {
                text: text.to_string(),
                value: StdDuration::ZERO,
            });
        }
        if body.is_empty() {
            return Err(syntax());
        }
        let mut total_nanos: u128 = 0;
        let mut rest = body;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(syntax)?;
            let (number, after) = rest.split_at(number_len);
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_len);
            let unit_nanos: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(syntax()),
            };
            total_nanos = total_nanos
                .checked_add(decimal_times(number, unit_nanos).ok_or_else(syntax)?)
                .ok_or_else(syntax)?;
            rest = next;
        }
        if total_nanos > MAX_SECONDS * 1_000_000_000 {
            return Err(DurationError::TooLarge {
                text: text.to_string(),
            });
        }
        let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| syntax())?;
        let nanos = u32::try_from(total_nanos % 1_000_000_000).map_err(|_| syntax())?;
        Ok(Self {
            text: text.to_string(),
            value: StdDuration::new(secs, nanos),
        })
    }

    /// The parsed value.
    pub fn get(&self) -> StdDuration {
        self.value
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Istio's `ValidateDuration`: at least 1ms and whole milliseconds; `None` when fine.
    pub(crate) fn istio_problem(&self) -> Option<String> {
        if self.value < StdDuration::from_millis(1) {
            Some(format!(
                "duration must be at least 1ms, got {:?}",
                self.text
            ))
        } else if !self.value.subsec_nanos().is_multiple_of(1_000_000) {
            Some(format!(
                "only durations to ms precision are supported, got {:?}",
                self.text
            ))
        } else {
            None
        }
    }
}

/// `number` (digits with an optional fraction) times `unit` nanoseconds, truncated to whole nanoseconds.
fn decimal_times(number: &str, unit: u128) -> Option<u128> {
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (number, ""),
    };
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    if !whole.chars().all(|c| c.is_ascii_digit()) || !fraction.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let whole_value: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut result = whole_value.checked_mul(unit)?;
    // Digits beyond nanosecond precision cannot matter for any unit here (the largest is 3.6e12 ns).
    let mut scale = unit;
    for digit in fraction.chars().take(20) {
        scale /= 10;
        let d = u128::from(digit.to_digit(10)?);
        result = result.checked_add(d * scale)?;
    }
    Some(result)
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_style_durations() {
        let cases = [
            ("1s", StdDuration::from_secs(1)),
            ("100ms", StdDuration::from_millis(100)),
            ("1.5s", StdDuration::from_millis(1500)),
            ("0.5s", StdDuration::from_millis(500)),
            (".25s", StdDuration::from_millis(250)),
            ("1m", StdDuration::from_secs(60)),
            ("1h", StdDuration::from_secs(3600)),
            ("1h30m", StdDuration::from_secs(5400)),
            ("7s", StdDuration::from_secs(7)),
            ("250us", StdDuration::from_micros(250)),
            ("0", StdDuration::ZERO),
            ("0s", StdDuration::ZERO),
        ];
        for (text, want) in cases {
            let got = Duration::parse(text).map(|d| d.get());
            assert_eq!(got, Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_garbage_and_negative() {
        for text in [
            "",
            "s",
            "1",
            "10",
            "1x",
            "abc",
            "1.2.3s",
            "1s2",
            "one second",
            "1 s",
        ] {
            assert!(
                matches!(Duration::parse(text), Err(DurationError::Syntax { .. })),
                "{text:?} should be a syntax error"
            );
        }
        assert!(matches!(
            Duration::parse("-1s"),
            Err(DurationError::Negative { .. })
        ));
        assert!(matches!(
            Duration::parse("999999999999h"),
            Err(DurationError::TooLarge { .. })
        ));
    }

    #[test]
    fn istio_rules_need_at_least_one_millisecond_in_whole_milliseconds() {
        let problem = |text: &str| Duration::parse(text).ok().and_then(|d| d.istio_problem());
        assert_eq!(problem("1ms"), None);
        assert_eq!(problem("1.5s"), None);
        assert!(problem("0s").is_some_and(|m| m.contains("at least 1ms")));
        assert!(problem("1500us").is_some_and(|m| m.contains("ms precision")));
    }

    #[test]
    fn serializes_the_original_text() {
        let d = Duration::parse("1.50s").ok();
        assert_eq!(
            d.map(|d| serde_json::to_string(&d).ok()),
            Some(Some("\"1.50s\"".to_string()))
        );
    }
}
