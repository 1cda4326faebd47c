//! The schedule of a run, a pure function of the seed, the size and the phase: which cards do what in
//! which order and when each starts, and which fault strikes when. A failing seed replays the same
//! schedule (the interleaving with the system's own timing is not under the seed's control).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// What a run exercises, by phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// SQLite and the embedded log: nothing to install.
    Embedded,
    /// The registry on PostgreSQL, events through a Kafka-protocol broker.
    PostgresKafka,
    /// One `socialcard serve` process per service (registry, coordinator, postal, four adapters), the
    /// registry on PostgreSQL, events between the processes through the broker only.
    Distributed,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Embedded => "embedded (SQLite, embedded log)",
            Phase::PostgresKafka => "postgresql + kafka",
            Phase::Distributed => "distributed (one process per service, PostgreSQL + Kafka)",
        }
    }

    fn salt(self) -> u64 {
        match self {
            Phase::Embedded => 0x5eed_0001,
            Phase::PostgresKafka => 0x5eed_0002,
            Phase::Distributed => 0x5eed_0003,
        }
    }

    /// With PostgreSQL and a broker (their cuts are in the schedule).
    pub fn has_backends(self) -> bool {
        self != Phase::Embedded
    }
}

/// The banks whose adapters the workload calls (four of the eleven).
pub const BANKS: [&str; 4] = ["icbc", "ccb", "boc", "abc"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossVia {
    /// A temporary loss by phone (the hotline, from the registered number), through the coordinator.
    PhoneAtCoordinator,
    /// A written loss at the bureau window, through the coordinator.
    WrittenAtCoordinator,
    /// A written loss at a branch of the card's bank: the adapter hands it to the coordinator.
    WrittenAtBank,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CardStep {
    /// ActivateFinancial at the card's bank adapter (R20: both functions on).
    Activate,
    Loss(LossVia),
    /// The bureau's written unlock of the social side, through the coordinator (R27).
    UnlockSocial,
    /// The bank's unlock of the financial side, at its adapter.
    UnlockFinancial,
}

#[derive(Clone, Debug)]
pub struct CardScript {
    pub card: usize,
    pub bank: &'static str,
    pub start: Duration,
    /// Each step after a pause.
    pub steps: Vec<(Duration, CardStep)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    Webhook,
    Stream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CourierKind {
    /// The next step of the shipment's path.
    Step,
    /// An earlier status, sent late with a new event id: kept, never moves the shipment back.
    Late,
    /// An event id sent before, again: ignored.
    Repeat,
}

#[derive(Clone, Debug)]
pub struct CourierStep {
    /// Feed label (`in_transit`, ...).
    pub status: &'static str,
    /// Minutes after the shipment's base time that the courier says it happened.
    pub minute: i64,
    pub sub_reason: &'static str,
    /// At the backup point (pick-up statuses).
    pub at_point: bool,
    pub kind: CourierKind,
    pub feed: Feed,
    /// The courier's event id, unique per step; a repeat reuses an earlier one.
    pub event: usize,
}

#[derive(Clone, Debug)]
pub struct ShipmentScript {
    pub shipment: usize,
    pub start: Duration,
    pub steps: Vec<(Duration, CourierStep)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Registry,
    Loss,
    Postal,
    Webhook,
    Bank(usize),
    /// Distributed phase only: the adapters' and the coordinator's link to the registry.
    RegistryFromServices,
    /// Distributed phase only: the adapters' link to the coordinator (branch losses, unlocks).
    CoordinatorFromAdapters,
    /// Distributed phase only: the coordinator's link to one bank's adapter.
    AdapterFromCoordinator(usize),
}

/// One service of the distributed phase, its own process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Registry,
    Coordinator,
    Postal,
    /// The adapter of `BANKS[i]`.
    Adapter(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL `up`; start it again on the same data after `down`.
    Kill {
        down: Duration,
    },
    /// Distributed phase: SIGKILL one service's process; start it again on its data after `down`.
    KillService {
        service: Service,
        down: Duration,
    },
    /// Close the registry's database connections and refuse new ones.
    CutDatabase {
        for_: Duration,
    },
    CutBroker {
        for_: Duration,
    },
    /// Close a client-facing link and refuse connections.
    CutLink {
        link: Link,
        for_: Duration,
    },
    /// Hold every chunk on a link (beyond the clients' deadlines at the top of the range).
    DelayLink {
        link: Link,
        delay: Duration,
        for_: Duration,
    },
    DelayDatabase {
        delay: Duration,
        for_: Duration,
    },
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub cards: Vec<CardScript>,
    pub shipments: Vec<ShipmentScript>,
    pub faults: Vec<(Duration, Fault)>,
    pub workload: Duration,
    pub concurrency: usize,
}

/// The sizes of a run.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub cards: usize,
    pub shipments: usize,
    pub workload: Duration,
    pub concurrency: usize,
}

impl Size {
    pub fn new(quick: bool) -> Size {
        if quick {
            Size { cards: 24, shipments: 8, workload: Duration::from_secs(16), concurrency: 12 }
        } else {
            Size { cards: 240, shipments: 80, workload: Duration::from_secs(150), concurrency: 24 }
        }
    }
}

/// Which service a distributed kill takes down: the registry, the coordinator, postal or an adapter.
fn pick_service(rng: &mut StdRng) -> Service {
    match rng.random_range(0..4) {
        0 => Service::Registry,
        1 => Service::Coordinator,
        2 => Service::Postal,
        _ => Service::Adapter(rng.random_range(0..BANKS.len())),
    }
}

fn ms(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..hi))
}

impl Plan {
    pub fn new(seed: u64, size: Size, phase: Phase) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed ^ phase.salt());
        let spread = size.workload.as_millis() as u64 * 3 / 4;
        let cards = (0..size.cards)
            .map(|card| {
                let mut steps = vec![(ms(&mut rng, 0, 400), CardStep::Activate)];
                // Two cards in three lose theirs; half of those get it back on both sides.
                if rng.random_bool(2.0 / 3.0) {
                    let via = match rng.random_range(0..3) {
                        0 => LossVia::PhoneAtCoordinator,
                        1 => LossVia::WrittenAtCoordinator,
                        _ => LossVia::WrittenAtBank,
                    };
                    steps.push((ms(&mut rng, 100, 1500), CardStep::Loss(via)));
                    if rng.random_bool(0.5) {
                        let (a, b) = if rng.random_bool(0.5) {
                            (CardStep::UnlockSocial, CardStep::UnlockFinancial)
                        } else {
                            (CardStep::UnlockFinancial, CardStep::UnlockSocial)
                        };
                        steps.push((ms(&mut rng, 100, 1500), a));
                        steps.push((ms(&mut rng, 100, 1500), b));
                    }
                }
                CardScript {
                    card,
                    bank: BANKS[rng.random_range(0..BANKS.len())],
                    start: ms(&mut rng, 0, spread.max(1)),
                    steps,
                }
            })
            .collect();
        let mut event = 0usize;
        let shipments = (0..size.shipments)
            .map(|shipment| {
                let backup = rng.random_bool(0.4);
                let path: &[(&str, i64, &str, bool)] = if backup {
                    &[
                        ("in_transit", 10, "", false),
                        ("out_for_delivery", 20, "", false),
                        ("attempt_failed", 30, "recipient_absent", false),
                        ("available_for_pickup", 40, "", true),
                        ("picked_up", 50, "", true),
                    ]
                } else {
                    &[("in_transit", 10, "", false), ("out_for_delivery", 20, "", false), ("delivered", 30, "", false)]
                };
                let mut steps = Vec::new();
                let mut sent: Vec<CourierStep> = Vec::new();
                for (i, (status, minute, sub_reason, at_point)) in path.iter().enumerate() {
                    let feed = if rng.random_bool(0.5) { Feed::Webhook } else { Feed::Stream };
                    let step = CourierStep {
                        status,
                        minute: *minute,
                        sub_reason,
                        at_point: *at_point,
                        kind: CourierKind::Step,
                        feed,
                        event,
                    };
                    event += 1;
                    sent.push(step.clone());
                    steps.push((ms(&mut rng, 100, 1200), step));
                    // Now and then a stale status or a repeated event after a later one.
                    if i >= 1 && rng.random_bool(0.3) {
                        let earlier = sent[rng.random_range(0..i)].clone();
                        let feed = if rng.random_bool(0.5) { Feed::Webhook } else { Feed::Stream };
                        let extra = if rng.random_bool(0.5) {
                            let e = CourierStep {
                                kind: CourierKind::Late,
                                feed,
                                event,
                                minute: earlier.minute + 1,
                                ..earlier
                            };
                            event += 1;
                            e
                        } else {
                            CourierStep { kind: CourierKind::Repeat, feed, ..earlier }
                        };
                        steps.push((ms(&mut rng, 50, 600), extra));
                    }
                }
                ShipmentScript { shipment, start: ms(&mut rng, 0, spread.max(1)), steps }
            })
            .collect();

        let mut faults = Vec::new();
        let mut at = Duration::from_millis(rng.random_range(1500..3000));
        while at < size.workload {
            let roll = rng.random_range(0..100);
            // The inter-service links exist only in the distributed phase (the other phases draw as before).
            let links = if phase == Phase::Distributed { 9 } else { 6 };
            let link = match rng.random_range(0..links) {
                0 => Link::Registry,
                1 => Link::Loss,
                2 => Link::Postal,
                3 => Link::Webhook,
                4 | 5 => Link::Bank(rng.random_range(0..BANKS.len())),
                6 => Link::RegistryFromServices,
                7 => Link::CoordinatorFromAdapters,
                _ => Link::AdapterFromCoordinator(rng.random_range(0..BANKS.len())),
            };
            let fault = match (phase, roll) {
                (_, 0..35) => Fault::Kill { down: ms(&mut rng, 200, 2500) },
                (_, 35..55) => Fault::CutLink { link, for_: ms(&mut rng, 500, 3000) },
                (_, 55..75) => {
                    // Up to 4 s: past the clients' 3 s deadline, so some calls time out and are retried.
                    Fault::DelayLink { link, delay: ms(&mut rng, 20, 4000), for_: ms(&mut rng, 1000, 4000) }
                }
                (Phase::PostgresKafka | Phase::Distributed, 75..88) => {
                    Fault::CutDatabase { for_: ms(&mut rng, 1000, 5000) }
                }
                (Phase::PostgresKafka | Phase::Distributed, 88..95) => {
                    Fault::CutBroker { for_: ms(&mut rng, 1000, 5000) }
                }
                (Phase::PostgresKafka | Phase::Distributed, _) => {
                    Fault::DelayDatabase { delay: ms(&mut rng, 20, 400), for_: ms(&mut rng, 1000, 4000) }
                }
                (Phase::Embedded, _) => Fault::Kill { down: ms(&mut rng, 200, 2500) },
            };
            let fault = match fault {
                Fault::Kill { down } if phase == Phase::Distributed => {
                    Fault::KillService { service: pick_service(&mut rng), down }
                }
                f => f,
            };
            let lasts = match fault {
                Fault::Kill { down } | Fault::KillService { down, .. } => down + Duration::from_secs(2),
                Fault::CutDatabase { for_ }
                | Fault::CutBroker { for_ }
                | Fault::CutLink { for_, .. }
                | Fault::DelayLink { for_, .. }
                | Fault::DelayDatabase { for_, .. } => for_,
            };
            faults.push((at, fault));
            at += lasts + ms(&mut rng, 500, 3000);
        }
        // Every run kills the process at least once, and with the backends cuts each of them once.
        let mut must: Vec<Fault> = Vec::new();
        if !faults.iter().any(|(_, f)| matches!(f, Fault::Kill { .. } | Fault::KillService { .. })) {
            let down = ms(&mut rng, 200, 2500);
            must.push(if phase == Phase::Distributed {
                Fault::KillService { service: pick_service(&mut rng), down }
            } else {
                Fault::Kill { down }
            });
        }
        if phase.has_backends() {
            if !faults.iter().any(|(_, f)| matches!(f, Fault::CutDatabase { .. })) {
                must.push(Fault::CutDatabase { for_: ms(&mut rng, 1000, 5000) });
            }
            if !faults.iter().any(|(_, f)| matches!(f, Fault::CutBroker { .. })) {
                must.push(Fault::CutBroker { for_: ms(&mut rng, 1000, 5000) });
            }
        }
        // The distributed phase also cuts a link between two services at least once.
        let between_services = |l: &Link| {
            matches!(l, Link::RegistryFromServices | Link::CoordinatorFromAdapters | Link::AdapterFromCoordinator(_))
        };
        if phase == Phase::Distributed
            && !faults.iter().any(|(_, f)| {
                matches!(f, Fault::CutLink { link, .. } | Fault::DelayLink { link, .. } if between_services(link))
            })
        {
            must.push(Fault::CutLink { link: Link::RegistryFromServices, for_: ms(&mut rng, 500, 3000) });
        }
        // In place of the first faults that are neither (their slots keep the timing); in the distributed
        // phase kills after the first are slots too, and what finds no slot comes after the last fault.
        let mut kills = 0;
        // Links between services are kept (they may be the run's only one).
        let mut slots = faults.iter_mut().filter(|(_, f)| match f {
            Fault::CutLink { link, .. } | Fault::DelayLink { link, .. } => !between_services(link),
            Fault::DelayDatabase { .. } => true,
            Fault::KillService { .. } => {
                kills += 1;
                kills > 1
            }
            _ => false,
        });
        let mut left = Vec::new();
        for f in must {
            // Faults run one after another: a longer one only pushes the next ones back.
            match slots.next() {
                Some(slot) => slot.1 = f,
                None => left.push(f),
            }
        }
        if phase == Phase::Distributed {
            for f in left {
                faults.push((at, f));
                at += Duration::from_secs(6);
            }
        }
        Plan { cards, shipments, faults, workload: size.workload, concurrency: size.concurrency }
    }

    /// A digest of the schedule, printed so two runs of one seed can be seen to share it.
    pub fn digest(&self) -> String {
        let text = format!("{:?}{:?}{:?}", self.cards, self.shipments, self.faults);
        // FNV-1a: stable across builds, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributed_schedules_kill_one_service_and_cut_every_kind_of_link() {
        for seed in 0..64 {
            let plan = Plan::new(seed, Size::new(true), Phase::Distributed);
            let f = &plan.faults;
            assert!(f.iter().any(|(_, f)| matches!(f, Fault::KillService { .. })), "seed {seed}: {f:?}");
            assert!(!f.iter().any(|(_, f)| matches!(f, Fault::Kill { .. })), "seed {seed}: {f:?}");
            assert!(f.iter().any(|(_, f)| matches!(f, Fault::CutDatabase { .. })), "seed {seed}: {f:?}");
            assert!(f.iter().any(|(_, f)| matches!(f, Fault::CutBroker { .. })), "seed {seed}: {f:?}");
            assert!(
                f.iter().any(|(_, f)| matches!(
                    f,
                    Fault::CutLink {
                        link: Link::RegistryFromServices
                            | Link::CoordinatorFromAdapters
                            | Link::AdapterFromCoordinator(_),
                        ..
                    } | Fault::DelayLink {
                        link: Link::RegistryFromServices
                            | Link::CoordinatorFromAdapters
                            | Link::AdapterFromCoordinator(_),
                        ..
                    }
                )),
                "seed {seed}: {f:?}"
            );
        }
    }

    #[test]
    fn the_other_phases_keep_their_schedules() {
        // The digests of docs/reliability.md's seed 8 quick run.
        assert_eq!(Plan::new(8, Size::new(true), Phase::Embedded).digest(), "8c800c756c1d4b34");
        assert_eq!(Plan::new(8, Size::new(true), Phase::PostgresKafka).digest(), "44e204f1b40a9b24");
    }
}
