//! The shipment's rules, without I/O: the one status set every courier feed is normalised to, the
//! couriers' own codes mapped onto it, how an update moves a shipment (never backwards), and the
//! milestones the registry must hear about, in order (R14-R17).

use std::fmt;

/// The normalised courier status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Pending,
    InfoReceived,
    InTransit,
    OutForDelivery,
    AttemptFailed,
    Delivered,
    AvailableForPickup,
    PickedUp,
    Returned,
    Exception,
    /// Handed over without the courier before it took the card (instant issue R16, counter pick-up):
    /// postal's own status, never a courier's.
    Withdrawn,
}

impl Status {
    pub const ALL: [Status; 11] = [
        Status::Pending,
        Status::InfoReceived,
        Status::InTransit,
        Status::OutForDelivery,
        Status::AttemptFailed,
        Status::Delivered,
        Status::AvailableForPickup,
        Status::PickedUp,
        Status::Returned,
        Status::Exception,
        Status::Withdrawn,
    ];

    /// The label stored in the database and accepted in feeds (`attempt_failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::InfoReceived => "info_received",
            Status::InTransit => "in_transit",
            Status::OutForDelivery => "out_for_delivery",
            Status::AttemptFailed => "attempt_failed",
            Status::Delivered => "delivered",
            Status::AvailableForPickup => "available_for_pickup",
            Status::PickedUp => "picked_up",
            Status::Returned => "returned",
            Status::Exception => "exception",
            Status::Withdrawn => "withdrawn",
        }
    }

    pub fn from_label(label: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == label)
    }

    /// How far along its way a shipment in this status is. `None` for an exception, which records a
    /// problem without moving the shipment.
    fn rank(self) -> Option<u8> {
        Some(match self {
            Status::Pending => 0,
            Status::InfoReceived => 1,
            Status::InTransit => 2,
            Status::OutForDelivery => 3,
            Status::AttemptFailed => 4,
            Status::AvailableForPickup => 5,
            Status::Delivered | Status::PickedUp | Status::Returned | Status::Withdrawn => 6,
            Status::Exception => return None,
        })
    }

    /// Delivered, picked up, returned or withdrawn: the shipment is over and nothing moves it again.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Delivered | Status::PickedUp | Status::Returned | Status::Withdrawn)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the registry (and anyone on `socialcard.shipment.v1`) hears about a shipment, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Milestone {
    Opened,
    Dispatched,
    DeliveryFailed,
    AtBackupPoint,
    Delivered,
    PickedUp,
    Returned,
}

impl Milestone {
    pub fn as_str(self) -> &'static str {
        match self {
            Milestone::Opened => "opened",
            Milestone::Dispatched => "dispatched",
            Milestone::DeliveryFailed => "delivery_failed",
            Milestone::AtBackupPoint => "at_backup_point",
            Milestone::Delivered => "delivered",
            Milestone::PickedUp => "picked_up",
            Milestone::Returned => "returned",
        }
    }

    pub fn from_label(label: &str) -> Option<Milestone> {
        [
            Milestone::Opened,
            Milestone::Dispatched,
            Milestone::DeliveryFailed,
            Milestone::AtBackupPoint,
            Milestone::Delivered,
            Milestone::PickedUp,
            Milestone::Returned,
        ]
        .into_iter()
        .find(|m| m.as_str() == label)
    }

    /// The milestones on the way to `self`, itself last. A card picked up at the backup point went
    /// there because a delivery failed, after it was dispatched (R15).
    fn path(self) -> &'static [Milestone] {
        use Milestone as M;
        match self {
            M::Opened => &[M::Opened],
            M::Dispatched => &[M::Dispatched],
            M::DeliveryFailed => &[M::Dispatched, M::DeliveryFailed],
            M::AtBackupPoint => &[M::Dispatched, M::DeliveryFailed, M::AtBackupPoint],
            M::Delivered => &[M::Dispatched, M::Delivered],
            M::PickedUp => &[M::Dispatched, M::DeliveryFailed, M::AtBackupPoint, M::PickedUp],
            M::Returned => &[M::Dispatched, M::Returned],
        }
    }
}

/// The milestone a courier status reaches, if any.
fn milestone_of(status: Status) -> Option<Milestone> {
    match status {
        Status::Pending | Status::InfoReceived | Status::Exception | Status::Withdrawn => None,
        Status::InTransit | Status::OutForDelivery => Some(Milestone::Dispatched),
        Status::AttemptFailed => Some(Milestone::DeliveryFailed),
        Status::AvailableForPickup => Some(Milestone::AtBackupPoint),
        Status::Delivered => Some(Milestone::Delivered),
        Status::PickedUp => Some(Milestone::PickedUp),
        Status::Returned => Some(Milestone::Returned),
    }
}

/// Where a shipment stands: its current status and the furthest milestone it reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub status: Status,
    /// The rank of the furthest status reached (an exception keeps the rank it interrupted).
    pub rank: u8,
    pub milestone: Milestone,
}

impl Progress {
    pub fn opened() -> Self {
        Progress { status: Status::Pending, rank: 0, milestone: Milestone::Opened }
    }

    /// True once a failed attempt sent the card to the backup point.
    pub fn routed_to_backup_point(self) -> bool {
        matches!(self.milestone, Milestone::DeliveryFailed | Milestone::AtBackupPoint | Milestone::PickedUp)
    }
}

/// How one update is taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The shipment moves to `progress`; `milestones` (in order, possibly empty) are new; `implied` are
    /// those among them the courier skipped over.
    Applied { progress: Progress, milestones: Vec<(Milestone, bool)> },
    /// Older than where the shipment stands: kept in the history, nothing moves.
    OutOfOrder,
    /// Contradicts the shipment's path: kept in the history, nothing moves.
    Conflict,
}

impl Decision {
    pub fn outcome(&self) -> Outcome {
        match self {
            Decision::Applied { .. } => Outcome::Applied,
            Decision::OutOfOrder => Outcome::OutOfOrder,
            Decision::Conflict => Outcome::Conflict,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    OutOfOrder,
    Conflict,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::OutOfOrder => "out_of_order",
            Outcome::Conflict => "conflict",
        }
    }

    pub fn from_label(label: &str) -> Option<Outcome> {
        [Outcome::Applied, Outcome::OutOfOrder, Outcome::Conflict].into_iter().find(|o| o.as_str() == label)
    }
}

/// Takes `status` into a shipment at `current`. Never moves a shipment backwards: an update of a lower
/// rank than the shipment reached is out of order; a finished shipment takes nothing more. A delivery
/// to the address after a failed attempt contradicts R15 (the card went to the backup point), and a
/// pick-up after a delivery cannot be: both are conflicts.
pub fn decide(current: Progress, status: Status) -> Decision {
    if current.status.is_final() {
        // A repeat, a late step or a late exception is merely old news; another ending is a contradiction.
        return match status.rank() {
            Some(rank) if rank >= current.rank && status != current.status => Decision::Conflict,
            _ => Decision::OutOfOrder,
        };
    }
    let Some(rank) = status.rank() else {
        return Decision::Applied { progress: Progress { status, ..current }, milestones: Vec::new() };
    };
    if rank < current.rank {
        return Decision::OutOfOrder;
    }
    if status == Status::Delivered && current.routed_to_backup_point() {
        return Decision::Conflict;
    }
    let milestones: Vec<(Milestone, bool)> = match milestone_of(status) {
        Some(t) if !reached(current.milestone, t) => {
            t.path().iter().filter(|m| !reached(current.milestone, **m)).map(|m| (*m, *m != t)).collect()
        }
        _ => Vec::new(),
    };
    let milestone = milestones.last().map_or(current.milestone, |(m, _)| *m);
    Decision::Applied { progress: Progress { status, rank, milestone }, milestones }
}

/// Whether a shipment at milestone `at` has already passed `m` (milestones on another branch count
/// as not passed: the ordering of the enum is only meaningful along one path).
fn reached(at: Milestone, m: Milestone) -> bool {
    at.path().contains(&m)
}

/// A courier's own event code mapped onto the status set, with its sub-reason. Codes are matched
/// without regard to case; the normalised labels (`attempt_failed`) are accepted too.
pub fn normalise(code: &str) -> Option<(Status, &'static str)> {
    let code = code.trim().to_ascii_lowercase();
    if let Some(s) = Status::from_label(&code).filter(|s| *s != Status::Withdrawn) {
        return Some((s, ""));
    }
    Some(match code.as_str() {
        "manifested" | "label_created" => (Status::InfoReceived, "manifest_received"),
        "accepted" | "collected_from_sender" => (Status::InTransit, "accepted"),
        "arrived_at_hub" => (Status::InTransit, "arrived_at_hub"),
        "departed_hub" => (Status::InTransit, "departed_hub"),
        "with_courier" => (Status::OutForDelivery, "with_courier"),
        "failed_recipient_absent" => (Status::AttemptFailed, "recipient_absent"),
        "failed_address_problem" => (Status::AttemptFailed, "address_problem"),
        "failed_refused" => (Status::AttemptFailed, "refused"),
        "failed_id_check" => (Status::AttemptFailed, "id_check_failed"),
        "signed_by_holder" => (Status::Delivered, "signed_by_holder"),
        "signed_by_family" => (Status::Delivered, "signed_by_family"),
        "ready_at_point" => (Status::AvailableForPickup, "ready_at_point"),
        "collected_at_point" => (Status::PickedUp, "collected_at_point"),
        "return_to_sender" => (Status::Returned, "return_to_sender"),
        "unclaimed_returned" => (Status::Returned, "unclaimed"),
        "damaged" => (Status::Exception, "damaged"),
        "lost" => (Status::Exception, "lost"),
        "delayed" => (Status::Exception, "delayed"),
        "held_customs" | "held" => (Status::Exception, "held"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(statuses: &[Status]) -> (Progress, Vec<(Milestone, bool)>) {
        let mut p = Progress::opened();
        let mut all = Vec::new();
        for s in statuses {
            if let Decision::Applied { progress, milestones } = decide(p, *s) {
                p = progress;
                all.extend(milestones);
            }
        }
        (p, all)
    }

    #[test]
    fn a_delivery_is_dispatched_first() {
        let (p, m) = run(&[Status::InfoReceived, Status::InTransit, Status::OutForDelivery, Status::Delivered]);
        assert_eq!(p.status, Status::Delivered);
        assert_eq!(m, vec![(Milestone::Dispatched, false), (Milestone::Delivered, false)]);
    }

    #[test]
    fn a_skipped_dispatch_is_implied() {
        let (_, m) = run(&[Status::Delivered]);
        assert_eq!(m, vec![(Milestone::Dispatched, true), (Milestone::Delivered, false)]);
    }

    #[test]
    fn a_failed_attempt_ends_at_the_backup_point() {
        let (p, m) = run(&[
            Status::InTransit,
            Status::AttemptFailed,
            Status::AvailableForPickup,
            Status::Delivered,
            Status::PickedUp,
        ]);
        assert_eq!(p.status, Status::PickedUp);
        assert_eq!(
            m,
            vec![
                (Milestone::Dispatched, false),
                (Milestone::DeliveryFailed, false),
                (Milestone::AtBackupPoint, false),
                (Milestone::PickedUp, false)
            ]
        );
    }

    #[test]
    fn late_updates_never_move_back() {
        let p = run(&[Status::OutForDelivery]).0;
        assert_eq!(decide(p, Status::InTransit), Decision::OutOfOrder);
        let done = run(&[Status::Delivered]).0;
        assert_eq!(decide(done, Status::OutForDelivery), Decision::OutOfOrder);
        assert_eq!(decide(done, Status::PickedUp), Decision::Conflict);
        assert_eq!(decide(done, Status::Exception), Decision::OutOfOrder);
    }

    #[test]
    fn an_exception_keeps_the_progress() {
        let p = run(&[Status::OutForDelivery, Status::Exception]).0;
        assert_eq!((p.status, p.rank, p.milestone), (Status::Exception, 3, Milestone::Dispatched));
        assert_eq!(decide(p, Status::InTransit), Decision::OutOfOrder);
        assert!(matches!(decide(p, Status::Delivered), Decision::Applied { .. }));
    }

    #[test]
    fn courier_codes_normalise() {
        assert_eq!(normalise("FAILED_RECIPIENT_ABSENT"), Some((Status::AttemptFailed, "recipient_absent")));
        assert_eq!(normalise("delivered"), Some((Status::Delivered, "")));
        assert_eq!(normalise("teleported"), None);
    }

    fn any_status() -> impl Strategy<Value = Status> {
        proptest::sample::select(Status::ALL.to_vec())
    }

    proptest! {
        /// Whatever order a feed delivers in, the rank never drops, milestones come out along one legal
        /// path in order and never twice, and a finished shipment stays finished.
        #[test]
        fn random_feeds_stay_on_a_legal_path(statuses in proptest::collection::vec(any_status(), 0..40)) {
            let mut p = Progress::opened();
            let mut emitted: Vec<Milestone> = Vec::new();
            for s in statuses {
                let before = p;
                if let Decision::Applied { progress, milestones } = decide(p, s) {
                    prop_assert!(progress.rank >= before.rank);
                    prop_assert!(!before.status.is_final());
                    emitted.extend(milestones.iter().map(|(m, _)| *m));
                    p = progress;
                }
            }
            let legal: &[&[Milestone]] = &[
                Milestone::PickedUp.path(),
                Milestone::Delivered.path(),
                Milestone::Returned.path(),
                &[Milestone::Dispatched, Milestone::DeliveryFailed, Milestone::AtBackupPoint, Milestone::Returned],
                &[Milestone::Dispatched, Milestone::DeliveryFailed, Milestone::Returned],
            ];
            prop_assert!(
                legal.iter().any(|path| path.starts_with(&emitted)),
                "milestones {:?} leave every legal path", emitted
            );
        }
    }
}
