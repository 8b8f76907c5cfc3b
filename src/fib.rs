//! Fibonacci numbers: exact values by fast doubling, and a cheap check of claimed digits.
//!
//! Fast doubling walks the bits of `n` from the top, carrying F(k) and the Lucas number
//! L(k): F(2k) = F(k)·L(k) and L(2k) = L(k)² − 2(−1)^k, then one step to 2k+1 with
//! F(2k+1) = (F(2k) + L(2k))/2 and L(2k+1) = (5F(2k) + L(2k))/2. That is O(log n) big
//! multiplications instead of n big additions, no recursion, and one product plus one
//! square per bit (the classic F(k), F(k+1) form needs three). The last, largest step
//! only needs F, so it skips the square: together about half the work of the classic form.

use num_bigint::BigUint;
use num_traits::{One, Zero};

/// F(n), exactly.
pub fn fibonacci(n: u64) -> BigUint {
    if n == 0 {
        return BigUint::zero();
    }
    // (f, l) = (F(k), L(k)) for k = the bits of n read so far; the top bit makes k = 1.
    let mut f = BigUint::one();
    let mut l = BigUint::one();
    let mut k_odd = true;
    let bits = u64::BITS - n.leading_zeros();
    for bit in (0..bits - 1).rev() {
        let odd_next = (n >> bit) & 1 == 1;
        let f2k = &f * &l;
        if bit == 0 && !odd_next {
            return f2k;
        }
        // L(2k) = L(k)² − 2(−1)^k: never negative, since L(k)² ≥ 1 and L(k)² ≥ 4 when k is even.
        let l_squared = &l * &l;
        let l2k = if k_odd {
            l_squared + 2u32
        } else {
            l_squared - 2u32
        };
        if odd_next {
            let f2k1 = (&f2k + &l2k) >> 1u32;
            if bit == 0 {
                return f2k1;
            }
            l = ((f2k * 5u32) + l2k) >> 1u32;
            f = f2k1;
        } else {
            f = f2k;
            l = l2k;
        }
        // 2k is even; 2k + 1 is odd.
        k_odd = odd_next;
    }
    f
}

/// F(n) in decimal.
pub fn fibonacci_decimal(n: u64) -> String {
    fibonacci(n).to_str_radix(10)
}

/// A fingerprint of Fibonacci numbers: residues modulo a prime this process picks at
/// random at start-up. Digits someone planted in the cache pass only if they are F(n)
/// modulo a prime they cannot know: public arithmetic (a fixed modulus) would let anyone
/// who can write to Redis forge `F(n) + p` and have it served. No secret is shared, so
/// every replica checks every other replica's writes with a prime of its own.
#[derive(Debug, Clone, Copy)]
pub struct Fingerprint {
    p: u64,
}

fn mul_mod(x: u64, y: u64, p: u64) -> u64 {
    ((u128::from(x) * u128::from(y)) % u128::from(p)) as u64
}

fn pow_mod(mut base: u64, mut exp: u64, p: u64) -> u64 {
    let mut acc = 1 % p;
    base %= p;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul_mod(acc, base, p);
        }
        base = mul_mod(base, base, p);
        exp >>= 1;
    }
    acc
}

/// Deterministic Miller–Rabin: these bases decide every 64-bit number.
fn is_prime(n: u64) -> bool {
    const BASES: [u64; 12] = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37];
    if n < 2 {
        return false;
    }
    if let Some(&b) = BASES.iter().find(|&&b| n.is_multiple_of(b)) {
        return n == b;
    }
    let (d, s) = (
        (n - 1) >> (n - 1).trailing_zeros(),
        (n - 1).trailing_zeros(),
    );
    BASES.iter().all(|&a| {
        let mut x = pow_mod(a, d, n);
        if x == 1 || x == n - 1 {
            return true;
        }
        (1..s).any(|_| {
            x = mul_mod(x, x, n);
            x == n - 1
        })
    })
}

impl Fingerprint {
    /// A fingerprint with a random prime in [2^62, 2^63), from the OS's randomness.
    pub fn random() -> Self {
        loop {
            let candidate =
                getrandom::u64().expect("the OS provides randomness") >> 2 | 1 << 62 | 1;
            if is_prime(candidate) {
                return Self { p: candidate };
            }
        }
    }

    /// A fingerprint with a chosen prime (tests that need to forge against it).
    pub fn with_prime(p: u64) -> Option<Self> {
        (p > 1 << 32 && is_prime(p)).then_some(Self { p })
    }

    /// The prime.
    pub fn prime(&self) -> u64 {
        self.p
    }

    /// F(n) mod p by the classic doubling, in O(log n) word operations.
    fn fibonacci_mod(&self, n: u64) -> u64 {
        let p = self.p;
        let (mut a, mut b) = (0u64, 1u64);
        for bit in (0..u64::BITS - n.leading_zeros()).rev() {
            let f2k = mul_mod(a, (2 * b % p + p - a) % p, p);
            let f2k1 = (mul_mod(a, a, p) + mul_mod(b, b, p)) % p;
            (a, b) = if (n >> bit) & 1 == 1 {
                (f2k1, (f2k + f2k1) % p)
            } else {
                (f2k, f2k1)
            };
        }
        a
    }

    /// The residue of a decimal number, 18 digits (below 2^60) at a time.
    fn residue(&self, digits: &[u8]) -> u64 {
        let p = u128::from(self.p);
        let head = digits.len() % 18;
        let chunks = std::iter::once(&digits[..head]).chain(digits[head..].chunks(18));
        chunks.fold(0u64, |acc, chunk| {
            let (value, scale) = chunk.iter().fold((0u64, 1u64), |(v, s), d| {
                (v * 10 + u64::from(d - b'0'), s * 10)
            });
            ((u128::from(acc) * u128::from(scale) + u128::from(value)) % p) as u64
        })
    }

    /// Whether `digits` can be trusted as F(n) in decimal: canonical digits, the length
    /// from Binet's formula, and F(n)'s residue modulo this process's prime. A wrong value
    /// passes only if the prime divides its difference from F(n): for a value chosen
    /// without knowing the prime, with odds below 2^-40 even for n = 10^6.
    pub fn verifies(&self, n: u64, digits: &[u8]) -> bool {
        let canonical = !digits.is_empty()
            && digits.iter().all(u8::is_ascii_digit)
            && (digits.len() == 1 || digits[0] != b'0');
        if !canonical {
            return false;
        }
        match digit_count(n) {
            Some(expected) if digits.len() != expected => return false,
            None if digits.len() > max_digits(n) => return false,
            _ => {}
        }
        self.residue(digits) == self.fibonacci_mod(n)
    }
}

/// The number of decimal digits of F(n), from Binet's formula; `None` when the
/// floating-point estimate is too close to a power of ten to be sure.
fn digit_count(n: u64) -> Option<usize> {
    if n < 2 {
        return Some(1);
    }
    // log10 F(n) ≈ n·log10(φ) − log10(√5); the neglected ψ^n term is below 0.5 for n ≥ 2.
    let log10 = n as f64 * 0.208_987_640_249_978_73 - 0.349_485_002_168_009_4;
    let frac = log10 - log10.floor();
    if !(1e-9..=1.0 - 1e-9).contains(&frac) {
        return None;
    }
    Some(log10.floor() as usize + 1)
}

/// The most decimal digits F(n) can have: what a cache read needs at most.
pub fn max_digits(n: u64) -> usize {
    digit_count(n).unwrap_or_else(|| {
        let log10 = n as f64 * 0.208_987_640_249_978_73 - 0.349_485_002_168_009_4;
        log10.max(0.0).ceil() as usize + 1
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// The first values by plain addition, the definition itself.
    fn by_addition(count: usize) -> Vec<BigUint> {
        let mut values = vec![BigUint::zero(), BigUint::one()];
        while values.len() < count {
            let next = &values[values.len() - 1] + &values[values.len() - 2];
            values.push(next);
        }
        values
    }

    #[test]
    fn matches_the_definition_up_to_300() {
        for (n, expected) in by_addition(301).iter().enumerate() {
            assert_eq!(&fibonacci(n as u64), expected, "F({n})");
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(fibonacci_decimal(0), "0");
        assert_eq!(fibonacci_decimal(1), "1");
        assert_eq!(fibonacci_decimal(2), "1");
        assert_eq!(fibonacci_decimal(10), "55");
        assert_eq!(fibonacci_decimal(93), "12200160415121876738");
        assert_eq!(fibonacci_decimal(100), "354224848179261915075");
        let f1000 = fibonacci_decimal(1000);
        assert_eq!(f1000.len(), 209);
        assert_eq!(
            f1000,
            "43466557686937456435688527675040625802564660517371780402481729089536555417949051\
             89040387984007925516929592259308032263477520968962323987332247116164299644090653\
             3187938298969649928516003704476137795166849228875"
        );
    }

    #[test]
    fn doubling_identities_hold_for_random_k() {
        let mut rng = rand::rng();
        for _ in 0..50 {
            let k: u64 = rng.random_range(1..20_000);
            let (fk, fk1) = (fibonacci(k), fibonacci(k + 1));
            assert_eq!(
                fibonacci(2 * k),
                &fk * ((&fk1 << 1u32) - &fk),
                "F(2k), k={k}"
            );
            assert_eq!(
                fibonacci(2 * k + 1),
                &fk * &fk + &fk1 * &fk1,
                "F(2k+1), k={k}"
            );
            // Cassini-free check of the recurrence itself at a random point.
            assert_eq!(fibonacci(k + 2), &fk + &fk1, "F(k+2), k={k}");
        }
    }

    #[test]
    fn true_digits_pass_the_check() {
        let fingerprint = Fingerprint::random();
        for n in (0..=2000).chain([10_000, 54_321, 100_000]) {
            let digits = fibonacci_decimal(n);
            assert!(
                fingerprint.verifies(n, digits.as_bytes()),
                "F({n}) rejected with p = {}",
                fingerprint.prime()
            );
            assert!(
                digits.len() <= max_digits(n),
                "F({n}) longer than its bound"
            );
        }
    }

    #[test]
    fn random_primes_are_primes_and_differ() {
        let (a, b) = (Fingerprint::random(), Fingerprint::random());
        assert_ne!(a.prime(), b.prime(), "two draws of a 2^62-sized space");
        for f in [a, b] {
            assert!(f.prime() >= 1 << 62, "{}", f.prime());
            // Fermat's little theorem as an independent check of primality.
            assert_eq!(pow_mod(3, f.prime() - 1, f.prime()), 1);
        }
        assert!(is_prime((1 << 61) - 1) && !is_prime((1 << 61) + 1));
        assert!(
            !is_prime(3_215_031_751),
            "a strong pseudoprime to bases 2, 3, 5, 7"
        );
    }

    #[test]
    fn a_value_forged_for_a_known_modulus_fails_against_a_secret_one() {
        // F(999) + (2^61 − 1) passed the old public check; with a secret prime it fails,
        // while the same forgery against that very prime would pass.
        let f999: BigUint = fibonacci(999);
        let mersenne = BigUint::from((1u64 << 61) - 1);
        let forged = (&f999 + &mersenne).to_str_radix(10);
        assert_eq!(
            forged.len(),
            fibonacci_decimal(999).len(),
            "same length as F(999)"
        );
        assert!(!Fingerprint::random().verifies(999, forged.as_bytes()));
        let known = Fingerprint::with_prime((1 << 61) - 1).unwrap();
        assert!(
            known.verifies(999, forged.as_bytes()),
            "a known modulus is forgeable"
        );
    }

    #[test]
    fn wrong_digits_fail_the_check() {
        let f500 = fibonacci_decimal(500);
        let f499 = fibonacci_decimal(499);
        let mut off_by_one = f500.clone().into_bytes();
        *off_by_one.last_mut().unwrap() ^= 1;
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"55 ", "trailing space"),
            (b"-55", "sign"),
            (b"055", "leading zero"),
            (f499.as_bytes(), "the neighbour's value"),
            (&off_by_one, "one digit changed"),
            (&f500.as_bytes()[1..], "truncated"),
            (b"hello", "not digits"),
        ];
        let fingerprint = Fingerprint::random();
        for (digits, why) in cases {
            assert!(!fingerprint.verifies(500, digits), "{why} accepted");
        }
        assert!(!fingerprint.verifies(10, b"56"), "F(10)=56 accepted");
    }
}
