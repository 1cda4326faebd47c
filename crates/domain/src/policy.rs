//! Per-city policy (R12, R22, R23, R24, R27, R29, R30): configuration, not code. Shanghai's file,
//! `deploy/city.toml`, is the default; a deployment loads its own ([`CityPolicy::from_toml`]).

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, UtcOffset, Weekday};

use crate::citizen_id::CitizenId;
use crate::rejection::Rejection;

/// The default city file, `deploy/city.toml` (Shanghai).
pub const SHANGHAI_CITY_FILE: &str = include_str!("../../../deploy/city.toml");

/// How a new card's social PIN starts (R29).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitialSocialPin {
    /// The same PIN for everyone, e.g. `123456`.
    Fixed(String),
    /// The last six characters of the holder's ID number.
    LastSixOfCitizenId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CityPolicy {
    pub city: String,
    /// The city's offset from UTC, for working hours and calendar days.
    pub utc_offset_hours: i8,
    /// R12: a replacement after loss or damage costs this much (the first card is free).
    pub replacement_fee_fen: i64,
    /// R22: days after collection without a financial activation before the social function is loss-locked.
    pub auto_lock_days_without_financial: u32,
    /// R23: years after the 16th birthday a minor card stays usable unless exchanged.
    pub minor_exchange_years_after_16: u32,
    /// R24: how long a temporary card is valid.
    pub temporary_card_validity_days: u32,
    /// R27: a temporary loss lapses on the social side after this many days unless made written (None: never).
    pub temporary_loss_expiry_days_social: Option<u32>,
    /// R29.
    pub initial_social_pin: InitialSocialPin,
    /// R30: wrong social-PIN entries that lock the card.
    pub social_pin_max_wrong: u32,
    /// Working hours for manual operations (12333 operator), local time, Monday to Friday.
    pub working_hours: (u8, u8),
    /// R9: children younger than this are preschool and their cards carry no photo.
    pub preschool_below_age: u32,
    /// Holders younger than this get a minor card (R23).
    pub minor_below_age: u32,
}

impl CityPolicy {
    pub fn shanghai() -> Self {
        Self {
            city: "Shanghai".into(),
            utc_offset_hours: 8,
            replacement_fee_fen: 2_000,
            auto_lock_days_without_financial: 300,
            minor_exchange_years_after_16: 3,
            temporary_card_validity_days: 180,
            temporary_loss_expiry_days_social: None,
            initial_social_pin: InitialSocialPin::Fixed("123456".into()),
            social_pin_max_wrong: 6,
            working_hours: (9, 17),
            preschool_below_age: 6,
            minor_below_age: 16,
        }
    }

    /// Parses and checks a city file (`deploy/city.toml`): unknown keys and out-of-range values are refused
    /// with `CITY_POLICY_INVALID`, naming the key.
    pub fn from_toml(text: &str) -> Result<Self, Rejection> {
        let f: CityFile = toml::from_str(text).map_err(|e| bad(format!("city file: {e}")))?;
        let initial_social_pin = match f.initial_social_pin.as_str() {
            "last-six-of-citizen-id" => InitialSocialPin::LastSixOfCitizenId,
            pin if pin.len() == 6 && pin.bytes().all(|b| b.is_ascii_digit()) => InitialSocialPin::Fixed(pin.into()),
            other => {
                return Err(bad(format!(
                    "initial_social_pin must be six digits or \"last-six-of-citizen-id\", not {other:?}"
                )));
            }
        };
        let checks: [(bool, &str); 10] = [
            (!f.city.trim().is_empty(), "city must not be empty"),
            ((-12..=14).contains(&f.utc_offset_hours), "utc_offset_hours must be between -12 and 14"),
            (f.replacement_fee_fen >= 0, "replacement_fee_fen must not be negative"),
            (f.auto_lock_days_without_financial >= 1, "auto_lock_days_without_financial must be at least 1"),
            (f.minor_exchange_years_after_16 <= 100, "minor_exchange_years_after_16 must be at most 100"),
            ((1..=3660).contains(&f.temporary_card_validity_days), "temporary_card_validity_days must be 1 to 3660"),
            (f.temporary_loss_expiry_days_social != Some(0), "temporary_loss_expiry_days_social must be at least 1"),
            (f.social_pin_max_wrong >= 1, "social_pin_max_wrong must be at least 1"),
            (
                f.working_hours.open < f.working_hours.close && f.working_hours.close <= 24,
                "working_hours: open must come before close, and close be at most 24",
            ),
            (
                f.preschool_below_age <= f.minor_below_age && (1..=18).contains(&f.minor_below_age),
                "minor_below_age must be 1 to 18 and not below preschool_below_age",
            ),
        ];
        if let Some((_, why)) = checks.iter().find(|(ok, _)| !ok) {
            return Err(bad(format!("city file: {why}")));
        }
        Ok(Self {
            city: f.city,
            utc_offset_hours: f.utc_offset_hours,
            replacement_fee_fen: f.replacement_fee_fen,
            auto_lock_days_without_financial: f.auto_lock_days_without_financial,
            minor_exchange_years_after_16: f.minor_exchange_years_after_16,
            temporary_card_validity_days: f.temporary_card_validity_days,
            temporary_loss_expiry_days_social: f.temporary_loss_expiry_days_social,
            initial_social_pin,
            social_pin_max_wrong: f.social_pin_max_wrong,
            working_hours: (f.working_hours.open, f.working_hours.close),
            preschool_below_age: f.preschool_below_age,
            minor_below_age: f.minor_below_age,
        })
    }

    pub fn offset(&self) -> UtcOffset {
        UtcOffset::from_hms(self.utc_offset_hours, 0, 0).unwrap_or(UtcOffset::UTC)
    }

    /// The local calendar day of an instant.
    pub fn local_date(&self, at: OffsetDateTime) -> time::Date {
        at.to_offset(self.offset()).date()
    }

    pub fn within_working_hours(&self, at: OffsetDateTime) -> bool {
        let local = at.to_offset(self.offset());
        let weekday = !matches!(local.weekday(), Weekday::Saturday | Weekday::Sunday);
        let (start, end) = self.working_hours;
        weekday && (start..end).contains(&local.hour())
    }

    pub fn initial_social_pin(&self, holder: &CitizenId) -> String {
        match &self.initial_social_pin {
            InitialSocialPin::Fixed(pin) => pin.clone(),
            InitialSocialPin::LastSixOfCitizenId => holder.last_six().replace('X', "0"),
        }
    }
}

fn bad(message: String) -> Rejection {
    Rejection::invalid("city_policy", "CITY_POLICY_INVALID", message)
}

/// The city file as written (`deploy/city.toml`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CityFile {
    city: String,
    utc_offset_hours: i8,
    replacement_fee_fen: i64,
    auto_lock_days_without_financial: u32,
    minor_exchange_years_after_16: u32,
    temporary_card_validity_days: u32,
    #[serde(default)]
    temporary_loss_expiry_days_social: Option<u32>,
    initial_social_pin: String,
    social_pin_max_wrong: u32,
    working_hours: Hours,
    preschool_below_age: u32,
    minor_below_age: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Hours {
    open: u8,
    close: u8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn working_hours_are_local_weekdays() {
        let p = CityPolicy::shanghai();
        // Monday 2026-11-23 10:00 in Shanghai is 02:00 UTC.
        assert!(p.within_working_hours(datetime!(2026-11-23 02:00 UTC)));
        assert!(!p.within_working_hours(datetime!(2026-11-23 10:00 UTC)));
        // Saturday.
        assert!(!p.within_working_hours(datetime!(2026-11-28 02:00 UTC)));
    }

    #[test]
    fn the_city_file_is_shanghai_and_bad_values_are_refused_by_name() {
        assert_eq!(CityPolicy::from_toml(SHANGHAI_CITY_FILE).unwrap(), CityPolicy::shanghai());
        let shenzhen = SHANGHAI_CITY_FILE
            .replace("# temporary_loss_expiry_days_social = 10", "temporary_loss_expiry_days_social = 10")
            .replace("\"123456\"", "\"last-six-of-citizen-id\"");
        let p = CityPolicy::from_toml(&shenzhen).unwrap();
        assert_eq!(p.temporary_loss_expiry_days_social, Some(10));
        assert_eq!(p.initial_social_pin, InitialSocialPin::LastSixOfCitizenId);
        for (from, to, names) in [
            ("auto_lock_days_without_financial = 300", "auto_lock_days_without_financial = 0", "auto_lock_days"),
            ("auto_lock_days_without_financial = 300", "auto_lock_days_without_financial = -3", "auto_lock_days"),
            ("# temporary_loss_expiry_days_social = 10", "temporary_loss_expiry_days_social = 0", "temporary_loss"),
            ("\"123456\"", "\"12345\"", "initial_social_pin"),
            ("close = 17", "close = 8", "working_hours"),
            ("minor_below_age = 16", "minor_age = 16", "minor_age"),
            ("utc_offset_hours = 8", "utc_offset_hours = 20", "utc_offset_hours"),
        ] {
            let e = CityPolicy::from_toml(&SHANGHAI_CITY_FILE.replace(from, to)).unwrap_err();
            assert_eq!(e.reason, "CITY_POLICY_INVALID", "{to}");
            assert!(e.message.contains(names), "{to}: {}", e.message);
        }
    }
}
