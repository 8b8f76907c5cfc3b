//! The one query parameter: parsing `n` strictly out of a raw query string.
//!
//! Written against the raw query rather than serde's `Query` extractor so that a repeated
//! `n` is an error (serde keeps the last one) and every rejection says exactly what is
//! wrong; pure and allocation-light so the fuzzer can hammer it.

use std::fmt;

/// Why a query was refused; `Display` is the message the client reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputError {
    Missing { max_n: u64 },
    Empty { max_n: u64 },
    Repeated,
    NotAnInteger { got: String, max_n: u64 },
    TooLarge { got: String, max_n: u64 },
}

/// How much of a bad value is echoed back: enough to recognise, never a wall of text.
const ECHO_LIMIT: usize = 32;

fn echo(raw: &str) -> String {
    match raw.char_indices().nth(ECHO_LIMIT) {
        Some((cut, _)) => format!("{}…", &raw[..cut]),
        None => raw.to_owned(),
    }
}

impl std::error::Error for InputError {}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { max_n } => write!(
                f,
                "missing query parameter 'n': give a non-negative integer from 0 to {max_n}, e.g. /fibonacci?n=10"
            ),
            Self::Empty { max_n } => write!(
                f,
                "query parameter 'n' is empty: give a non-negative integer from 0 to {max_n}"
            ),
            Self::Repeated => write!(f, "query parameter 'n' is given more than once: give it exactly once"),
            Self::NotAnInteger { got, max_n } => write!(
                f,
                "query parameter 'n' must be a plain non-negative decimal integer (digits 0-9 only) from 0 to {max_n}; got {got:?}"
            ),
            Self::TooLarge { got, max_n } => write!(
                f,
                "query parameter 'n' must be at most {max_n}; got {got}"
            ),
        }
    }
}

/// Parses `n` from a raw (still percent-encoded) query string; other parameters are ignored.
pub fn parse_n(query: Option<&str>, max_n: u64) -> Result<u64, InputError> {
    // The query nearly every request sends, `n=` and up to 19 digits alone, has nothing to
    // decode and cannot overflow: read at once. Anything else, a number above `max_n`
    // included, takes the general path for its answer or its error message.
    if let Some(digits) = query.and_then(|q| q.strip_prefix("n=")) {
        if (1..=19).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
            let n = digits
                .bytes()
                .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
            if n <= max_n {
                return Ok(n);
            }
        }
    }
    parse_n_decoded(query, max_n)
}

/// [`parse_n`] for any query: decoded as a form, every pair looked at.
fn parse_n_decoded(query: Option<&str>, max_n: u64) -> Result<u64, InputError> {
    let mut found = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if key == "n" {
            if found.is_some() {
                return Err(InputError::Repeated);
            }
            found = Some(value);
        }
    }
    let raw = found.ok_or(InputError::Missing { max_n })?;
    if raw.is_empty() {
        return Err(InputError::Empty { max_n });
    }
    // ASCII digits only: this rules out signs, points, exponents, hex, whitespace and
    // other scripts' digits, which `str::parse` would partly accept.
    if !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InputError::NotAnInteger {
            got: echo(&raw),
            max_n,
        });
    }
    // Leading zeros name the same number; stripping them first keeps the length check
    // below meaningful for inputs like 000…0005.
    let significant = raw.trim_start_matches('0');
    let too_large = || InputError::TooLarge {
        got: echo(&raw),
        max_n,
    };
    if significant.len() > 20 {
        return Err(too_large());
    }
    let n = if significant.is_empty() {
        0
    } else {
        significant.parse::<u64>().map_err(|_| too_large())?
    };
    if n > max_n {
        return Err(too_large());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_rules() {
        use InputError as E;
        let max_n = 1000;
        let not_int = |got: &str| E::NotAnInteger {
            got: got.into(),
            max_n,
        };
        let too_large = |got: &str| E::TooLarge {
            got: got.into(),
            max_n,
        };
        let cases: Vec<(Option<&str>, Result<u64, InputError>, &str)> = vec![
            (Some("n=0"), Ok(0), "zero is the first index"),
            (Some("n=10"), Ok(10), "the README example"),
            (Some("n=1000"), Ok(1000), "the maximum itself is allowed"),
            (Some("n=007"), Ok(7), "leading zeros name the same number"),
            (
                Some("n=%31%30"),
                Ok(10),
                "percent-encoded digits are digits",
            ),
            (Some("n=5&lang=en"), Ok(5), "other parameters are ignored"),
            (None, Err(E::Missing { max_n }), "no query at all"),
            (Some(""), Err(E::Missing { max_n }), "empty query"),
            (
                Some("m=5"),
                Err(E::Missing { max_n }),
                "another parameter only",
            ),
            (
                Some("N=5"),
                Err(E::Missing { max_n }),
                "names are case-sensitive",
            ),
            (Some("n="), Err(E::Empty { max_n }), "empty value"),
            (Some("n"), Err(E::Empty { max_n }), "bare key"),
            (
                Some("n=1&n=2"),
                Err(E::Repeated),
                "repeated, different values",
            ),
            (Some("n=1&n=1"), Err(E::Repeated), "repeated, same value"),
            (Some("n=-1"), Err(not_int("-1")), "negative"),
            (Some("n=%2B5"), Err(not_int("+5")), "explicit plus sign"),
            (
                Some("n=+5"),
                Err(not_int(" 5")),
                "a literal + is a space in a query",
            ),
            (Some("n=1.5"), Err(not_int("1.5")), "fraction"),
            (Some("n=10.0"), Err(not_int("10.0")), "integral fraction"),
            (Some("n=1e3"), Err(not_int("1e3")), "exponent"),
            (Some("n=0x10"), Err(not_int("0x10")), "hex"),
            (Some("n=%205"), Err(not_int(" 5")), "leading space"),
            (Some("n=5%0A"), Err(not_int("5\n")), "trailing newline"),
            (Some("n=%D9%A3"), Err(not_int("٣")), "Arabic-Indic digit"),
            (Some("n=%EF%BC%95"), Err(not_int("５")), "fullwidth digit"),
            (Some("n=%FF"), Err(not_int("\u{FFFD}")), "invalid UTF-8"),
            (Some("n=abc"), Err(not_int("abc")), "letters"),
            (
                Some("n=1001"),
                Err(too_large("1001")),
                "one past the maximum",
            ),
            (
                Some("n=18446744073709551616"),
                Err(too_large("18446744073709551616")),
                "beyond u64",
            ),
        ];
        for (query, expected, why) in cases {
            assert_eq!(parse_n(query, max_n), expected, "{why}: {query:?}");
        }
    }

    #[test]
    fn the_quick_read_answers_as_the_decoding_does() {
        let mut queries: Vec<String> = ["n=", "n=+1", "n=1+", "n=1&n=2", "n=1&x=y", "n=%31"]
            .map(String::from)
            .to_vec();
        for len in 1..=22 {
            queries.push(format!("n={}", "9".repeat(len)));
            queries.push(format!("n=1{}", "0".repeat(len - 1)));
            queries.push(format!("n={}7", "0".repeat(len - 1)));
        }
        queries.extend((995..=1005).map(|n| format!("n={n}")));
        queries.push(format!("n={}", u64::MAX));
        for query in &queries {
            for max_n in [0, 7, 1000, 1_000_000, u64::MAX] {
                assert_eq!(
                    parse_n(Some(query), max_n),
                    parse_n_decoded(Some(query), max_n),
                    "{query} with MAX_N={max_n}"
                );
            }
        }
    }

    #[test]
    fn long_inputs_are_bounded_in_the_message() {
        let long = format!("n={}", "9".repeat(10_000));
        let err = parse_n(Some(&long), 1000).unwrap_err();
        assert!(matches!(err, InputError::TooLarge { .. }), "{err:?}");
        assert!(err.to_string().len() < 200, "message echoes too much");
        let zeros = format!("n={}5", "0".repeat(10_000));
        assert_eq!(
            parse_n(Some(&zeros), 1000),
            Ok(5),
            "leading zeros of any length"
        );
    }

    #[test]
    fn max_n_is_configurable() {
        assert_eq!(parse_n(Some("n=100000"), 100_000), Ok(100_000));
        assert!(parse_n(Some("n=100001"), 100_000).is_err());
        assert_eq!(parse_n(Some("n=0"), 0), Ok(0));
    }
}
