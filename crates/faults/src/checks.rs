//! After the faults have healed: what the clients were told against what the services hold, card by
//! card and shipment by shipment, through the public APIs. Each check counts what it looked at and
//! what broke; any broken count fails the run.

use std::collections::{BTreeMap, BTreeSet};

use socialcard_proto::bank::v1 as bank;
use socialcard_proto::loss::v1 as loss;
use socialcard_proto::postal::v1 as postal;
use socialcard_proto::registry::v1 as reg;

use crate::workload::{CardRecord, Clients, Journal, ShipmentRecord};

/// The figures of one check pass.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub cards: u64,
    pub activations_acked: u64,
    pub activations_lost: u64,
    pub audit_rows: u64,
    pub audit_keys: u64,
    pub audit_duplicates: u64,
    pub losses_acked: u64,
    pub losses_not_locked_both_sides: u64,
    pub unlocks_acked: u64,
    pub unlocks_not_effective: u64,
    pub sides_disagree: u64,
    pub shipments: u64,
    pub courier_events_acked: u64,
    pub courier_events_missing: u64,
    pub courier_events_duplicated: u64,
    pub shipments_went_backwards: u64,
    pub shipments_wrong_final_status: u64,
    pub collections_not_propagated: u64,
    pub unreadable: u64,
    /// The first few broken things, for the report.
    pub examples: Vec<String>,
}

impl Figures {
    pub fn violations(&self) -> u64 {
        self.activations_lost
            + self.audit_duplicates
            + self.losses_not_locked_both_sides
            + self.unlocks_not_effective
            + self.sides_disagree
            + self.courier_events_missing
            + self.courier_events_duplicated
            + self.shipments_went_backwards
            + self.shipments_wrong_final_status
            + self.collections_not_propagated
            + self.unreadable
    }

    fn broke(&mut self, what: String) {
        if self.examples.len() < 12 {
            self.examples.push(what);
        }
    }
}

fn social(s: i32) -> reg::SocialState {
    reg::SocialState::try_from(s).unwrap_or(reg::SocialState::Unspecified)
}

fn financial(s: i32) -> reg::FinancialState {
    reg::FinancialState::try_from(s).unwrap_or(reg::FinancialState::Unspecified)
}

/// Where a status stands on the shipment's path (postal's own order); exceptions do not move it.
fn rank(s: i32) -> Option<u8> {
    use postal::ShipmentStatus as S;
    Some(match S::try_from(s).ok()? {
        S::Pending => 0,
        S::InfoReceived => 1,
        S::InTransit => 2,
        S::OutForDelivery => 3,
        S::AttemptFailed => 4,
        S::AvailableForPickup => 5,
        S::Delivered | S::PickedUp | S::Returned | S::Withdrawn => 6,
        S::Exception | S::Unspecified => return None,
    })
}

fn status_of(label: &str) -> i32 {
    postal::ShipmentStatus::from_str_name(&format!("SHIPMENT_STATUS_{}", label.to_ascii_uppercase()))
        .map(|s| s as i32)
        .unwrap_or(0)
}

pub async fn run(c: &Clients, journal: &Journal) -> Figures {
    let mut f = Figures::default();
    for (i, card) in journal.cards.iter().enumerate() {
        check_card(c, i, card, &mut f).await;
    }
    for (i, s) in journal.shipments.iter().enumerate() {
        check_shipment(c, i, s, &mut f).await;
    }
    f
}

async fn check_card(c: &Clients, i: usize, rec: &CardRecord, f: &mut Figures) {
    f.cards += 1;
    let mut registry = c.registry.clone();
    let answer = registry
        .get_card(reg::GetCardRequest { lookup: Some(reg::get_card_request::Lookup::CardId(rec.card_id.clone())) })
        .await;
    let Ok(card) = answer.map(|r| r.into_inner().card.unwrap_or_default()) else {
        f.unreadable += 1;
        f.broke(format!("card {i}: GetCard failed"));
        return;
    };
    let Ok(audit) = c
        .registry
        .clone()
        .list_audit_trail(reg::ListAuditTrailRequest { card_id: rec.card_id.clone() })
        .await
        .map(|r| r.into_inner().entries)
    else {
        f.unreadable += 1;
        f.broke(format!("card {i}: ListAuditTrail failed"));
        return;
    };
    // Each transition once: no (action, idempotency key) twice in the card's trail.
    f.audit_rows += audit.len() as u64;
    let mut seen: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for e in audit.iter().filter(|e| !e.idempotency_key.is_empty()) {
        *seen.entry((e.action.as_str(), e.idempotency_key.as_str())).or_default() += 1;
    }
    f.audit_keys += seen.len() as u64;
    for ((action, key), n) in &seen {
        if *n > 1 {
            f.audit_duplicates += n - 1;
            f.broke(format!("card {i}: {action} under key {key} {n} times in the audit trail"));
        }
    }
    let Some(activation_key) = &rec.activated else { return };
    f.activations_acked += 1;
    let Some(adapter) = c.banks.get(&rec.bank) else { return };
    let Ok(bank_side) = adapter
        .clone()
        .query_card(bank::QueryCardRequest { card_number: rec.card_number.clone() })
        .await
        .map(|r| r.into_inner())
    else {
        f.unreadable += 1;
        f.broke(format!("card {i}: QueryCard at {} failed", rec.bank));
        return;
    };
    let (s, fin, bank_fin) =
        (social(card.social_state), financial(card.financial_state), financial(bank_side.financial_state));
    // The registry records the bank's activation under a key derived from the bank core's.
    let registry_key = format!("bank:{}:{activation_key}", rec.bank);
    let recorded = audit.iter().any(|e| e.idempotency_key == registry_key);
    if !recorded
        || s == reg::SocialState::NotActivated
        || fin == reg::FinancialState::NotActivated
        || bank_fin == reg::FinancialState::NotActivated
    {
        f.activations_lost += 1;
        f.broke(format!(
            "card {i}: activation acknowledged to {} but registry social {s:?} financial {fin:?}, adapter {bank_fin:?}, audited {recorded}",
            rec.bank
        ));
        return;
    }
    if rec.ambiguous {
        return;
    }
    if fin != bank_fin {
        f.sides_disagree += 1;
        f.broke(format!("card {i}: registry financial {fin:?}, adapter {bank_fin:?}"));
    }
    match (rec.loss, rec.unlocked_social, rec.unlocked_financial) {
        (None, _, _) => {
            if s != reg::SocialState::Active || fin != reg::FinancialState::Active {
                f.activations_lost += 1;
                f.broke(format!("card {i}: activated, no loss, but social {s:?} financial {fin:?}"));
            }
        }
        (Some(via), false, false) => {
            f.losses_acked += 1;
            let cases = c
                .loss
                .clone()
                .list_cases(loss::ListCasesRequest {
                    card_id: rec.card_id.clone(),
                    page_size: 50,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().cases)
                .unwrap_or_default();
            let locked_case = cases.iter().any(|k| k.state == loss::CaseState::Locked as i32);
            if s != reg::SocialState::LossLocked
                || fin != reg::FinancialState::Frozen
                || bank_fin != reg::FinancialState::Frozen
                || !locked_case
            {
                f.losses_not_locked_both_sides += 1;
                let states: Vec<String> = cases
                    .iter()
                    .map(|k| {
                        format!("{:?}", loss::CaseState::try_from(k.state).unwrap_or(loss::CaseState::Unspecified))
                    })
                    .collect();
                f.broke(format!(
                    "card {i}: {via:?} acknowledged; social {s:?}, financial {fin:?}, adapter {bank_fin:?}, cases {states:?}"
                ));
            }
        }
        (Some(_), true, true) => {
            f.losses_acked += 1;
            f.unlocks_acked += 1;
            if s != reg::SocialState::Active
                || fin != reg::FinancialState::Active
                || bank_fin != reg::FinancialState::Active
            {
                f.unlocks_not_effective += 1;
                f.broke(format!(
                    "card {i}: unlocked on both sides; social {s:?}, financial {fin:?}, adapter {bank_fin:?}"
                ));
            }
        }
        // One side's unlock without the other's: only an unanswered call leaves that, and it is reported.
        (Some(_), _, _) => f.losses_acked += 1,
    }
}

async fn check_shipment(c: &Clients, i: usize, rec: &ShipmentRecord, f: &mut Figures) {
    f.shipments += 1;
    let Ok(shipment) = c
        .postal
        .clone()
        .get_shipment(postal::GetShipmentRequest {
            lookup: Some(postal::get_shipment_request::Lookup::Waybill(rec.waybill.clone())),
        })
        .await
        .map(|r| r.into_inner().shipment.unwrap_or_default())
    else {
        f.unreadable += 1;
        f.broke(format!("shipment {i}: GetShipment failed"));
        return;
    };
    // Every acknowledged courier event is in the history exactly once.
    let mut in_timeline: BTreeMap<&str, u64> = BTreeMap::new();
    for e in &shipment.timeline {
        if let Some(u) = &e.update
            && !u.courier_event_id.is_empty()
        {
            *in_timeline.entry(u.courier_event_id.as_str()).or_default() += 1;
        }
    }
    let acked: BTreeSet<&str> = rec.acked.iter().map(|(id, _, _)| id.as_str()).collect();
    f.courier_events_acked += acked.len() as u64;
    for id in &acked {
        match in_timeline.get(id).copied().unwrap_or(0) {
            0 => {
                f.courier_events_missing += 1;
                f.broke(format!("shipment {i}: acknowledged event {id} not in the timeline"));
            }
            1 => {}
            n => {
                f.courier_events_duplicated += n - 1;
                f.broke(format!("shipment {i}: event {id} {n} times in the timeline"));
            }
        }
    }
    // The status never went back: the applied entries, in the order postal received them, climb.
    let mut applied: Vec<&postal::TimelineEntry> =
        shipment.timeline.iter().filter(|e| e.outcome == postal::UpdateOutcome::Applied as i32).collect();
    applied.sort_by_key(|e| e.received_at.map(|t| (t.seconds, t.nanos)).unwrap_or_default());
    let mut high = 0u8;
    for e in applied {
        if let Some(r) = e.update.as_ref().and_then(|u| rank(u.status)) {
            if r < high {
                f.shipments_went_backwards += 1;
                f.broke(format!("shipment {i}: status went back to rank {r} after {high}"));
                break;
            }
            high = r;
        }
    }
    if rec.ambiguous {
        return;
    }
    // It ends where the furthest acknowledged step put it.
    let furthest = rec
        .acked
        .iter()
        .filter(|(_, _, k)| *k == crate::plan::CourierKind::Step)
        .map(|(_, s, _)| *s)
        .max_by_key(|s| rank(status_of(s)));
    if let Some(expected) = furthest
        && shipment.status != status_of(expected)
    {
        f.shipments_wrong_final_status += 1;
        f.broke(format!(
            "shipment {i}: ends {:?}, the courier's furthest step was {expected}",
            postal::ShipmentStatus::try_from(shipment.status).unwrap_or(postal::ShipmentStatus::Unspecified)
        ));
    }
    // Delivered or picked up: the registry has the card collected (R17), from postal's event.
    if matches!(furthest, Some("delivered" | "picked_up")) {
        let card = c
            .registry
            .clone()
            .get_card(reg::GetCardRequest { lookup: Some(reg::get_card_request::Lookup::CardId(rec.card_id.clone())) })
            .await
            .map(|r| r.into_inner().card.unwrap_or_default());
        if !card.is_ok_and(|k| k.physical_state == reg::PhysicalState::Collected as i32) {
            f.collections_not_propagated += 1;
            f.broke(format!("shipment {i}: {} acknowledged, the registry has no collection", furthest.unwrap_or("")));
        }
    }
}
