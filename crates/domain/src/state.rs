//! The three state machines of a card (domain.md, lifecycle summary). Each is a plain enum whose
//! `apply` either returns the next state or a rejection naming the illegal transition. Cross-machine
//! rules (a card must be collected before activation, ...) live in [`crate::card::Card`].

use serde::{Deserialize, Serialize};

use crate::rejection::Rejection;

/// Kinds of loss lock (R22, R25).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LossKind {
    /// By phone: temporary (口头挂失).
    Temporary,
    /// In writing with ID at a branch or window (书面挂失).
    Written,
    /// R22: no financial activation within N days of collection.
    Automatic,
}

impl LossKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LossKind::Temporary => "temporary",
            LossKind::Written => "written",
            LossKind::Automatic => "automatic",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PhysicalState {
    Applied,
    Approved,
    Rejected,
    InProduction,
    ProductionFailed,
    Produced,
    Dispatched,
    DeliveryFailed,
    AtBackupPoint,
    Collected,
    ReturnedForRemake,
    Replaced,
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PhysicalEvent {
    Approve,
    Reject,
    StartProduction,
    ProductionSucceeded,
    ProductionFailed,
    Dispatch,
    DeliveryFailed,
    ArriveAtBackupPoint,
    Collect,
    ReturnForRemake,
    Replace,
    Cancel,
}

impl PhysicalState {
    pub fn as_str(self) -> &'static str {
        match self {
            PhysicalState::Applied => "applied",
            PhysicalState::Approved => "approved",
            PhysicalState::Rejected => "rejected",
            PhysicalState::InProduction => "in_production",
            PhysicalState::ProductionFailed => "production_failed",
            PhysicalState::Produced => "produced",
            PhysicalState::Dispatched => "dispatched",
            PhysicalState::DeliveryFailed => "delivery_failed",
            PhysicalState::AtBackupPoint => "at_backup_point",
            PhysicalState::Collected => "collected",
            PhysicalState::ReturnedForRemake => "returned_for_remake",
            PhysicalState::Replaced => "replaced",
            PhysicalState::Cancelled => "cancelled",
        }
    }

    /// No transition leaves these.
    pub fn is_terminal(self) -> bool {
        matches!(self, PhysicalState::Rejected | PhysicalState::Replaced | PhysicalState::Cancelled)
    }

    /// The card exists or will exist for its holder (R2 counts these).
    pub fn is_live(self) -> bool {
        !self.is_terminal()
    }

    pub fn apply(self, event: PhysicalEvent) -> Result<Self, Rejection> {
        use PhysicalEvent as E;
        use PhysicalState as S;
        let next = match (self, event) {
            (S::Applied, E::Approve) => S::Approved,
            (S::Applied, E::Reject) => S::Rejected,
            (S::Approved | S::ProductionFailed | S::ReturnedForRemake, E::StartProduction) => S::InProduction,
            (S::InProduction, E::ProductionSucceeded) => S::Produced,
            (S::InProduction, E::ProductionFailed) => S::ProductionFailed,
            (S::Produced | S::DeliveryFailed, E::Dispatch) => S::Dispatched,
            (S::Dispatched, E::DeliveryFailed) => S::DeliveryFailed,
            (S::DeliveryFailed | S::Dispatched, E::ArriveAtBackupPoint) => S::AtBackupPoint,
            // Delivery confirmed, pick-up at a point, or an instant replacement point (R16, R17).
            (S::Produced | S::Dispatched | S::AtBackupPoint, E::Collect) => S::Collected,
            (S::Collected | S::AtBackupPoint, E::ReturnForRemake) => S::ReturnedForRemake,
            (S::Collected, E::Replace) => S::Replaced,
            (s, E::Cancel) if !s.is_terminal() => S::Cancelled,
            (s, e) => {
                return Err(Rejection::precondition(
                    "ILLEGAL_CARD_TRANSITION",
                    format!("a card that is {} cannot {}", s.as_str(), physical_event_name(e)),
                ));
            }
        };
        Ok(next)
    }
}

fn physical_event_name(e: PhysicalEvent) -> &'static str {
    match e {
        PhysicalEvent::Approve => "be approved",
        PhysicalEvent::Reject => "be rejected",
        PhysicalEvent::StartProduction => "go into production",
        PhysicalEvent::ProductionSucceeded => "be recorded as produced",
        PhysicalEvent::ProductionFailed => "be recorded as failed in production",
        PhysicalEvent::Dispatch => "be dispatched",
        PhysicalEvent::DeliveryFailed => "fail delivery",
        PhysicalEvent::ArriveAtBackupPoint => "arrive at the backup point",
        PhysicalEvent::Collect => "be collected",
        PhysicalEvent::ReturnForRemake => "be returned for remake",
        PhysicalEvent::Replace => "be replaced",
        PhysicalEvent::Cancel => "be cancelled",
    }
}

/// Where the social function returns when a loss lock is lifted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Resume {
    NotActivated,
    Active,
    PinLocked,
}

impl From<Resume> for SocialState {
    fn from(r: Resume) -> Self {
        match r {
            Resume::NotActivated => SocialState::NotActivated,
            Resume::Active => SocialState::Active,
            Resume::PinLocked => SocialState::PinLocked,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SocialState {
    NotActivated,
    Active,
    LossLocked {
        kind: LossKind,
        resume: Resume,
    },
    PinLocked,
    /// R23: a minor card not exchanged in time.
    Disabled,
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SocialEvent {
    Activate,
    ReportLoss(LossKind),
    Unlock,
    PinLock,
    PinReset,
    Disable,
    Cancel,
}

impl SocialState {
    pub fn as_str(self) -> &'static str {
        match self {
            SocialState::NotActivated => "not_activated",
            SocialState::Active => "active",
            SocialState::LossLocked { .. } => "loss_locked",
            SocialState::PinLocked => "pin_locked",
            SocialState::Disabled => "disabled",
            SocialState::Cancelled => "cancelled",
        }
    }

    pub fn loss_kind(self) -> Option<LossKind> {
        match self {
            SocialState::LossLocked { kind, .. } => Some(kind),
            _ => None,
        }
    }

    pub fn apply(self, event: SocialEvent) -> Result<Self, Rejection> {
        use SocialEvent as E;
        use SocialState as S;
        let resume_of = |s: S| match s {
            S::NotActivated => Some(Resume::NotActivated),
            S::Active => Some(Resume::Active),
            S::PinLocked => Some(Resume::PinLocked),
            _ => None,
        };
        let next = match (self, event) {
            (S::NotActivated, E::Activate) => S::Active,
            (S::Active, E::Activate) => {
                return Err(Rejection::precondition("SOCIAL_ALREADY_ACTIVE", "the social function is already active"));
            }
            (s @ (S::NotActivated | S::Active | S::PinLocked), E::ReportLoss(kind)) => {
                S::LossLocked { kind, resume: resume_of(s).unwrap_or(Resume::NotActivated) }
            }
            // A written report upgrades a temporary or automatic lock (R27); the way back stays the same.
            (
                S::LossLocked { kind: LossKind::Temporary | LossKind::Automatic, resume },
                E::ReportLoss(LossKind::Written),
            ) => S::LossLocked { kind: LossKind::Written, resume },
            (S::LossLocked { .. }, E::ReportLoss(_)) => {
                return Err(Rejection::precondition("CARD_LOSS_LOCKED", "the social function is already loss-locked"));
            }
            (S::LossLocked { resume, .. }, E::Unlock) => resume.into(),
            (S::Active, E::PinLock) => S::PinLocked,
            (S::PinLocked | S::Active, E::PinReset) => S::Active,
            (s, E::Disable) if !matches!(s, S::Disabled | S::Cancelled) => S::Disabled,
            (s, E::Cancel) if s != S::Cancelled => S::Cancelled,
            (s, e) => {
                return Err(Rejection::precondition(
                    match s {
                        S::LossLocked { .. } => "CARD_LOSS_LOCKED",
                        S::PinLocked => "SOCIAL_PIN_LOCKED",
                        S::Disabled => "SOCIAL_DISABLED",
                        S::Cancelled => "CARD_CANCELLED",
                        _ => "ILLEGAL_SOCIAL_TRANSITION",
                    },
                    format!("the social function is {} and cannot {}", s.as_str(), social_event_name(e)),
                ));
            }
        };
        Ok(next)
    }
}

fn social_event_name(e: SocialEvent) -> &'static str {
    match e {
        SocialEvent::Activate => "be activated",
        SocialEvent::ReportLoss(_) => "be loss-locked",
        SocialEvent::Unlock => "be unlocked",
        SocialEvent::PinLock => "be PIN-locked",
        SocialEvent::PinReset => "have its PIN reset",
        SocialEvent::Disable => "be disabled",
        SocialEvent::Cancel => "be cancelled",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FinancialState {
    NotActivated,
    Active,
    Frozen { kind: LossKind, was_active: bool },
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FinancialEvent {
    Activate,
    /// The bank core rolled the activation back (compensation within its window).
    CancelActivation,
    Freeze(LossKind),
    Unfreeze,
    Cancel,
}

impl FinancialState {
    pub fn as_str(self) -> &'static str {
        match self {
            FinancialState::NotActivated => "not_activated",
            FinancialState::Active => "active",
            FinancialState::Frozen { .. } => "frozen",
            FinancialState::Cancelled => "cancelled",
        }
    }

    pub fn apply(self, event: FinancialEvent) -> Result<Self, Rejection> {
        use FinancialEvent as E;
        use FinancialState as S;
        let next = match (self, event) {
            (S::NotActivated, E::Activate) => S::Active,
            (S::Active, E::CancelActivation) => S::NotActivated,
            (S::Active, E::Freeze(kind)) => S::Frozen { kind, was_active: true },
            (S::NotActivated, E::Freeze(kind)) => S::Frozen { kind, was_active: false },
            (S::Frozen { kind: LossKind::Temporary, was_active }, E::Freeze(LossKind::Written)) => {
                S::Frozen { kind: LossKind::Written, was_active }
            }
            (S::Frozen { was_active, .. }, E::Unfreeze) => {
                if was_active {
                    S::Active
                } else {
                    S::NotActivated
                }
            }
            (s, E::Cancel) if s != S::Cancelled => S::Cancelled,
            (s, e) => {
                return Err(Rejection::precondition(
                    match (s, e) {
                        (S::Active, E::Activate) => "FINANCIAL_ALREADY_ACTIVE",
                        (S::Frozen { .. }, _) => "FINANCIAL_FROZEN",
                        (S::Cancelled, _) => "CARD_CANCELLED",
                        _ => "ILLEGAL_FINANCIAL_TRANSITION",
                    },
                    format!("the financial function is {} and cannot take {e:?}", s.as_str()),
                ));
            }
        };
        Ok(next)
    }
}
