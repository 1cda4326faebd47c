//! Card numbers (社会保障卡卡号, R5) and the bank account numbers carried on a card (R4).

use std::fmt;

use crate::rejection::Rejection;

/// The social security card number the registry issues: one uppercase series letter, seven digits
/// of sequence and a Luhn check digit over those seven (e.g. `A00000018`). The check digit is this
/// registry's own, so that a mistyped number at a window or on a hotline is caught before any lookup.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CardNumber(String);

impl CardNumber {
    pub fn parse(raw: &str) -> Result<Self, Rejection> {
        let field = "card_number";
        let b = raw.as_bytes();
        if b.len() != 9 || !b[0].is_ascii_uppercase() || !b[1..].iter().all(u8::is_ascii_digit) {
            return Err(Rejection::invalid(
                field,
                "CARD_NUMBER_FORMAT",
                "a card number is one uppercase letter and eight digits",
            ));
        }
        if !luhn_valid(&raw[1..]) {
            return Err(Rejection::invalid(
                field,
                "CARD_NUMBER_CHECK_DIGIT",
                "the card number's check digit does not match",
            ));
        }
        Ok(Self(raw.to_string()))
    }

    /// The number in `series` with sequence `seq` (modulo 10^7), check digit appended.
    pub fn issue(series: char, seq: u64) -> Self {
        let series = if series.is_ascii_uppercase() { series } else { 'A' };
        let body = format!("{:07}", seq % 10_000_000);
        let check = luhn_check_digit(&body);
        Self(format!("{series}{body}{check}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CardNumber {
    type Error = Rejection;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<CardNumber> for String {
    fn from(c: CardNumber) -> Self {
        c.0
    }
}

impl fmt::Debug for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardNumber({})", self.0)
    }
}

impl fmt::Display for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A UnionPay debit account number (PAN): 16 to 19 digits, Luhn-valid. Printed masked
/// (`621226*********0123`: the BIN and the last four).
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BankAccountNumber(String);

impl BankAccountNumber {
    pub fn parse(raw: &str) -> Result<Self, Rejection> {
        let field = "account_number";
        if !(16..=19).contains(&raw.len()) || !raw.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Rejection::invalid(
                field,
                "ACCOUNT_NUMBER_FORMAT",
                "a bank account number has 16 to 19 ASCII digits",
            ));
        }
        if !luhn_valid(raw) {
            return Err(Rejection::invalid(
                field,
                "ACCOUNT_NUMBER_CHECK_DIGIT",
                "the bank account number fails the Luhn check",
            ));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn masked(&self) -> String {
        let n = self.0.len();
        format!("{}{}{}", &self.0[..6], "*".repeat(n - 10), &self.0[n - 4..])
    }

    pub fn starts_with(&self, prefix: &str) -> bool {
        self.0.starts_with(prefix)
    }
}

impl TryFrom<String> for BankAccountNumber {
    type Error = Rejection;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<BankAccountNumber> for String {
    fn from(c: BankAccountNumber) -> Self {
        c.0
    }
}

impl fmt::Debug for BankAccountNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BankAccountNumber({})", self.masked())
    }
}

impl fmt::Display for BankAccountNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// True when the digit string passes the Luhn (mod 10) check.
pub fn luhn_valid(digits: &str) -> bool {
    !digits.is_empty() && luhn_sum(digits.bytes().rev(), false).is_multiple_of(10)
}

/// The Luhn check digit to append to `body`.
pub fn luhn_check_digit(body: &str) -> char {
    let sum = luhn_sum(body.bytes().rev(), true);
    char::from(b'0' + ((10 - sum % 10) % 10) as u8)
}

fn luhn_sum(reversed: impl Iterator<Item = u8>, double_first: bool) -> u32 {
    reversed
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if (i % 2 == 0) == double_first {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn luhn_known_values() {
        assert!(luhn_valid("4111111111111111"));
        assert!(luhn_valid("79927398713"));
        assert!(!luhn_valid("79927398710"));
        assert_eq!(luhn_check_digit("7992739871"), '3');
    }

    #[test]
    fn card_numbers_round_trip_and_reject_typos() {
        let n = CardNumber::issue('A', 1);
        assert_eq!(n.as_str(), "A00000018");
        assert_eq!(CardNumber::parse("A00000018").unwrap(), n);
        assert_eq!(CardNumber::parse("A00000019").unwrap_err().reason, "CARD_NUMBER_CHECK_DIGIT");
        assert_eq!(CardNumber::parse("a00000018").unwrap_err().reason, "CARD_NUMBER_FORMAT");
        assert_eq!(CardNumber::parse("A0000001").unwrap_err().reason, "CARD_NUMBER_FORMAT");
    }

    #[test]
    fn account_numbers_mask() {
        let body = "621226000000000123";
        let a = BankAccountNumber::parse(&format!("{body}{}", luhn_check_digit(body))).unwrap();
        assert_eq!(a.masked(), format!("621226*********123{}", luhn_check_digit(body)));
        assert_eq!(BankAccountNumber::parse("621226000000000").unwrap_err().reason, "ACCOUNT_NUMBER_FORMAT");
    }

    proptest! {
        #[test]
        fn issued_numbers_parse(seq in 0u64..10_000_000, series in proptest::char::range('A', 'Z')) {
            let n = CardNumber::issue(series, seq);
            prop_assert_eq!(CardNumber::parse(n.as_str()).unwrap(), n);
        }

        #[test]
        fn single_digit_substitutions_fail_luhn(body in "[0-9]{15,18}", pos in 0usize..16, d in 0u8..10) {
            let full = format!("{body}{}", luhn_check_digit(&body));
            let mut b = full.into_bytes();
            let pos = pos % b.len();
            prop_assume!(b[pos] != b'0' + d);
            b[pos] = b'0' + d;
            prop_assert!(!luhn_valid(std::str::from_utf8(&b).unwrap()));
        }
    }
}
