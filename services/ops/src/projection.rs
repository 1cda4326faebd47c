//! How a card event moves the read model's copy of a card: through the domain's own state machines, so
//! the dashboard's states are the registry's states. Pure: no I/O.
//!
//! An event is a fact the registry already committed; if folding it is refused here (a gap or a bug
//! somewhere), the card keeps its state and the event is reported as an inconsistency, never dropped
//! silently and never dead-lettered (a read model must not stop on a fact).

use serde::{Deserialize, Serialize};
use socialcard_domain::state::{FinancialEvent, PhysicalEvent, SocialEvent};
use socialcard_domain::{FinancialState, LossKind, PhysicalState, Rejection, SocialState};
use socialcard_proto::events::v1 as ev;
use socialcard_proto::events::v1::card_event::Kind;
use socialcard_proto::registry::v1 as reg;

/// The three functions of one card, as the domain models them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardStates {
    pub physical: PhysicalState,
    pub social: SocialState,
    pub financial: FinancialState,
}

impl CardStates {
    /// A card just applied for.
    pub fn applied() -> Self {
        Self {
            physical: PhysicalState::Applied,
            social: SocialState::NotActivated,
            financial: FinancialState::NotActivated,
        }
    }

    fn ended(self, event: PhysicalEvent) -> Result<Self, Rejection> {
        Ok(Self {
            physical: self.physical.apply(event)?,
            social: SocialState::Cancelled,
            financial: FinancialState::Cancelled,
        })
    }

    fn physical(self, event: PhysicalEvent) -> Result<Self, Rejection> {
        Ok(Self { physical: self.physical.apply(event)?, ..self })
    }

    fn social(self, event: SocialEvent) -> Result<Self, Rejection> {
        Ok(Self { social: self.social.apply(event)?, ..self })
    }

    fn financial(self, event: FinancialEvent) -> Result<Self, Rejection> {
        Ok(Self { financial: self.financial.apply(event)?, ..self })
    }
}

/// The funnel stage an event reaches, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Production,
    Delivery,
    Collection,
    Activation,
}

pub fn loss_kind(value: i32) -> Option<LossKind> {
    match reg::LossKind::try_from(value).ok()? {
        reg::LossKind::Temporary => Some(LossKind::Temporary),
        reg::LossKind::Written => Some(LossKind::Written),
        reg::LossKind::Automatic => Some(LossKind::Automatic),
        reg::LossKind::Unspecified => None,
    }
}

fn required_loss_kind(value: i32) -> Result<LossKind, Rejection> {
    loss_kind(value).ok_or_else(|| Rejection::invalid("loss_kind", "LOSS_KIND_UNKNOWN", "the event names no loss kind"))
}

/// Folds one card event (not `ApplicationSubmitted`, which creates the card) into `states`, the same way
/// the registry's `Card` moved: returns the new states and the funnel stage the event reached.
pub fn apply(states: CardStates, kind: &Kind) -> Result<(CardStates, Option<Stage>), Rejection> {
    use FinancialEvent as F;
    use PhysicalEvent as P;
    use SocialEvent as S;
    Ok(match kind {
        Kind::ApplicationSubmitted(_) => (states, None),
        Kind::ApplicationApproved(_) => (states.physical(P::Approve)?, None),
        Kind::ApplicationRejected(_) => (states.ended(P::Reject)?, None),
        Kind::ProductionStarted(_) => (states.physical(P::StartProduction)?, None),
        Kind::CardProduced(_) => (states.physical(P::ProductionSucceeded)?, Some(Stage::Production)),
        Kind::ProductionFailed(_) => (states.physical(P::ProductionFailed)?, None),
        Kind::ShipmentProgressed(p) => match reg::ShipmentProgress::try_from(p.progress) {
            Ok(reg::ShipmentProgress::Dispatched) => (states.physical(P::Dispatch)?, Some(Stage::Delivery)),
            Ok(reg::ShipmentProgress::DeliveryFailed) => (states.physical(P::DeliveryFailed)?, None),
            Ok(reg::ShipmentProgress::AtBackupPoint) => (states.physical(P::ArriveAtBackupPoint)?, None),
            _ => return Err(Rejection::invalid("progress", "SHIPMENT_PROGRESS_UNKNOWN", "unknown shipment progress")),
        },
        Kind::CardCollected(_) => (states.physical(P::Collect)?, Some(Stage::Collection)),
        Kind::ReturnedForRemake(_) => (states.physical(P::ReturnForRemake)?, None),
        Kind::SocialActivated(_) => (states.social(S::Activate)?, Some(Stage::Activation)),
        Kind::FinancialActivationRecorded(_) => {
            // R20: the bank's activation switches a not-yet-activated social function on in the same change.
            let mut next = states.financial(F::Activate)?;
            if next.social == SocialState::NotActivated {
                next.social = SocialState::Active;
            }
            (next, Some(Stage::Activation))
        }
        Kind::FinancialActivationCancelled(_) => (states.financial(F::CancelActivation)?, None),
        Kind::SocialLossLocked(l) => (states.social(S::ReportLoss(required_loss_kind(l.loss_kind)?))?, None),
        Kind::SocialUnlocked(u) => {
            let mut next = states.social(S::Unlock)?;
            // R22: the unlock after an automatic lock follows a financial activation: the social side goes on.
            if loss_kind(u.previous_loss_kind) == Some(LossKind::Automatic) && next.social == SocialState::NotActivated
            {
                next.social = SocialState::Active;
            }
            (next, None)
        }
        Kind::SocialPinLocked(_) => (states.social(S::PinLock)?, None),
        Kind::SocialPinReset(_) => (states.social(S::PinReset)?, None),
        Kind::SocialPinChanged(_) => (states, None),
        Kind::SocialDisabled(_) => (states.social(S::Disable)?, None),
        Kind::CardCancelled(_) | Kind::TemporaryCardExpired(_) => (states.ended(P::Cancel)?, None),
        Kind::CardReplaced(_) => (states.ended(P::Replace)?, None),
        Kind::FinancialFreezeRecorded(f) => {
            let event = if f.frozen { F::Freeze(required_loss_kind(f.loss_kind)?) } else { F::Unfreeze };
            (states.financial(event)?, None)
        }
    })
}

/// The bank and district of a new card, from its application.
pub fn submitted(e: &ev::ApplicationSubmitted) -> (String, String) {
    (e.bank_code.clone(), e.region_code.clone())
}

/// A shipment milestone's label, as postal names it.
pub fn milestone_label(m: i32) -> &'static str {
    match ev::ShipmentMilestone::try_from(m) {
        Ok(ev::ShipmentMilestone::Opened) => "opened",
        Ok(ev::ShipmentMilestone::Dispatched) => "dispatched",
        Ok(ev::ShipmentMilestone::DeliveryFailed) => "delivery_failed",
        Ok(ev::ShipmentMilestone::AtBackupPoint) => "at_backup_point",
        Ok(ev::ShipmentMilestone::Delivered) => "delivered",
        Ok(ev::ShipmentMilestone::PickedUp) => "picked_up",
        Ok(ev::ShipmentMilestone::Returned) => "returned",
        Ok(ev::ShipmentMilestone::Unspecified) | Err(_) => "unknown",
    }
}

/// Whether a milestone ends the shipment (the card is with the holder, or back with the bureau).
pub fn milestone_closes(m: i32) -> bool {
    matches!(
        ev::ShipmentMilestone::try_from(m),
        Ok(ev::ShipmentMilestone::Delivered | ev::ShipmentMilestone::PickedUp | ev::ShipmentMilestone::Returned)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(kinds: &[Kind]) -> CardStates {
        kinds.iter().fold(CardStates::applied(), |s, k| apply(s, k).unwrap().0)
    }

    #[test]
    fn a_card_through_activation_and_a_loss() {
        let s = fold(&[
            Kind::ApplicationApproved(ev::ApplicationApproved {}),
            Kind::ProductionStarted(ev::ProductionStarted::default()),
            Kind::CardProduced(ev::CardProduced::default()),
            Kind::CardCollected(ev::CardCollected::default()),
            Kind::FinancialActivationRecorded(ev::FinancialActivationRecorded::default()),
        ]);
        assert_eq!(
            (s.physical, s.social, s.financial),
            (PhysicalState::Collected, SocialState::Active, FinancialState::Active)
        );
        let locked =
            apply(s, &Kind::SocialLossLocked(ev::SocialLossLocked { loss_kind: reg::LossKind::Temporary as i32 }))
                .unwrap()
                .0;
        assert_eq!(locked.social.as_str(), "loss_locked");
        let unlocked = apply(locked, &Kind::SocialUnlocked(ev::SocialUnlocked::default())).unwrap().0;
        assert_eq!(unlocked.social, SocialState::Active, "back where the lock found it");
    }

    #[test]
    fn an_impossible_event_is_refused_not_folded() {
        let refused = apply(CardStates::applied(), &Kind::CardCollected(ev::CardCollected::default()));
        assert!(refused.is_err());
    }

    #[test]
    fn cancellation_ends_every_function() {
        let s = fold(&[Kind::ApplicationRejected(ev::ApplicationRejected::default())]);
        assert_eq!((s.social, s.financial), (SocialState::Cancelled, FinancialState::Cancelled));
    }
}
