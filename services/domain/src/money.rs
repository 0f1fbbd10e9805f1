//! Exact money.
//!
//! Amounts are `rust_decimal::Decimal` in Rust and `NUMERIC(30,8)` in
//! PostgreSQL; on the wire they are decimal strings. No float ever touches them.

use std::fmt;

use rust_decimal::Decimal;

/// Fractional digits the ledger keeps.
pub const SCALE: u32 = 8;

/// The largest single movement accepted: one trillion. It keeps every sum the
/// system computes (balances, round totals) well inside both `NUMERIC(30,8)`
/// and `Decimal`'s 96-bit mantissa.
const MAX_INTEGER_DIGITS: usize = 13;

/// A positive amount of money with at most eight fractional digits and at most
/// [`Amount::MAX`]: every stake, deposit, withdrawal, refund and payout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(Decimal);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("is required")]
    Empty,
    #[error("must be a plain decimal number such as \"10\" or \"0.25\"")]
    Malformed,
    #[error("must have at most 8 fractional digits")]
    TooPrecise,
    #[error("must be greater than zero")]
    NotPositive,
    #[error("must not exceed 1000000000000")]
    TooLarge,
    #[error("must not exceed 500000000000: a winning bet is paid twice its stake")]
    StakeTooLarge,
}

impl Amount {
    /// 10^12.
    pub const MAX: Decimal = Decimal::from_parts(3_567_587_328, 232, 0, false, 0);

    /// Parses the wire form: ASCII digits, optionally a point and 1 to 8 more
    /// digits. No sign, exponent, spaces, separators or non-ASCII digits.
    pub fn parse(text: &str) -> Result<Self, AmountError> {
        if text.is_empty() {
            return Err(AmountError::Empty);
        }
        let (int_part, frac_part) = match text.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (text, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int_part) || frac_part.is_some_and(|f| !all_digits(f)) {
            return Err(AmountError::Malformed);
        }
        if frac_part.is_some_and(|f| f.len() > SCALE as usize) {
            return Err(AmountError::TooPrecise);
        }
        // Leading zeros do not make a number larger.
        if int_part.trim_start_matches('0').len() > MAX_INTEGER_DIGITS {
            return Err(AmountError::TooLarge);
        }
        let value: Decimal = text.parse().map_err(|_| AmountError::Malformed)?;
        Self::try_from_decimal(value)
    }

    /// Checks a value that came from storage or arithmetic.
    pub fn try_from_decimal(value: Decimal) -> Result<Self, AmountError> {
        if value.scale() > SCALE && value.normalize().scale() > SCALE {
            return Err(AmountError::TooPrecise);
        }
        if value <= Decimal::ZERO {
            return Err(AmountError::NotPositive);
        }
        if value > Self::MAX {
            return Err(AmountError::TooLarge);
        }
        Ok(Self(value.normalize()))
    }

    pub fn as_decimal(&self) -> Decimal {
        self.0
    }
}

impl TryFrom<Decimal> for Amount {
    type Error = AmountError;

    /// As [`Amount::try_from_decimal`]: for values read from storage.
    fn try_from(value: Decimal) -> Result<Self, AmountError> {
        Self::try_from_decimal(value)
    }
}

/// A bet's stake: an [`Amount`] of at most [`Stake::MAX`], half of
/// [`Amount::MAX`], so that the payout of a winning bet (twice the stake) is
/// always an amount the wallet can pay. Every accepted bet can be paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stake(Amount);

impl Stake {
    /// 5 × 10^11.
    pub const MAX: Decimal = Decimal::from_parts(1_783_793_664, 116, 0, false, 0);

    /// Parses the wire form, as [`Amount::parse`] does, and caps it.
    pub fn parse(text: &str) -> Result<Self, AmountError> {
        Self::new(Amount::parse(text)?)
    }

    pub fn new(amount: Amount) -> Result<Self, AmountError> {
        if amount.as_decimal() > Self::MAX {
            return Err(AmountError::StakeTooLarge);
        }
        Ok(Self(amount))
    }

    pub fn amount(&self) -> Amount {
        self.0
    }

    pub fn as_decimal(&self) -> Decimal {
        self.0.as_decimal()
    }

    /// What a winning bet is paid: twice its stake, never more than
    /// [`Amount::MAX`].
    pub fn payout(&self) -> Amount {
        Amount(self.0.0 * Decimal::TWO)
    }
}

// The payout of the largest stake is the largest amount, no more.
const _: () = assert!(Stake::MAX.mantissa() * 2 == Amount::MAX.mantissa());

impl fmt::Display for Stake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_money(self.0))
    }
}

/// The canonical wire form of any money value (balances included): no
/// exponent, no trailing fractional zeros, "0" for zero.
pub fn format_money(value: Decimal) -> String {
    let normalized = value.normalize();
    if normalized.is_zero() {
        // `normalize` keeps the sign of a negative zero.
        return "0".to_owned();
    }
    normalized.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_is_one_trillion() {
        assert_eq!(Amount::MAX, Decimal::from(1_000_000_000_000_i64));
    }

    #[test]
    fn stakes_are_capped_at_half_the_largest_amount() {
        assert_eq!(Stake::MAX, Decimal::from(500_000_000_000_i64));
        let max = Stake::parse("500000000000").expect("the largest stake");
        assert_eq!(max.payout().as_decimal(), Amount::MAX);
        assert_eq!(
            Stake::parse("500000000000.00000001"),
            Err(AmountError::StakeTooLarge)
        );
        assert_eq!(
            Stake::parse("1000000000000"),
            Err(AmountError::StakeTooLarge)
        );
        assert_eq!(Stake::parse("0"), Err(AmountError::NotPositive));
        assert_eq!(
            Stake::parse("0.25").map(|s| s.payout().to_string()),
            Ok("0.5".to_owned())
        );
    }

    #[test]
    fn accepts_plain_decimals() {
        for (text, canonical) in [
            ("1", "1"),
            ("10.50", "10.5"),
            ("0.00000001", "0.00000001"),
            ("007", "7"),
            ("1000000000000", "1000000000000"),
            ("999999999999.99999999", "999999999999.99999999"),
        ] {
            let amount = Amount::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(amount.to_string(), canonical, "{text}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        let cases = [
            ("", AmountError::Empty),
            ("0", AmountError::NotPositive),
            ("0.00000000", AmountError::NotPositive),
            ("-1", AmountError::Malformed),
            ("-0", AmountError::Malformed),
            ("+1", AmountError::Malformed),
            ("1e3", AmountError::Malformed),
            ("NaN", AmountError::Malformed),
            ("Infinity", AmountError::Malformed),
            ("0.000000001", AmountError::TooPrecise),
            (" 1", AmountError::Malformed),
            ("1 ", AmountError::Malformed),
            ("1,000", AmountError::Malformed),
            ("١٢٣", AmountError::Malformed),
            ("99999999999999999999999999999", AmountError::TooLarge),
            ("1000000000000.00000001", AmountError::TooLarge),
            (".5", AmountError::Malformed),
            ("5.", AmountError::Malformed),
            ("1.2.3", AmountError::Malformed),
            ("0x10", AmountError::Malformed),
        ];
        for (text, expected) in cases {
            assert_eq!(Amount::parse(text), Err(expected), "{text:?}");
        }
    }

    #[test]
    fn stored_amounts_decode_as_parsed_ones() {
        assert_eq!(
            Amount::try_from(Decimal::new(105_000, 4)),
            Amount::parse("10.5")
        );
        assert_eq!(
            Amount::try_from(Decimal::ZERO),
            Err(AmountError::NotPositive)
        );
        assert_eq!(
            Amount::try_from(Decimal::new(-1, 0)),
            Err(AmountError::NotPositive)
        );
        assert_eq!(
            Amount::try_from(Decimal::new(1, 9)),
            Err(AmountError::TooPrecise)
        );
    }

    #[test]
    fn formats_money_canonically() {
        assert_eq!(format_money(Decimal::new(1050, 2)), "10.5");
        assert_eq!(format_money(Decimal::new(0, 8)), "0");
        assert_eq!(format_money(Decimal::new(-0, 3)), "0");
        assert_eq!(format_money(Decimal::new(-25, 1)), "-2.5");
    }
}
