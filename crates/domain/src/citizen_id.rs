//! R1: the 18-character citizen ID number (GB 11643-1999) that is also the social security number.

use std::fmt;
use std::str::FromStr;

use time::{Date, Month};

use crate::rejection::Rejection;

const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
const CHECK_CHARS: [u8; 11] = *b"10X98765432";

/// Province-level region codes (GB/T 2260 first two digits; 71 Taiwan, 81 Hong Kong, 82 Macao,
/// 83 for residence permits of Taiwan residents).
const PROVINCES: [(u8, &str); 35] = [
    (11, "Beijing"),
    (12, "Tianjin"),
    (13, "Hebei"),
    (14, "Shanxi"),
    (15, "Inner Mongolia"),
    (21, "Liaoning"),
    (22, "Jilin"),
    (23, "Heilongjiang"),
    (31, "Shanghai"),
    (32, "Jiangsu"),
    (33, "Zhejiang"),
    (34, "Anhui"),
    (35, "Fujian"),
    (36, "Jiangxi"),
    (37, "Shandong"),
    (41, "Henan"),
    (42, "Hubei"),
    (43, "Hunan"),
    (44, "Guangdong"),
    (45, "Guangxi"),
    (46, "Hainan"),
    (50, "Chongqing"),
    (51, "Sichuan"),
    (52, "Guizhou"),
    (53, "Yunnan"),
    (54, "Tibet"),
    (61, "Shaanxi"),
    (62, "Gansu"),
    (63, "Qinghai"),
    (64, "Ningxia"),
    (65, "Xinjiang"),
    (71, "Taiwan"),
    (81, "Hong Kong"),
    (82, "Macao"),
    (83, "Taiwan residents (permit)"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Gender {
    Male,
    Female,
}

/// A validated citizen ID number. `Debug` and `Display` mask it (`310***********1234`); the full
/// number is only reachable through [`CitizenId::expose`], which makes every use greppable.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CitizenId {
    digits: [u8; 18],
    birth_date: Date,
}

impl CitizenId {
    /// Validates `raw` against R1 as of `today` (a birth date may not lie in the future). A lowercase
    /// `x` check character is accepted and normalised to `X`.
    pub fn parse(raw: &str, today: Date) -> Result<Self, Rejection> {
        let field = "citizen_id";
        let bytes = raw.as_bytes();
        if bytes.len() != 18 || raw.chars().count() != 18 {
            return Err(Rejection::invalid(
                field,
                "CITIZEN_ID_LENGTH",
                format!("a citizen ID has 18 ASCII characters, got {}", raw.chars().count()),
            ));
        }
        let mut digits = [0u8; 18];
        for (i, &b) in bytes.iter().enumerate() {
            digits[i] = match b {
                b'0'..=b'9' => b,
                b'X' | b'x' if i == 17 => b'X',
                _ => {
                    return Err(Rejection::invalid(
                        field,
                        "CITIZEN_ID_CHARACTER",
                        format!(
                            "character {} of the citizen ID must be an ASCII digit{}",
                            i + 1,
                            if i == 17 { " or X" } else { "" }
                        ),
                    ));
                }
            };
        }
        if check_char(&digits) != digits[17] {
            return Err(Rejection::invalid(
                field,
                "CITIZEN_ID_CHECK_DIGIT",
                "the citizen ID's check character does not match (ISO 7064 MOD 11-2)",
            ));
        }
        let province = (digits[0] - b'0') * 10 + (digits[1] - b'0');
        if province_name(province).is_none() {
            return Err(Rejection::invalid(
                field,
                "CITIZEN_ID_REGION",
                format!("region code starts with {province:02}, which is no province"),
            ));
        }
        let number =
            |range: std::ops::Range<usize>| digits[range].iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
        if number(2..4) == 0 {
            return Err(Rejection::invalid(field, "CITIZEN_ID_REGION", "the region code's prefecture part is 00"));
        }
        let year = number(6..10) as i32;
        let birth_date = u8::try_from(number(10..12))
            .ok()
            .and_then(|m| Month::try_from(m).ok())
            .and_then(|month| Date::from_calendar_date(year, month, u8::try_from(number(12..14)).ok()?).ok())
            .filter(|_| year >= 1900)
            .ok_or_else(|| {
                Rejection::invalid(
                    field,
                    "CITIZEN_ID_BIRTH_DATE",
                    "digits 7-14 are not a real birth date (YYYYMMDD, from 1900)",
                )
            })?;
        if birth_date > today {
            return Err(Rejection::invalid(
                field,
                "CITIZEN_ID_BIRTH_DATE_IN_FUTURE",
                "the birth date in the citizen ID lies in the future",
            ));
        }
        Ok(Self { digits, birth_date })
    }

    /// The full number. Call only where the whole number is needed (storage, the bank's own systems).
    pub fn expose(&self) -> &str {
        // Every byte is ASCII by construction.
        std::str::from_utf8(&self.digits).unwrap_or_default()
    }

    pub fn masked(&self) -> String {
        let s = self.expose();
        format!("{}***********{}", &s[..3], &s[14..])
    }

    pub fn region_code(&self) -> &str {
        &self.expose()[..6]
    }

    pub fn province(&self) -> &'static str {
        province_name((self.digits[0] - b'0') * 10 + (self.digits[1] - b'0')).unwrap_or("unknown")
    }

    pub fn birth_date(&self) -> Date {
        self.birth_date
    }

    pub fn gender(&self) -> Gender {
        if (self.digits[16] - b'0') % 2 == 1 { Gender::Male } else { Gender::Female }
    }

    /// Age in whole years on `day`.
    pub fn age_on(&self, day: Date) -> u32 {
        let b = self.birth_date;
        let mut age = day.year() - b.year();
        if (day.month() as u8, day.day()) < (b.month() as u8, b.day()) {
            age -= 1;
        }
        u32::try_from(age).unwrap_or(0)
    }

    /// The last six characters (some cities' initial social PIN, R29).
    pub fn last_six(&self) -> &str {
        &self.expose()[12..]
    }
}

/// The ISO 7064 MOD 11-2 check character of the first 17 digits.
pub fn check_char(digits: &[u8]) -> u8 {
    let sum: u32 = digits.iter().take(17).zip(WEIGHTS).map(|(d, w)| u32::from(d - b'0') * w).sum();
    CHECK_CHARS[(sum % 11) as usize]
}

fn province_name(code: u8) -> Option<&'static str> {
    PROVINCES.iter().find(|(c, _)| *c == code).map(|(_, n)| *n)
}

impl fmt::Debug for CitizenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CitizenId({})", self.masked())
    }
}

impl fmt::Display for CitizenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl serde::Serialize for CitizenId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

impl<'de> serde::Deserialize<'de> for CitizenId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(|e: Rejection| serde::de::Error::custom(e.reason))
    }
}

/// Parses as of the far future, i.e. without the "not in the future" check; for stored, already
/// validated numbers only.
impl FromStr for CitizenId {
    type Err = Rejection;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, Date::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::date;

    const TODAY: Date = date!(2026 - 11 - 23);

    fn with_check(first17: &str) -> String {
        let mut s = first17.to_string();
        s.push(check_char(first17.as_bytes()) as char);
        s
    }

    #[test]
    fn accepts_a_valid_number_and_derives_its_facts() {
        let raw = with_check("31010519491231002");
        let id = CitizenId::parse(&raw, TODAY).unwrap();
        assert_eq!(id.birth_date(), date!(1949 - 12 - 31));
        assert_eq!(id.gender(), Gender::Female);
        assert_eq!(id.region_code(), "310105");
        assert_eq!(id.province(), "Shanghai");
        assert_eq!(id.age_on(TODAY), 76);
    }

    #[test]
    fn known_example_with_x_check_character() {
        // 11010519491231002X is the standard's worked example.
        let id = CitizenId::parse("11010519491231002X", TODAY).unwrap();
        assert_eq!(id.expose(), "11010519491231002X");
        assert_eq!(CitizenId::parse("11010519491231002x", TODAY).unwrap().expose(), "11010519491231002X");
    }

    #[test]
    fn masks_in_debug_and_display() {
        let id = CitizenId::parse("11010519491231002X", TODAY).unwrap();
        assert_eq!(id.to_string(), "110***********002X");
        assert!(!format!("{id:?}").contains("19491231"));
    }

    #[test]
    fn rejects_each_malformation_with_its_reason() {
        let reason = |s: &str| CitizenId::parse(s, TODAY).unwrap_err().reason;
        assert_eq!(reason("1101051949123100"), "CITIZEN_ID_LENGTH");
        assert_eq!(reason("11010519491231002Y"), "CITIZEN_ID_CHARACTER");
        assert_eq!(reason("１1010519491231002X"), "CITIZEN_ID_LENGTH");
        assert_eq!(reason("110105194912310021"), "CITIZEN_ID_CHECK_DIGIT");
        assert_eq!(reason(&with_check("99010519491231002")), "CITIZEN_ID_REGION");
        assert_eq!(reason(&with_check("31000019491231002")), "CITIZEN_ID_REGION");
        assert_eq!(reason(&with_check("31010519490231002")), "CITIZEN_ID_BIRTH_DATE");
        assert_eq!(reason(&with_check("31010520230229002")), "CITIZEN_ID_BIRTH_DATE");
        assert_eq!(reason(&with_check("31010520301231002")), "CITIZEN_ID_BIRTH_DATE_IN_FUTURE");
        assert_eq!(reason(&with_check("31010520261124002")), "CITIZEN_ID_BIRTH_DATE_IN_FUTURE");
        assert!(CitizenId::parse(&with_check("31010520261123002"), TODAY).is_ok());
    }

    /// Valid IDs: a real province, a prefecture 01-99, a birth date 1900..today, any sequence.
    pub(crate) fn valid_id() -> impl Strategy<Value = String> {
        let provinces: Vec<u8> = PROVINCES.iter().map(|(c, _)| *c).collect();
        (
            proptest::sample::select(provinces),
            1u32..100,
            0u32..100,
            0i64..(TODAY - date!(1900 - 01 - 01)).whole_days(),
            0u32..1000,
        )
            .prop_map(|(p, pref, county, days, seq)| {
                let birth = date!(1900 - 01 - 01) + time::Duration::days(days);
                let first17 = format!(
                    "{p:02}{pref:02}{county:02}{:04}{:02}{:02}{seq:03}",
                    birth.year(),
                    birth.month() as u8,
                    birth.day()
                );
                with_check(&first17)
            })
    }

    proptest! {
        #[test]
        fn generated_ids_are_valid(raw in valid_id()) {
            prop_assert!(CitizenId::parse(&raw, TODAY).is_ok());
        }

        #[test]
        fn every_single_substitution_is_rejected(raw in valid_id(), pos in 0usize..18) {
            let bytes = raw.as_bytes();
            for c in b"0123456789X" {
                if *c == bytes[pos] { continue; }
                let mut changed = bytes.to_vec();
                changed[pos] = *c;
                let changed = String::from_utf8(changed).unwrap();
                prop_assert!(CitizenId::parse(&changed, TODAY).is_err(), "{} accepted", changed);
            }
        }

        #[test]
        fn every_adjacent_swap_is_rejected(raw in valid_id(), pos in 0usize..17) {
            let mut swapped = raw.as_bytes().to_vec();
            prop_assume!(swapped[pos] != swapped[pos + 1]);
            swapped.swap(pos, pos + 1);
            let swapped = String::from_utf8(swapped).unwrap();
            prop_assert!(CitizenId::parse(&swapped, TODAY).is_err(), "{} accepted", swapped);
        }
    }
}
