//! Loss cases (R25-R27) as the loss coordinator runs them: which channel takes which loss, which side of
//! the card an unlock touches, the bank side's unlock rules, and a case's state from the state of its
//! sides. The social side's own rules stay on [`crate::Card`] (the registry applies them).

use serde::{Deserialize, Serialize};

use crate::channel::{Channel, Context};
use crate::rejection::Rejection;
use crate::state::LossKind;

/// R25: the channels that take each kind of loss report. The scheduler's automatic lock (R22) is not a
/// report.
pub fn report_channel_allowed(kind: LossKind, channel: Channel) -> Result<(), Rejection> {
    let allowed = match kind {
        LossKind::Written => matches!(channel, Channel::BankBranch | Channel::BureauWindow),
        LossKind::Temporary => {
            matches!(channel, Channel::Hotline | Channel::Hotline12333SelfService | Channel::Hotline12333Operator)
        }
        LossKind::Automatic => channel == Channel::Scheduler,
    };
    if allowed {
        Ok(())
    } else {
        Err(Rejection::invalid(
            "actor.channel",
            "CHANNEL_NOT_ALLOWED",
            format!("the {} channel does not take a {} loss (R25)", channel.as_str(), kind.as_str()),
        ))
    }
}

/// The two functions of a card, each locked and unlocked under its own rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    /// The bureau's side: the registry's social function.
    Social,
    /// The bank's side: the card's bank adapter.
    Financial,
}

/// R27: an unlock at the bureau lifts the social side; one at a branch of the card's bank, the financial.
pub fn unlock_side(channel: Channel) -> Result<Side, Rejection> {
    match channel {
        Channel::BureauWindow | Channel::CommunityPoint => Ok(Side::Social),
        Channel::BankBranch => Ok(Side::Financial),
        other => Err(Rejection::invalid(
            "actor.channel",
            "CHANNEL_NOT_ALLOWED",
            format!(
                "an unlock is done at a bureau window (social side) or a bank branch (financial side), not by {}",
                other.as_str()
            ),
        )),
    }
}

/// R27, the bank's side: the holder in person at a branch of the card's bank with an ID card; for a
/// written loss also with the original card, and never once a replacement has been ordered. A temporary
/// loss may also simply lapse (the bank's days).
pub fn financial_unlock_allowed(kind: LossKind, ctx: &Context, replacement_ordered: bool) -> Result<(), Rejection> {
    if ctx.channel != Channel::BankBranch {
        return Err(Rejection::invalid(
            "actor.channel",
            "CHANNEL_NOT_ALLOWED",
            "the financial function is unlocked at a branch of the card's bank (R27)",
        ));
    }
    if ctx.actor.operator_id.as_deref().is_none_or(str::is_empty) {
        return Err(Rejection::invalid("actor.operator_id", "TELLER_REQUIRED", "an unlock names the teller"));
    }
    if replacement_ordered {
        return Err(Rejection::precondition(
            "REPLACEMENT_ORDERED",
            "a replacement was ordered: the lost card stays cancelled for good (R28)",
        ));
    }
    ctx.require_holder_in_person(kind == LossKind::Written)
}

/// Where a case stands, derived from its sides; the closing outcomes are set once and never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaseState {
    /// Opened; no side confirmed yet.
    Locking,
    /// Every side the case needs is locked.
    Locked,
    /// Locked on one side only: the other side is still being retried (the dashboard's warning).
    OneSided,
    /// One side unlocked under its rules, the other still locked (e.g. the bureau unlocked, the bank not yet).
    Unlocking,
    Unlocked,
    /// A temporary loss lapsed on every side it had locked.
    Expired,
    /// A replacement was ordered (R28).
    Replaced,
    /// The registry refused the lock (the case never took effect).
    Rejected,
}

impl CaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            CaseState::Locking => "locking",
            CaseState::Locked => "locked",
            CaseState::OneSided => "one_sided",
            CaseState::Unlocking => "unlocking",
            CaseState::Unlocked => "unlocked",
            CaseState::Expired => "expired",
            CaseState::Replaced => "replaced",
            CaseState::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "locking" => CaseState::Locking,
            "locked" => CaseState::Locked,
            "one_sided" => CaseState::OneSided,
            "unlocking" => CaseState::Unlocking,
            "unlocked" => CaseState::Unlocked,
            "expired" => CaseState::Expired,
            "replaced" => CaseState::Replaced,
            "rejected" => CaseState::Rejected,
            _ => return None,
        })
    }

    pub fn is_closed(self) -> bool {
        matches!(self, CaseState::Unlocked | CaseState::Expired | CaseState::Replaced | CaseState::Rejected)
    }
}

/// How a side ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Release {
    Unlocked,
    Expired,
}

/// The sides of one case: what it needs, what is locked, what was released and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseSides {
    pub freezes_financial: bool,
    pub social_locked: bool,
    pub financial_frozen: bool,
    pub social_released: Option<Release>,
    pub financial_released: Option<Release>,
}

impl CaseSides {
    /// The state of an open case (a replaced or rejected case is closed by its owner, not derived).
    pub fn state(&self) -> CaseState {
        let social_done = self.social_released.is_some();
        let financial_done = !self.freezes_financial || self.financial_released.is_some();
        if social_done && financial_done {
            let expired = self.social_released == Some(Release::Expired)
                && (!self.freezes_financial || self.financial_released == Some(Release::Expired));
            return if expired { CaseState::Expired } else { CaseState::Unlocked };
        }
        if social_done || (self.freezes_financial && self.financial_released.is_some()) {
            return CaseState::Unlocking;
        }
        let financial_ok = !self.freezes_financial || self.financial_frozen;
        match (self.social_locked, financial_ok) {
            (true, true) => CaseState::Locked,
            (false, false) => CaseState::Locking,
            (true, false) => CaseState::OneSided,
            (false, true) if self.freezes_financial => CaseState::OneSided,
            (false, true) => CaseState::Locking,
        }
    }

    /// Whether a side still has to be confirmed (the coordinator keeps retrying until none has).
    pub fn needs_driving(&self) -> bool {
        (!self.social_locked && self.social_released.is_none())
            || (self.freezes_financial && !self.financial_frozen && self.financial_released.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sides(fin: bool, s: bool, f: bool) -> CaseSides {
        CaseSides {
            freezes_financial: fin,
            social_locked: s,
            financial_frozen: f,
            social_released: None,
            financial_released: None,
        }
    }

    #[test]
    fn a_case_is_locked_only_when_every_side_it_needs_is() {
        assert_eq!(sides(true, false, false).state(), CaseState::Locking);
        assert_eq!(sides(true, true, false).state(), CaseState::OneSided);
        assert_eq!(sides(true, false, true).state(), CaseState::OneSided);
        assert_eq!(sides(true, true, true).state(), CaseState::Locked);
        // An automatic lock (R22) needs the social side only.
        assert_eq!(sides(false, true, false).state(), CaseState::Locked);
        assert!(sides(true, true, false).needs_driving());
        assert!(!sides(true, true, true).needs_driving());
    }

    #[test]
    fn unlocking_one_side_leaves_the_case_open_until_the_other() {
        let mut s = sides(true, true, true);
        s.social_released = Some(Release::Unlocked);
        assert_eq!(s.state(), CaseState::Unlocking);
        s.financial_released = Some(Release::Expired);
        assert_eq!(s.state(), CaseState::Unlocked);
        let mut lapsed = sides(true, true, true);
        lapsed.social_released = Some(Release::Expired);
        lapsed.financial_released = Some(Release::Expired);
        assert_eq!(lapsed.state(), CaseState::Expired);
    }

    #[test]
    fn each_loss_kind_has_its_channels() {
        assert!(report_channel_allowed(LossKind::Written, Channel::BankBranch).is_ok());
        assert!(report_channel_allowed(LossKind::Written, Channel::Hotline).is_err());
        assert!(report_channel_allowed(LossKind::Temporary, Channel::Hotline12333Operator).is_ok());
        assert!(report_channel_allowed(LossKind::Temporary, Channel::BureauWindow).is_err());
        assert!(report_channel_allowed(LossKind::Automatic, Channel::BankBranch).is_err());
        assert_eq!(unlock_side(Channel::BankBranch).ok(), Some(Side::Financial));
        assert_eq!(unlock_side(Channel::BureauWindow).ok(), Some(Side::Social));
        assert!(unlock_side(Channel::Hotline).is_err());
    }
}
