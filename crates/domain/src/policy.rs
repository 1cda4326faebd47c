//! Per-city policy (R12, R22, R23, R24, R27, R29, R30), Shanghai by default.

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, UtcOffset, Weekday};

use crate::citizen_id::CitizenId;

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
}
