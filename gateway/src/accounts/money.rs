//! Credits as the store keeps them, integer micro-credits, and as the API shows them, decimals.
//!
//! Amounts are summed as integers only, so that replicas and restarts agree to the last
//! micro-credit; a decimal is read from its text (`"12.50"`, or a JSON number as written),
//! never through a float that is then rounded, and one with more than six decimals is refused
//! rather than rounded.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Micro-credits in a credit.
pub const MICRO: i64 = 1_000_000;
/// The most credits an account may hold, and the largest single amount: a billion credits.
/// Far below what the Redis scripts keep exact (2^53 micro-credits, about nine billion
/// credits), with room for what is debited past zero.
pub const MAX_MONEY: i64 = 1_000_000_000 * MICRO;

/// An amount of credits, kept as micro-credits. Shown as a JSON number with up to six
/// decimals; read from a JSON number or a string holding a decimal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, utoipa::ToSchema)]
#[schema(value_type = f64, example = 12.5)]
pub struct Credits(pub i64);

impl Credits {
    pub fn micro(self) -> i64 {
        self.0
    }

    /// The amount as a float, for display only (exact for every amount within
    /// [`MAX_MONEY`]: at most fifteen significant digits).
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / MICRO as f64
    }

    /// The micro-credits a float amount of credits makes (a meter's charge), to the nearest
    /// micro-credit (`0.3` is 300,000, though `0.3 * 1e6` is a hair above it as a float). NaN,
    /// negative and infinite amounts are 0; huge ones saturate at [`MAX_MONEY`].
    pub fn from_charge(credits: f64) -> Credits {
        if !credits.is_finite() || credits <= 0.0 {
            return Credits(0);
        }
        let micro = (credits * MICRO as f64).round();
        if micro >= MAX_MONEY as f64 {
            Credits(MAX_MONEY)
        } else {
            Credits(micro as i64)
        }
    }
}

impl std::fmt::Display for Credits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / MICRO as u64;
        let frac = abs % MICRO as u64;
        if frac == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let digits = format!("{frac:06}");
            write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// Why a text is not an amount of credits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseCreditsError {
    #[error("not a decimal number")]
    NotANumber,
    #[error("more than six decimals (credits are counted in millionths)")]
    TooPrecise,
    #[error("larger than a billion credits")]
    TooLarge,
}

impl std::str::FromStr for Credits {
    type Err = ParseCreditsError;

    /// A decimal with an optional sign and exponent (`12`, `-0.5`, `1.25e3`, as JSON writes
    /// numbers); no NaN, no infinity, no more than six decimals, at most [`MAX_MONEY`].
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (negative, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(at) => {
                let exponent: i32 = rest[at + 1..]
                    .parse()
                    .map_err(|_| ParseCreditsError::NotANumber)?;
                (&rest[..at], exponent)
            }
            None => (rest, 0),
        };
        let (whole, frac) = match mantissa.split_once('.') {
            Some((whole, frac)) => (whole, frac),
            None => (mantissa, ""),
        };
        let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && frac.is_empty()) || !digits_ok(whole) || !digits_ok(frac) {
            return Err(ParseCreditsError::NotANumber);
        }
        // The digits as one integer, and the power of ten to scale it by to make micro-credits.
        let digits = format!("{whole}{frac}");
        let digits = digits.trim_start_matches('0');
        let scale = i64::from(exponent) + 6 - frac.len() as i64;
        if digits.is_empty() {
            return Ok(Credits(0));
        }
        let mut value: i128 = 0;
        for b in digits.bytes() {
            value = value * 10 + i128::from(b - b'0');
            if value > i128::from(MAX_MONEY) * 1_000_000_000_000 {
                return Err(ParseCreditsError::TooLarge);
            }
        }
        let micro = if scale >= 0 {
            if scale > 18 {
                return Err(ParseCreditsError::TooLarge);
            }
            value.saturating_mul(10_i128.pow(scale as u32))
        } else {
            if -scale > 36 {
                return Err(ParseCreditsError::TooPrecise);
            }
            let divisor = 10_i128.pow((-scale) as u32);
            if value % divisor != 0 {
                return Err(ParseCreditsError::TooPrecise);
            }
            value / divisor
        };
        if micro > i128::from(MAX_MONEY) {
            return Err(ParseCreditsError::TooLarge);
        }
        let micro = micro as i64;
        Ok(Credits(if negative { -micro } else { micro }))
    }
}

impl Serialize for Credits {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.as_f64())
    }
}

impl<'de> Deserialize<'de> for Credits {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let text = match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::Number(number) => number.to_string(),
            serde_json::Value::String(text) => text,
            other => {
                return Err(D::Error::custom(format!(
                    "expected an amount of credits (a number or a decimal string), got {other}"
                )));
            }
        };
        text.parse()
            .map_err(|err| D::Error::custom(format!("`{text}` is not an amount of credits: {err}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<i64, ParseCreditsError> {
        text.parse::<Credits>().map(Credits::micro)
    }

    #[test]
    fn decimals_read_exactly() {
        assert_eq!(parse("12.5"), Ok(12_500_000));
        assert_eq!(parse("0.000001"), Ok(1));
        assert_eq!(parse("1e-6"), Ok(1));
        assert_eq!(parse("-0.3"), Ok(-300_000));
        assert_eq!(parse("0.1"), Ok(100_000));
        assert_eq!(parse("1.25e3"), Ok(1_250_000_000));
        assert_eq!(parse("1000000000"), Ok(MAX_MONEY));
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("000.000"), Ok(0));
        // Trailing zeros past the sixth decimal say nothing more.
        assert_eq!(parse("2.50000000"), Ok(2_500_000));
    }

    #[test]
    fn what_is_not_an_amount_is_refused() {
        for text in [
            "", "-", ".", "abc", "NaN", "inf", "1.2.3", "1e", "0x10", "1 2", "--1",
        ] {
            assert_eq!(parse(text), Err(ParseCreditsError::NotANumber), "{text}");
        }
        assert_eq!(parse("0.0000001"), Err(ParseCreditsError::TooPrecise));
        assert_eq!(parse("1e-7"), Err(ParseCreditsError::TooPrecise));
        assert_eq!(parse("1000000000.000001"), Err(ParseCreditsError::TooLarge));
        assert_eq!(parse("1e300"), Err(ParseCreditsError::TooLarge));
        assert_eq!(
            parse("99999999999999999999999999999999999999999"),
            Err(ParseCreditsError::TooLarge)
        );
        assert_eq!(parse("1e-300"), Err(ParseCreditsError::TooPrecise));
    }

    #[test]
    fn json_numbers_and_strings_both_read() {
        let from = |json: &str| serde_json::from_str::<Credits>(json).map(Credits::micro);
        assert_eq!(from("0.1").unwrap(), 100_000);
        assert_eq!(from("\"0.1\"").unwrap(), 100_000);
        assert_eq!(from("7").unwrap(), 7_000_000);
        assert_eq!(from("123456789.123456").unwrap(), 123_456_789_123_456);
        assert!(from("1e400").is_err(), "serde_json refuses it, or we do");
        assert!(from("\"NaN\"").is_err());
        assert!(from("null").is_err());
        assert!(from("[1]").is_err());
    }

    #[test]
    fn shown_as_decimals_that_read_back_the_same() {
        for micro in [
            0,
            1,
            -1,
            100_000,
            12_500_000,
            123_456_789_123_456,
            MAX_MONEY,
            -MAX_MONEY,
        ] {
            let json = serde_json::to_string(&Credits(micro)).unwrap();
            assert_eq!(
                serde_json::from_str::<Credits>(&json).unwrap().micro(),
                micro,
                "{json}"
            );
            let text = Credits(micro).to_string();
            assert_eq!(text.parse::<Credits>().unwrap().micro(), micro, "{text}");
        }
        assert_eq!(Credits(12_500_000).to_string(), "12.5");
        assert_eq!(Credits(-1).to_string(), "-0.000001");
    }

    #[test]
    fn charges_round_to_the_nearest_micro_credit() {
        assert_eq!(Credits::from_charge(0.0000011).micro(), 1);
        assert_eq!(Credits::from_charge(0.0000016).micro(), 2);
        assert_eq!(Credits::from_charge(0.3).micro(), 300_000);
        assert_eq!(Credits::from_charge(0.5).micro(), 500_000);
        assert_eq!(Credits::from_charge(f64::NAN).micro(), 0);
        assert_eq!(Credits::from_charge(-3.0).micro(), 0);
        assert_eq!(Credits::from_charge(f64::INFINITY).micro(), 0);
        assert_eq!(Credits::from_charge(1e300).micro(), MAX_MONEY);
    }
}
