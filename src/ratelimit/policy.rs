//! `RATE_LIMITS`: the windows a client is limited by, e.g. `30/minute,50/hour,200/day`.

use std::fmt;

/// One limit: at most `limit` requests per `unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub limit: u32,
    pub unit: Unit,
}

/// The period a window counts over; also the `window` label of the rejection metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
}

impl Unit {
    /// The label value and the word in `RATE_LIMITS`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }

    /// The period in milliseconds.
    pub fn millis(self) -> u64 {
        const S: u64 = 1_000;
        match self {
            Self::Second => S,
            Self::Minute => 60 * S,
            Self::Hour => 3600 * S,
            Self::Day => 86_400 * S,
        }
    }

    fn parse(word: &str) -> Option<Self> {
        Some(match word.trim_end_matches('s') {
            "second" => Self::Second,
            "minute" => Self::Minute,
            "hour" => Self::Hour,
            "day" => Self::Day,
            _ => return None,
        })
    }
}

impl Window {
    /// The period in milliseconds.
    pub fn period(&self) -> u64 {
        self.unit.millis()
    }
}

/// The largest limit a (scaled) window may have: limit × a day in milliseconds must stay
/// below 2^53, where the Lua script's doubles stop being exact integers.
pub const MAX_SCALED_LIMIT: u32 = 100_000_000;

/// The most windows a policy has: one per unit.
pub const MAX_WINDOWS: usize = 4;

/// All windows that apply to every client, shortest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    windows: Vec<Window>,
}

impl Policy {
    /// Parses `N/unit[,N/unit…]`, units second, minute, hour, day, each at most once.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut windows = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (count, unit) = item
                .split_once('/')
                .ok_or_else(|| format!("{item:?} is not N/unit"))?;
            let limit: u32 = count
                .trim()
                .parse()
                .ok()
                .filter(|&l| l > 0 && l <= 1_000_000)
                .ok_or_else(|| format!("{count:?} is not a limit from 1 to 1000000"))?;
            let unit = Unit::parse(unit.trim())
                .ok_or_else(|| format!("{unit:?} is not second, minute, hour or day"))?;
            if windows.iter().any(|w: &Window| w.unit == unit) {
                return Err(format!("{} is given twice", unit.name()));
            }
            windows.push(Window { limit, unit });
        }
        if windows.is_empty() {
            return Err("no limits given".into());
        }
        windows.sort_by_key(|w| w.unit);
        Ok(Self { windows })
    }

    /// The same windows with every limit multiplied by `factor` (≥ 1): the shared budget
    /// of an IPv6 /48. The product stays within what the Redis script computes exactly
    /// (see [`MAX_SCALED_LIMIT`]).
    pub fn scaled(&self, factor: u32) -> Self {
        Self {
            windows: self
                .windows
                .iter()
                .map(|w| Window {
                    limit: w.limit.saturating_mul(factor).min(MAX_SCALED_LIMIT),
                    unit: w.unit,
                })
                .collect(),
        }
    }

    /// The windows, shortest first.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// The `RateLimit-Policy` header value (IETF draft): `30;w=60, 50;w=3600, 200;w=86400`.
    pub fn header(&self) -> String {
        self.windows
            .iter()
            .map(|w| format!("{};w={}", w.limit, w.period() / 1_000))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<_> = self
            .windows
            .iter()
            .map(|w| format!("{}/{}", w.limit, w.unit.name()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders_windows() {
        let policy = Policy::parse("200/day, 30/minute,50/hours").unwrap();
        assert_eq!(policy.to_string(), "30/minute,50/hour,200/day");
        assert_eq!(policy.header(), "30;w=60, 50;w=3600, 200;w=86400");
        assert_eq!(policy.windows()[0].period(), 60_000);
    }

    #[test]
    fn rejects_what_it_cannot_enforce() {
        for (text, why) in [
            ("", "empty"),
            ("30", "no unit"),
            ("30/week", "unknown unit"),
            ("0/minute", "zero"),
            ("-1/minute", "negative"),
            ("1.5/minute", "fraction"),
            ("30/minute,40/minute", "repeated unit"),
            ("2000000/second", "beyond the ceiling"),
        ] {
            assert!(Policy::parse(text).is_err(), "{why}: {text:?} accepted");
        }
    }
}
