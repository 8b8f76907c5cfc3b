//! Fuzzes `n`'s parsing: any query string either yields an n within bounds that the
//! query really spells in digits, or a rejection whose message stays short. Never a panic.
#![no_main]

use fibonacci_api::input::parse_n;
use libfuzzer_sys::fuzz_target;

const MAX_N: u64 = 1000;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    match parse_n(Some(query), MAX_N) {
        Ok(n) => {
            assert!(n <= MAX_N, "accepted {n} above the maximum");
            let values: Vec<String> = form_values(query);
            assert_eq!(
                values.len(),
                1,
                "accepted a query without exactly one n: {query:?}"
            );
            let digits = values[0].trim_start_matches('0');
            assert!(
                values[0].bytes().all(|b| b.is_ascii_digit()),
                "accepted non-digits: {query:?}"
            );
            assert_eq!(
                if digits.is_empty() {
                    "0".to_string()
                } else {
                    digits.to_string()
                },
                n.to_string()
            );
        }
        // At most 32 echoed characters, each at most 10 bytes escaped (\u{10ffff}).
        Err(e) => assert!(
            e.to_string().len() < 600,
            "an unbounded message for {query:?}"
        ),
    }
});

/// The decoded values of `n`, by a second, naive reading of the query.
fn form_values(query: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key) == "n").then(|| decode(value))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
