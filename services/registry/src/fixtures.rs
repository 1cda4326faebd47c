//! Cards ready for the next step of their life, made through the public gRPC API: for tests, the demo
//! and benchmarks of the services that stand on the registry (bank adapters, events). Compiled only
//! with the `fixtures` feature.

use socialcard_domain::citizen_id::check_char;
use socialcard_domain::numbers::luhn_check_digit;
use socialcard_proto::bank::v1 as bank_pb;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1 as pb;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use tonic::transport::Channel;

use crate::storage::{
    AuditRecord, BatchCommit, BatchSnapshot, CardRecord, Commit, IdempotencyRecord, PersonRecord, RegistryStore,
    StoreError, TableCounts,
};

fn key() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn actor(channel: pb::Channel) -> Option<pb::Actor> {
    Some(pb::Actor {
        channel: channel as i32,
        operator_id: "fixture".into(),
        site_id: "site-1".into(),
        ..Default::default()
    })
}

fn in_person() -> Option<pb::Documents> {
    Some(pb::Documents {
        presenter: pb::Presenter::Holder as i32,
        holder_id_card: true,
        card_presented: true,
        ..Default::default()
    })
}

/// A valid citizen ID for the `n`-th adult (born 1950-1999 in Shanghai's Xuhui district), distinct per `n`
/// up to 18 million.
pub fn adult_citizen_id(n: u64) -> String {
    let birth = time::macros::date!(1950 - 01 - 01) + time::Duration::days((n % 18_000) as i64);
    let first17 =
        format!("310104{:04}{:02}{:02}{:03}", birth.year(), birth.month() as u8, birth.day(), n / 18_000 % 1000);
    format!("{first17}{}", check_char(first17.as_bytes()) as char)
}

/// A card with its holder, as the fixtures made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixtureCard {
    pub card_id: String,
    pub card_number: String,
}

/// Registers the `n`-th adult and takes a card at `bank` from application to collection (five card
/// events: submitted, approved, production started, produced, collected).
pub async fn collected_card(
    c: &mut RegistryServiceClient<Channel>,
    n: u64,
    bank: &str,
    bin: &str,
) -> Result<FixtureCard, tonic::Status> {
    let card = produced_card(c, n, bank, bin).await?;
    collect(c, &card.card_id).await?;
    Ok(card)
}

/// The same card up to production (four card events), not yet collected.
pub async fn produced_card(
    c: &mut RegistryServiceClient<Channel>,
    n: u64,
    bank: &str,
    bin: &str,
) -> Result<FixtureCard, tonic::Status> {
    let card = started_card(c, n, bank).await?;
    c.record_production_result(pb::RecordProductionResultRequest {
        idempotency_key: key(),
        card_id: card.card_id.clone(),
        actor: actor(pb::Channel::Production),
        result: Some(pb::record_production_result_request::Result::AccountNumber(account_number(n, bin))),
    })
    .await?;
    Ok(card)
}

/// The `n`-th account number under the bank's `bin` (Luhn-checked, 19 digits).
pub fn account_number(n: u64, bin: &str) -> String {
    let body = format!("{bin}{:0width$}", n, width = 18usize.saturating_sub(bin.len()));
    format!("{body}{}", luhn_check_digit(&body))
}

/// The same card sent to production with its card number drawn (three card events), waiting for the
/// bank's account: what a bank's account opening (`ConfirmAccountOpening`) answers for.
pub async fn started_card(
    c: &mut RegistryServiceClient<Channel>,
    n: u64,
    bank: &str,
) -> Result<FixtureCard, tonic::Status> {
    let id = adult_citizen_id(n);
    c.register_person(pb::RegisterPersonRequest {
        idempotency_key: key(),
        citizen_id: id.clone(),
        name: "Fixture".into(),
        phone: "13800000000".into(),
    })
    .await?;
    let card = c
        .submit_application(pb::SubmitApplicationRequest {
            idempotency_key: key(),
            citizen_id: id,
            actor: actor(pb::Channel::CommunityPoint),
            documents: in_person(),
            card_type: pb::CardType::Adult as i32,
            holder_status: pb::HolderStatus::Unemployed as i32,
            bank_code: bank.into(),
            photo: Some(pb::Photo { source: pb::PhotoSource::CommunityPoint as i32, ..Default::default() }),
            backup_point_id: "point-1".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .card
        .unwrap_or_default();
    let card_id = card.card_id;
    c.review_application(pb::ReviewApplicationRequest {
        idempotency_key: key(),
        card_id: card_id.clone(),
        actor: actor(pb::Channel::BureauWindow),
        decision: pb::ReviewDecision::Approve as i32,
        reason: String::new(),
    })
    .await?;
    let started = c
        .start_production(pb::StartProductionRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(pb::Channel::Production),
            batch_id: "fixture".into(),
        })
        .await?
        .into_inner()
        .card
        .unwrap_or_default();
    Ok(FixtureCard { card_id, card_number: started.card_number })
}

/// Records a produced card's collection at a community point (the holder in person).
pub async fn collect(c: &mut RegistryServiceClient<Channel>, card_id: &str) -> Result<(), tonic::Status> {
    c.record_collection(pb::RecordCollectionRequest {
        idempotency_key: key(),
        card_id: card_id.to_string(),
        actor: actor(pb::Channel::CommunityPoint),
        method: pb::CollectionMethod::PickedUpAtPoint as i32,
        collected_at: None,
        documents: in_person(),
    })
    .await?;
    Ok(())
}

/// Cards `first..first + count` at the bank behind `adapter`, made the way a bank's cards are: sent to
/// production at the registry, their accounts opened through the bank's adapter (`ConfirmAccountOpening`,
/// which also makes the adapter know them), then collected. Returns them in order.
pub async fn opened_at_bank(
    registry: &mut RegistryServiceClient<Channel>,
    adapter: &mut BankCardServiceClient<Channel>,
    first: u64,
    count: u64,
    bank: &str,
    bin: &str,
) -> Result<Vec<FixtureCard>, tonic::Status> {
    let mut cards = Vec::new();
    for n in first..first + count {
        cards.push(started_card(registry, n, bank).await?);
    }
    let numbered: Vec<(u64, &FixtureCard)> = (first..).zip(&cards).collect();
    for chunk in numbered.chunks(100) {
        let results = chunk
            .iter()
            .map(|&(n, c)| bank_pb::AccountOpeningResult {
                card_id: c.card_id.clone(),
                result: Some(bank_pb::account_opening_result::Result::AccountNumber(account_number(n, bin))),
            })
            .collect();
        let answer = adapter
            .confirm_account_opening(bank_pb::ConfirmAccountOpeningRequest {
                idempotency_key: key(),
                batch_id: format!("fixture-{first}"),
                results,
            })
            .await?
            .into_inner();
        if let Some(refused) = answer.outcomes.iter().find(|o| !o.accepted) {
            return Err(tonic::Status::failed_precondition(format!(
                "the bank refused card {}: {}",
                refused.card_id, refused.reason
            )));
        }
    }
    for c in &cards {
        collect(registry, &c.card_id).await?;
    }
    Ok(cards)
}

/// A test's hook on the writes of the registry's real store (see [`HookedStore`]).
#[async_trait::async_trait]
pub trait WriteHook: Send + Sync + std::fmt::Debug {
    /// Runs before `commit`; an error is the commit's answer, and nothing is written.
    async fn before_commit(&self, _inner: &dyn RegistryStore, _commit: &Commit) -> Result<(), StoreError> {
        Ok(())
    }
    /// Runs before `commit_batch`; an error is the commit's answer, and nothing is written.
    async fn before_commit_batch(&self, _inner: &dyn RegistryStore, _commit: &BatchCommit) -> Result<(), StoreError> {
        Ok(())
    }
    /// Sees what `commit_batch` answered.
    fn after_commit_batch(&self, _result: &Result<(), StoreError>) {}
}

/// The registry's real store with a test's [`WriteHook`] on its writes: a database going down, a slow
/// commit, a concurrent writer getting in first. Everything else goes to the store as it is.
#[derive(Debug)]
pub struct HookedStore<H> {
    pub inner: std::sync::Arc<dyn RegistryStore>,
    pub hook: H,
}

#[async_trait::async_trait]
impl<H: WriteHook> RegistryStore for HookedStore<H> {
    async fn person(&self, citizen_id: &str) -> Result<Option<PersonRecord>, StoreError> {
        self.inner.person(citizen_id).await
    }
    async fn card(&self, card_id: &str) -> Result<Option<CardRecord>, StoreError> {
        self.inner.card(card_id).await
    }
    async fn card_by_number(&self, card_number: &str) -> Result<Option<CardRecord>, StoreError> {
        self.inner.card_by_number(card_number).await
    }
    async fn cards_of(&self, citizen_id: &str) -> Result<Vec<CardRecord>, StoreError> {
        self.inner.cards_of(citizen_id).await
    }
    async fn idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.inner.idempotency(key).await
    }
    async fn audit_trail(&self, card_id: &str) -> Result<Vec<(i64, AuditRecord)>, StoreError> {
        self.inner.audit_trail(card_id).await
    }
    async fn audit_chain(
        &self,
        card_id: Option<&str>,
        after: Option<(String, i64)>,
        limit: i64,
    ) -> Result<Vec<crate::audit_chain::ChainedAudit>, StoreError> {
        self.inner.audit_chain(card_id, after, limit).await
    }
    async fn next_sequence(&self, name: &str) -> Result<i64, StoreError> {
        self.inner.next_sequence(name).await
    }
    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        self.hook.before_commit(self.inner.as_ref(), &commit).await?;
        self.inner.commit(commit).await
    }
    async fn counts(&self) -> Result<TableCounts, StoreError> {
        self.inner.counts().await
    }
    async fn batch_snapshot(&self, citizen_ids: &[String], keys: &[String]) -> Result<BatchSnapshot, StoreError> {
        self.inner.batch_snapshot(citizen_ids, keys).await
    }
    async fn reserve_sequence(&self, name: &str, count: i64) -> Result<i64, StoreError> {
        self.inner.reserve_sequence(name, count).await
    }
    async fn commit_batch(&self, commit: BatchCommit) -> Result<(), StoreError> {
        self.hook.before_commit_batch(self.inner.as_ref(), &commit).await?;
        let result = self.inner.commit_batch(commit).await;
        self.hook.after_commit_batch(&result);
        result
    }
    fn holder_key(&self, citizen_id: &str) -> String {
        self.inner.holder_key(citizen_id)
    }
}
