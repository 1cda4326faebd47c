//! The registry's use cases. Each mutating call runs the same way: check the idempotency key (replay or
//! refuse a reuse), load what the rule needs, let the domain decide, then commit the card, audit and
//! outbox rows and the stored answer in one transaction. A concurrent change to the same card or holder
//! makes the commit fail on its version check, and the call is planned again from fresh state.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use sha2::{Digest, Sha256};
use socialcard_domain::card::{DeliveryAddress, validate_pin};
use socialcard_domain::channel::Context;
use socialcard_domain::photo::{PhotoSource, validate_upload};
use socialcard_domain::{
    Application, BankAccountNumber, BankDirectory, Card, CardNumber, CardType, CitizenId, CityPolicy, Rejection,
    RejectionKind,
};
use socialcard_proto::events::v1 as ev;
use socialcard_proto::events::v1::card_event::Kind;
use socialcard_proto::registry::v1 as pb;
use socialcard_server::{ApiError, Clock};
use time::OffsetDateTime;

use crate::convert::{self, MAX_TEXT};
use crate::pin::PinHasher;
use crate::storage::{
    AuditRecord, CardRecord, CardWrite, Commit, IdempotencyRecord, OutboxRecord, PersonRecord, PersonWrite,
    RegistryStore, StoreError,
};

/// The topic card events are published to (issue 3's relay reads the outbox).
pub const CARD_TOPIC: &str = "socialcard.card.v1";
pub const SOURCE: &str = "registry";
const MAX_ATTEMPTS: u32 = 8;

#[derive(Clone, Debug)]
pub struct RegistryConfig {
    pub policy: CityPolicy,
    pub banks: BankDirectory,
    /// The key under which social PINs are digested.
    pub pin_key: Vec<u8>,
    /// The series letter of card numbers this registry issues.
    pub card_series: char,
    /// 32 bytes: personal data is sealed at rest under it, citizen IDs are stored as its blind index.
    pub data_key: Vec<u8>,
}

impl RegistryConfig {
    /// Shanghai's policy and banks. The data key is derived from the PIN key unless set apart (`up` keeps
    /// its own random data key, or takes `SOCIALCARD_DATA_KEY`).
    pub fn shanghai(pin_key: Vec<u8>) -> Self {
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&pin_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(b"socialcard/registry/data-key/v1");
        let data_key = mac.finalize().into_bytes().to_vec();
        Self { policy: CityPolicy::shanghai(), banks: BankDirectory::shanghai(), pin_key, card_series: 'A', data_key }
    }
}

#[derive(Clone, Debug)]
pub struct Registry {
    // crate-visible for the batch import (`crate::batch`), which applies the same rules in bulk.
    pub(crate) store: Arc<dyn RegistryStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) policy: Arc<CityPolicy>,
    pub(crate) banks: Arc<BankDirectory>,
    pub(crate) pins: PinHasher,
    pub(crate) series: char,
}

/// What one attempt of a call would write, and what it answers.
struct Plan<R> {
    commit: Commit,
    response: R,
}

impl<R> Plan<R> {
    fn new(response: R) -> Self {
        Self { commit: Commit::default(), response }
    }
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Duplicate(what) => ApiError::Rejected(Rejection::new(
            RejectionKind::AlreadyExists,
            if what == "person" { "PERSON_EXISTS" } else { "ALREADY_EXISTS" },
            format!("the {what} already exists"),
        )),
        StoreError::VersionConflict | StoreError::IdempotencyConflict => ApiError::Rejected(Rejection::new(
            RejectionKind::Aborted,
            "CONCURRENT_CHANGE",
            "a concurrent change won; retry",
        )),
        StoreError::Unavailable(m) => ApiError::Unavailable(m),
        StoreError::Corrupt(m) => ApiError::Internal(m),
    }
}

fn request_hash(operation: &str, request: &impl Message) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(operation.as_bytes());
    h.update([0]);
    h.update(request.encode_to_vec());
    h.finalize().to_vec()
}

fn replay<R: Message + Default>(stored: &IdempotencyRecord, operation: &str, hash: &[u8]) -> Result<R, ApiError> {
    if stored.operation != operation || stored.request_hash != hash {
        return Err(ApiError::Rejected(Rejection::new(
            RejectionKind::AlreadyExists,
            "IDEMPOTENCY_KEY_REUSED",
            "this idempotency key was used for another request",
        )));
    }
    R::decode(stored.response.as_slice()).map_err(|e| ApiError::Internal(format!("stored response unreadable: {e}")))
}

pub(crate) fn event_type(kind: &Kind) -> &'static str {
    match kind {
        Kind::ApplicationSubmitted(_) => "socialcard.card.v1.ApplicationSubmitted",
        Kind::ApplicationApproved(_) => "socialcard.card.v1.ApplicationApproved",
        Kind::ApplicationRejected(_) => "socialcard.card.v1.ApplicationRejected",
        Kind::ProductionStarted(_) => "socialcard.card.v1.ProductionStarted",
        Kind::CardProduced(_) => "socialcard.card.v1.CardProduced",
        Kind::ProductionFailed(_) => "socialcard.card.v1.ProductionFailed",
        Kind::ShipmentProgressed(_) => "socialcard.card.v1.ShipmentProgressed",
        Kind::CardCollected(_) => "socialcard.card.v1.CardCollected",
        Kind::ReturnedForRemake(_) => "socialcard.card.v1.ReturnedForRemake",
        Kind::SocialActivated(_) => "socialcard.card.v1.SocialActivated",
        Kind::FinancialActivationRecorded(_) => "socialcard.card.v1.FinancialActivationRecorded",
        Kind::SocialLossLocked(_) => "socialcard.card.v1.SocialLossLocked",
        Kind::SocialUnlocked(_) => "socialcard.card.v1.SocialUnlocked",
        Kind::SocialPinLocked(_) => "socialcard.card.v1.SocialPinLocked",
        Kind::SocialPinReset(_) => "socialcard.card.v1.SocialPinReset",
        Kind::SocialPinChanged(_) => "socialcard.card.v1.SocialPinChanged",
        Kind::CardCancelled(_) => "socialcard.card.v1.CardCancelled",
        Kind::CardReplaced(_) => "socialcard.card.v1.CardReplaced",
        Kind::FinancialActivationCancelled(_) => "socialcard.card.v1.FinancialActivationCancelled",
        Kind::SocialDisabled(_) => "socialcard.card.v1.SocialDisabled",
        Kind::TemporaryCardExpired(_) => "socialcard.card.v1.TemporaryCardExpired",
        Kind::FinancialFreezeRecorded(_) => "socialcard.card.v1.FinancialFreezeRecorded",
    }
}

impl Registry {
    pub fn new(store: Arc<dyn RegistryStore>, clock: Arc<dyn Clock>, config: RegistryConfig) -> Self {
        Self {
            store,
            clock,
            policy: Arc::new(config.policy),
            banks: Arc::new(config.banks),
            pins: PinHasher::new(config.pin_key),
            series: config.card_series,
        }
    }

    pub fn store(&self) -> &Arc<dyn RegistryStore> {
        &self.store
    }

    pub fn policy(&self) -> &CityPolicy {
        &self.policy
    }

    fn today(&self, now: OffsetDateTime) -> time::Date {
        self.policy.local_date(now)
    }

    /// The idempotent, optimistically concurrent skeleton of every mutating call.
    async fn run<Req, Resp, F, Fut>(
        &self,
        operation: &'static str,
        key: &str,
        request: &Req,
        plan: F,
    ) -> Result<Resp, ApiError>
    where
        Req: Message,
        Resp: Message + Default,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Plan<Resp>, ApiError>>,
    {
        let key = convert::idempotency_key(key)?;
        let hash = request_hash(operation, request);
        if let Some(stored) = self.store.idempotency(&key).await.map_err(store_error)? {
            return replay(&stored, operation, &hash);
        }
        for attempt in 0..MAX_ATTEMPTS {
            let Plan { mut commit, response } = match plan().await {
                Ok(p) => p,
                Err(e) => {
                    // A twin of this request may have committed since the check above, changing the
                    // state this plan was refused on: its stored answer is the answer.
                    if let Some(stored) = self.store.idempotency(&key).await.map_err(store_error)? {
                        return replay(&stored, operation, &hash);
                    }
                    return Err(e);
                }
            };
            commit.idempotency = Some(IdempotencyRecord {
                key: key.clone(),
                operation: operation.to_string(),
                request_hash: hash.clone(),
                response: response.encode_to_vec(),
            });
            match self.store.commit(commit).await {
                Ok(()) => return Ok(response),
                Err(StoreError::VersionConflict) => {
                    tracing::debug!(operation, attempt, "version conflict, planning again");
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 2 + 1)).await;
                }
                Err(StoreError::IdempotencyConflict) => {
                    let stored = self
                        .store
                        .idempotency(&key)
                        .await
                        .map_err(store_error)?
                        .ok_or_else(|| ApiError::Internal("idempotency row vanished".into()))?;
                    return replay(&stored, operation, &hash);
                }
                Err(e) => return Err(store_error(e)),
            }
        }
        Err(ApiError::Rejected(Rejection::new(
            RejectionKind::Aborted,
            "CONCURRENT_CHANGE",
            "the card kept changing concurrently; retry",
        )))
    }

    async fn load_card(&self, card_id: &str) -> Result<CardRecord, ApiError> {
        self.store
            .card(card_id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::Rejected(Rejection::not_found("CARD_NOT_FOUND", "no card with this id")))
    }

    /// The audit row and outbox event of one card change.
    #[allow(clippy::too_many_arguments)]
    fn record_change(
        &self,
        commit: &mut Commit,
        key: &str,
        action: &str,
        ctx: &Context,
        before: Option<&Card>,
        after: &Card,
        kind: Option<Kind>,
        now: OffsetDateTime,
    ) {
        commit.audit.push(AuditRecord {
            card_id: after.id.clone(),
            at: now,
            action: action.to_string(),
            channel: ctx.channel.as_str().to_string(),
            actor: serde_json::to_string(&ctx.actor).unwrap_or_default(),
            documents: serde_json::to_string(&ctx.documents).unwrap_or_default(),
            from_state: before.map(Card::state_label).unwrap_or_default(),
            to_state: after.state_label(),
            idempotency_key: key.to_string(),
        });
        if let Some(kind) = kind {
            let event_type = event_type(&kind);
            let event = ev::CardEvent {
                card_id: after.id.clone(),
                occurred_at: Some(convert::timestamp(now)),
                actor: Some(convert::actor_to_pb(ctx.channel, &ctx.actor)),
                card_version: after.version,
                idempotency_key: key.to_string(),
                kind: Some(kind),
            };
            commit.outbox.push(OutboxRecord {
                event_id: uuid::Uuid::now_v7().to_string(),
                topic: CARD_TOPIC.to_string(),
                key: after.id.clone(),
                event_type: event_type.to_string(),
                payload: event.encode_to_vec(),
                occurred_at: now,
                source: SOURCE.to_string(),
                // The change's trace continues in whoever consumes the event.
                traceparent: socialcard_telemetry::current_traceparent(),
            });
        }
    }

    /// Plans a change of one card: `change` gets the stored card and returns the new one, the event
    /// and the answer.
    async fn change_card<R>(
        &self,
        key: &str,
        card_id: &str,
        action: &str,
        ctx: &Context,
        change: impl FnOnce(&CardRecord, OffsetDateTime) -> Result<(CardRecord, Option<Kind>, R), ApiError>,
    ) -> Result<Plan<R>, ApiError> {
        let before = self.load_card(card_id).await?;
        let now = self.clock.now();
        let (after, kind, response) = change(&before, now)?;
        let mut plan = Plan::new(response);
        self.record_change(&mut plan.commit, key, action, ctx, Some(&before.card), &after.card, kind, now);
        plan.commit.cards.push(CardWrite::Update(after));
        Ok(plan)
    }

    fn with_card(rec: &CardRecord, card: Card) -> CardRecord {
        CardRecord { card, pin_digest: rec.pin_digest.clone() }
    }

    // ---- persons ----

    pub async fn register_person(
        &self,
        req: pb::RegisterPersonRequest,
    ) -> Result<pb::RegisterPersonResponse, ApiError> {
        self.run("RegisterPerson", &req.idempotency_key, &req, || async {
            let now = self.clock.now();
            let id = CitizenId::parse(&req.citizen_id, self.today(now))?;
            let name = convert::text("name", &req.name, 50)?;
            if name.is_empty() {
                return Err(Rejection::invalid("name", "NAME_REQUIRED", "the holder's name is required").into());
            }
            let phone = convert::phone("phone", &req.phone)?;
            if self.store.person(id.expose()).await.map_err(store_error)?.is_some() {
                return Err(Rejection::new(
                    RejectionKind::AlreadyExists,
                    "PERSON_EXISTS",
                    "this person is registered already",
                )
                .into());
            }
            let record =
                PersonRecord { citizen_id: id.expose().to_string(), name, phone, registered_at: now, version: 1 };
            let mut plan = Plan::new(pb::RegisterPersonResponse { person: Some(person_to_pb(&record, &id)) });
            plan.commit.person = Some(PersonWrite::Insert(record));
            Ok(plan)
        })
        .await
    }

    pub async fn get_person(&self, req: pb::GetPersonRequest) -> Result<pb::GetPersonResponse, ApiError> {
        let id = CitizenId::parse(&req.citizen_id, self.today(self.clock.now()))?;
        let person = self.store.person(id.expose()).await.map_err(store_error)?.ok_or_else(|| {
            ApiError::Rejected(Rejection::not_found("PERSON_NOT_FOUND", "no person with this ID number"))
        })?;
        let cards = self.store.cards_of(id.expose()).await.map_err(store_error)?;
        Ok(pb::GetPersonResponse {
            person: Some(person_to_pb(&person, &id)),
            cards: cards.iter().map(|c| convert::card_to_pb(&c.card)).collect(),
        })
    }

    // ---- applications and the physical card ----

    pub async fn submit_application(
        &self,
        req: pb::SubmitApplicationRequest,
    ) -> Result<pb::SubmitApplicationResponse, ApiError> {
        self.run("SubmitApplication", &req.idempotency_key, &req, || async {
            let now = self.clock.now();
            let ctx = convert::context(req.actor.as_ref(), req.documents.as_ref())?;
            let holder = CitizenId::parse(&req.citizen_id, self.today(now))?;
            let card_type = convert::card_type(req.card_type)?;
            let holder_status = convert::holder_status(req.holder_status)?;
            let photo = req.photo.as_ref().ok_or_else(|| {
                Rejection::invalid("photo", "PHOTO_SOURCE_REQUIRED", "say where the photo comes from (R9)")
            })?;
            let photo_source = convert::photo_source(photo.source)?;
            if photo_source == PhotoSource::Upload {
                validate_upload(&photo.jpeg, &photo.file_name, holder.expose())?;
            } else if !photo.jpeg.is_empty() {
                return Err(Rejection::invalid(
                    "photo.jpeg",
                    "PHOTO_UNEXPECTED",
                    "only an upload carries the photo itself",
                )
                .into());
            }
            let delivery = req.delivery_address.as_ref().map(delivery_address).transpose()?;
            let replaces = if req.replaces_card_id.is_empty() {
                None
            } else {
                Some(convert::card_id(&req.replaces_card_id).map_err(|r| r.at("replaces_card_id"))?)
            };
            let bank_codes = req
                .payroll_bank_codes
                .iter()
                .map(|b| convert::text("payroll_bank_codes", b, 32))
                .collect::<Result<Vec<_>, _>>()?;
            let person = self
                .store
                .person(holder.expose())
                .await
                .map_err(store_error)?
                .ok_or_else(|| Rejection::not_found("PERSON_NOT_FOUND", "register the person before applying"))?;
            let holder_cards = self.store.cards_of(holder.expose()).await.map_err(store_error)?;
            let existing: Vec<Card> = holder_cards.iter().map(|c| c.card.clone()).collect();
            let app = Application {
                holder: holder.clone(),
                registered_phone: person.phone.clone(),
                card_type,
                holder_status,
                bank_code: convert::text("bank_code", &req.bank_code, 32)?,
                pension_bank_code: convert::optional_text("pension_bank_code", &req.pension_bank_code)?,
                payroll_bank_codes: bank_codes,
                employer_id: convert::optional_text("employer_id", &req.employer_id)?,
                photo_source,
                backup_point_id: convert::text("backup_point_id", &req.backup_point_id, 64)?,
                delivery,
                replaces: replaces.clone(),
            };
            let id = uuid::Uuid::now_v7().to_string();
            let card = Card::apply_for(id.clone(), app, &ctx, now, &self.policy, &self.banks, &existing)?;
            let pin = self.policy.initial_social_pin(&holder);
            let record = CardRecord { card: card.clone(), pin_digest: self.pins.digest(&id, &pin) };

            let mut plan = Plan::new(pb::SubmitApplicationResponse { card: Some(convert::card_to_pb(&card)) });
            plan.commit.person =
                Some(PersonWrite::Touch { citizen_id: person.citizen_id.clone(), expected_version: person.version });
            let submitted = Kind::ApplicationSubmitted(ev::ApplicationSubmitted {
                citizen_id_masked: holder.masked(),
                card_type: convert::card_type_to_pb(card.card_type) as i32,
                bank_code: card.bank_code.clone(),
                region_code: holder.region_code().to_string(),
                fee_fen: card.fee_fen,
                backup_point_id: card.backup_point_id.clone(),
                replaces_card_id: card.replaces.clone().unwrap_or_default(),
            });
            self.record_change(
                &mut plan.commit,
                &req.idempotency_key,
                "submit_application",
                &ctx,
                None,
                &card,
                Some(submitted),
                now,
            );
            plan.commit.cards.push(CardWrite::Insert(record));
            if let Some(old_id) = &replaces {
                let old = holder_cards
                    .iter()
                    .find(|c| &c.card.id == old_id)
                    .ok_or_else(|| ApiError::Internal("replaced card vanished".into()))?;
                let replaced = old.card.replace_with(&id)?;
                let kind = Kind::CardReplaced(ev::CardReplaced { replacement_card_id: id.clone() });
                self.record_change(
                    &mut plan.commit,
                    &req.idempotency_key,
                    "replace",
                    &ctx,
                    Some(&old.card),
                    &replaced,
                    Some(kind),
                    now,
                );
                plan.commit.cards.push(CardWrite::Update(Self::with_card(old, replaced)));
            }
            Ok(plan)
        })
        .await
    }

    pub async fn review_application(
        &self,
        req: pb::ReviewApplicationRequest,
    ) -> Result<pb::ReviewApplicationResponse, ApiError> {
        self.run("ReviewApplication", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), None)?;
            let card_id = convert::card_id(&req.card_id)?;
            let approve = match pb::ReviewDecision::try_from(req.decision) {
                Ok(pb::ReviewDecision::Approve) => true,
                Ok(pb::ReviewDecision::Reject) => false,
                Ok(pb::ReviewDecision::Unspecified) => {
                    return Err(Rejection::invalid("decision", "ENUM_UNSPECIFIED", "decision must be set").into());
                }
                Err(_) => {
                    return Err(
                        Rejection::invalid("decision", "UNKNOWN_ENUM_VALUE", "decision has an unknown value").into()
                    );
                }
            };
            let reason = convert::text("reason", &req.reason, MAX_TEXT)?;
            self.change_card(
                &req.idempotency_key,
                &card_id,
                if approve { "approve" } else { "reject" },
                &ctx,
                |rec, _| {
                    let card = rec.card.review(approve, &reason, &ctx)?;
                    let kind = if approve {
                        Kind::ApplicationApproved(ev::ApplicationApproved {})
                    } else {
                        Kind::ApplicationRejected(ev::ApplicationRejected { reason: reason.clone() })
                    };
                    let resp = pb::ReviewApplicationResponse { card: Some(convert::card_to_pb(&card)) };
                    Ok((Self::with_card(rec, card), Some(kind), resp))
                },
            )
            .await
        })
        .await
    }

    pub async fn start_production(
        &self,
        req: pb::StartProductionRequest,
    ) -> Result<pb::StartProductionResponse, ApiError> {
        self.run("StartProduction", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), None)?;
            let card_id = convert::card_id(&req.card_id)?;
            let batch_id = convert::text("batch_id", &req.batch_id, 64)?;
            let current = self.load_card(&card_id).await?;
            // Check the transition before a card number is drawn, so a refusal consumes none.
            current.card.start_production(CardNumber::issue(self.series, 0), &ctx)?;
            let number = match &current.card.card_number {
                Some(n) => n.clone(),
                None => CardNumber::issue(
                    self.series,
                    u64::try_from(self.store.next_sequence("card_number").await.map_err(store_error)?).unwrap_or(0),
                ),
            };
            self.change_card(&req.idempotency_key, &card_id, "start_production", &ctx, |rec, _| {
                let card = rec.card.start_production(number.clone(), &ctx)?;
                let kind = Kind::ProductionStarted(ev::ProductionStarted {
                    card_number: number.to_string(),
                    batch_id: batch_id.clone(),
                });
                let resp = pb::StartProductionResponse { card: Some(convert::card_to_pb(&card)) };
                Ok((Self::with_card(rec, card), Some(kind), resp))
            })
            .await
        })
        .await
    }

    pub async fn record_production_result(
        &self,
        req: pb::RecordProductionResultRequest,
    ) -> Result<pb::RecordProductionResultResponse, ApiError> {
        use pb::record_production_result_request::Result as R;
        self.run("RecordProductionResult", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), None)?;
            let card_id = convert::card_id(&req.card_id)?;
            let outcome = match &req.result {
                None => {
                    return Err(
                        Rejection::invalid("result", "RESULT_REQUIRED", "an account number or a failure").into()
                    );
                }
                Some(R::AccountNumber(a)) if a.is_empty() => None,
                Some(R::AccountNumber(a)) => Some(Ok(BankAccountNumber::parse(a)?)),
                Some(R::Failure(f)) => Some(Err(convert::production_failure(f)?)),
            };
            self.change_card(&req.idempotency_key, &card_id, "production_result", &ctx, |rec, now| {
                let (card, kind) = match outcome.clone() {
                    Some(Err(failure)) => {
                        let card = rec.card.production_failed(failure.clone(), &ctx)?;
                        (
                            card,
                            Kind::ProductionFailed(ev::ProductionFailed {
                                failure: Some(convert::production_failure_to_pb(&failure)),
                            }),
                        )
                    }
                    account => {
                        let card = rec.card.production_succeeded(
                            account.and_then(Result::ok),
                            &ctx,
                            now,
                            &self.policy,
                            &self.banks,
                        )?;
                        let kind = Kind::CardProduced(ev::CardProduced {
                            card_number: card.card_number.as_ref().map(ToString::to_string).unwrap_or_default(),
                            bank_code: card.bank_code.clone(),
                            backup_point_id: card.backup_point_id.clone(),
                            delivery_address: card.delivery.as_ref().map(delivery_to_pb),
                        });
                        (card, kind)
                    }
                };
                let resp = pb::RecordProductionResultResponse { card: Some(convert::card_to_pb(&card)) };
                Ok((Self::with_card(rec, card), Some(kind), resp))
            })
            .await
        })
        .await
    }

    pub async fn record_shipment_progress(
        &self,
        req: pb::RecordShipmentProgressRequest,
    ) -> Result<pb::RecordShipmentProgressResponse, ApiError> {
        self.run("RecordShipmentProgress", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), None)?;
            let card_id = convert::card_id(&req.card_id)?;
            let progress = convert::shipment_progress(req.progress)?;
            let waybill = convert::text("waybill", &req.waybill, 64)?;
            self.change_card(&req.idempotency_key, &card_id, "shipment_progress", &ctx, |rec, _| {
                let card = rec.card.shipment(progress, &ctx)?;
                let kind = Kind::ShipmentProgressed(ev::ShipmentProgressed {
                    progress: req.progress,
                    waybill: waybill.clone(),
                });
                let resp = pb::RecordShipmentProgressResponse { card: Some(convert::card_to_pb(&card)) };
                Ok((Self::with_card(rec, card), Some(kind), resp))
            })
            .await
        })
        .await
    }

    pub async fn record_collection(
        &self,
        req: pb::RecordCollectionRequest,
    ) -> Result<pb::RecordCollectionResponse, ApiError> {
        self.run("RecordCollection", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), req.documents.as_ref())?;
            let card_id = convert::card_id(&req.card_id)?;
            let method = convert::collection_method(req.method)?;
            let at = req.collected_at.as_ref().map(|t| convert::from_timestamp("collected_at", t)).transpose()?;
            let mut plan = self
                .change_card(&req.idempotency_key, &card_id, "collect", &ctx, |rec, now| {
                    let at = at.unwrap_or(now);
                    let card = rec.card.collect(method, at, &ctx, now)?;
                    let kind = Kind::CardCollected(ev::CardCollected {
                        method: req.method,
                        collected_at: Some(convert::timestamp(at)),
                        bank_code: card.bank_code.clone(),
                        card_type: convert::card_type_to_pb(card.card_type) as i32,
                        card_number: card.card_number.as_ref().map(|n| n.as_str().to_string()).unwrap_or_default(),
                        auto_lock_due_at: card.auto_lock_due(&self.policy).map(convert::timestamp),
                        minor_exchange_due_at: card.minor_exchange_due(&self.policy).map(convert::timestamp),
                        expires_at: card.expires_at.map(convert::timestamp),
                    });
                    let resp = pb::RecordCollectionResponse { card: Some(convert::card_to_pb(&card)) };
                    Ok((Self::with_card(rec, card), Some(kind), resp))
                })
                .await?;
            // R24: the formal card, once in the holder's hands, retires any temporary card.
            let collected = plan.commit.cards.first().map(|w| match w {
                CardWrite::Insert(r) | CardWrite::Update(r) => r.card.clone(),
            });
            if let Some(formal) = collected.filter(|c| c.card_type != CardType::Temporary) {
                let now = self.clock.now();
                for temp in self.store.cards_of(formal.holder.expose()).await.map_err(store_error)? {
                    if temp.card.card_type == CardType::Temporary && temp.card.physical.is_live() {
                        let retired = temp.card.retire_temporary()?;
                        let kind = Kind::CardCancelled(ev::CardCancelled {
                            reason: "retired by the formal card (R24)".into(),
                        });
                        self.record_change(
                            &mut plan.commit,
                            &req.idempotency_key,
                            "retire_temporary",
                            &ctx,
                            Some(&temp.card),
                            &retired,
                            Some(kind),
                            now,
                        );
                        plan.commit.cards.push(CardWrite::Update(Self::with_card(&temp, retired)));
                    }
                }
            }
            Ok(plan)
        })
        .await
    }

    pub async fn return_for_remake(
        &self,
        req: pb::ReturnForRemakeRequest,
    ) -> Result<pb::ReturnForRemakeResponse, ApiError> {
        self.run("ReturnForRemake", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), req.documents.as_ref())?;
            let card_id = convert::card_id(&req.card_id)?;
            let reason = convert::text("reason", &req.reason, MAX_TEXT)?;
            self.change_card(&req.idempotency_key, &card_id, "return_for_remake", &ctx, |rec, _| {
                let card = rec.card.return_for_remake(&reason, &ctx)?;
                let kind = Kind::ReturnedForRemake(ev::ReturnedForRemake { reason: reason.clone() });
                let resp = pb::ReturnForRemakeResponse { card: Some(convert::card_to_pb(&card)) };
                Ok((Self::with_card(rec, card), Some(kind), resp))
            })
            .await
        })
        .await
    }

    // ---- the social function ----

    pub async fn activate_social_function(
        &self,
        req: pb::ActivateSocialFunctionRequest,
    ) -> Result<pb::ActivateSocialFunctionResponse, ApiError> {
        self.run("ActivateSocialFunction", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), req.documents.as_ref())?;
            let card_id = convert::card_id(&req.card_id)?;
            self.change_card(&req.idempotency_key, &card_id, "activate_social", &ctx, |rec, now| {
                let card = rec.card.activate_social(&ctx, now)?;
                let resp = pb::ActivateSocialFunctionResponse { card: Some(convert::card_to_pb(&card)) };
                Ok((Self::with_card(rec, card), Some(Kind::SocialActivated(ev::SocialActivated {})), resp))
            })
            .await
        })
        .await
    }

    pub async fn record_financial_activation(
        &self,
        req: pb::RecordFinancialActivationRequest,
    ) -> Result<pb::RecordFinancialActivationResponse, ApiError> {
        self.run("RecordFinancialActivation", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), None)?;
            let card_id = convert::card_id(&req.card_id)?;
            let bank_code = convert::text("bank_code", &req.bank_code, 32)?;
            let face = convert::text("face_verification_ref", &req.face_verification_ref, MAX_TEXT)?;
            let presenter = convert::presenter(req.presenter)?;
            self.change_card(&req.idempotency_key, &card_id, "financial_activation", &ctx, |rec, _| {
                let (card, awaits) = rec.card.record_financial_activation(
                    &bank_code,
                    &face,
                    req.bank_pin_changed,
                    presenter,
                    &ctx,
                    &self.banks,
                )?;
                let kind = Kind::FinancialActivationRecorded(ev::FinancialActivationRecorded {
                    bank_code: bank_code.clone(),
                    social_awaits_bureau_unlock: awaits,
                });
                let resp = pb::RecordFinancialActivationResponse {
                    card: Some(convert::card_to_pb(&card)),
                    social_awaits_bureau_unlock: awaits,
                };
                Ok((Self::with_card(rec, card), Some(kind), resp))
            })
            .await
        })
        .await
    }

    pub async fn cancel_financial_activation(
        &self,
        req: pb::CancelFinancialActivationRequest,
    ) -> Result<pb::CancelFinancialActivationResponse, ApiError> {
        self.run("CancelFinancialActivation", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), None)?;
            if ctx.channel != socialcard_domain::Channel::BankBranch {
                return Err(Rejection::invalid(
                    "actor.channel",
                    "CHANNEL_NOT_ALLOWED",
                    "only the card's bank rolls its activation back",
                )
                .into());
            }
            let card_id = convert::card_id(&req.card_id)?;
            let bank_code = convert::text("bank_code", &req.bank_code, 32)?;
            self.banks.require("bank_code", &bank_code)?;
            let reason = convert::text("reason", &req.reason, MAX_TEXT)?;
            if reason.is_empty() {
                return Err(Rejection::invalid("reason", "REASON_REQUIRED", "say why the bank rolled back").into());
            }
            self.change_card(&req.idempotency_key, &card_id, "financial_activation_cancelled", &ctx, |rec, _| {
                let card = rec.card.cancel_financial_activation(&bank_code)?;
                let kind = Kind::FinancialActivationCancelled(ev::FinancialActivationCancelled {
                    bank_code: bank_code.clone(),
                    reason: reason.clone(),
                });
                let resp = pb::CancelFinancialActivationResponse { card: Some(convert::card_to_pb(&card)) };
                Ok((Self::with_card(rec, card), Some(kind), resp))
            })
            .await
        })
        .await
    }

    pub async fn lock_social_function(
        &self,
        req: pb::LockSocialFunctionRequest,
    ) -> Result<pb::LockSocialFunctionResponse, ApiError> {
        self.run("LockSocialFunction", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), req.documents.as_ref())?;
            let card_id = convert::card_id(&req.card_id)?;
            let kind = convert::loss_kind(req.loss_kind)?;
            self.change_card(&req.idempotency_key, &card_id, "loss_lock", &ctx, |rec, now| {
                let card = rec.card.report_loss(kind, &ctx, now, &self.policy)?;
                let event = Kind::SocialLossLocked(ev::SocialLossLocked { loss_kind: req.loss_kind });
                let resp = pb::LockSocialFunctionResponse { card: Some(convert::card_to_pb(&card)) };
                Ok((Self::with_card(rec, card), Some(event), resp))
            })
            .await
        })
        .await
    }

    pub async fn unlock_social_function(
        &self,
        req: pb::UnlockSocialFunctionRequest,
    ) -> Result<pb::UnlockSocialFunctionResponse, ApiError> {
        self.run("UnlockSocialFunction", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), req.documents.as_ref())?;
            let card_id = convert::card_id(&req.card_id)?;
            self.change_card(&req.idempotency_key, &card_id, "unlock", &ctx, |rec, _| {
                let previous = rec.card.social.loss_kind();
                let card = rec.card.unlock_social(&ctx)?;
                let event = Kind::SocialUnlocked(ev::SocialUnlocked {
                    previous_loss_kind: convert::loss_kind_to_pb(previous) as i32,
                });
                let resp = pb::UnlockSocialFunctionResponse { card: Some(convert::card_to_pb(&card)) };
                Ok((Self::with_card(rec, card), Some(event), resp))
            })
            .await
        })
        .await
    }

    // ---- social PINs (R29, R30) ----

    /// The loss coordinator's deadlines (R23, R24, R27 social lapse). The registry re-checks every date
    /// against its own clock, so an early or repeated timer changes nothing.
    pub async fn enforce_deadline(
        &self,
        req: pb::EnforceDeadlineRequest,
    ) -> Result<pb::EnforceDeadlineResponse, ApiError> {
        self.run("EnforceDeadline", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), None)?;
            if ctx.channel != socialcard_domain::Channel::Scheduler {
                return Err(Rejection::invalid(
                    "actor.channel",
                    "CHANNEL_NOT_ALLOWED",
                    "deadlines are enforced by the scheduler",
                )
                .into());
            }
            let card_id = convert::card_id(&req.card_id)?;
            let deadline = pb::Deadline::try_from(req.deadline)
                .ok()
                .filter(|d| *d != pb::Deadline::Unspecified)
                .ok_or_else(|| Rejection::invalid("deadline", "DEADLINE_UNKNOWN", "name the deadline to enforce"))?;
            let since =
                match deadline {
                    pb::Deadline::TemporaryLossExpiry => {
                        Some(req.since.as_ref().map(|t| convert::from_timestamp("since", t)).transpose()?.ok_or_else(
                            || Rejection::invalid("since", "FIELD_REQUIRED", "when the loss was reported"),
                        )?)
                    }
                    _ => None,
                };
            self.change_card(&req.idempotency_key, &card_id, "deadline", &ctx, |rec, now| {
                let (card, kind) = match deadline {
                    pb::Deadline::MinorExchange => (
                        rec.card.disable_unexchanged_minor(&ctx, now, &self.policy)?,
                        Kind::SocialDisabled(ev::SocialDisabled { deadline: req.deadline }),
                    ),
                    pb::Deadline::TemporaryCardExpiry => {
                        (rec.card.expire_temporary(&ctx, now)?, Kind::TemporaryCardExpired(ev::TemporaryCardExpired {}))
                    }
                    pb::Deadline::TemporaryLossExpiry | pb::Deadline::Unspecified => (
                        rec.card.lapse_temporary_loss(&ctx, since.unwrap_or(now), now, &self.policy)?,
                        Kind::SocialUnlocked(ev::SocialUnlocked { previous_loss_kind: pb::LossKind::Temporary as i32 }),
                    ),
                };
                let resp = pb::EnforceDeadlineResponse { card: Some(convert::card_to_pb(&card)) };
                Ok((Self::with_card(rec, card), Some(kind), resp))
            })
            .await
        })
        .await
    }

    /// Mirrors the freeze (or its lifting) that the card's bank adapter recorded (R26, R27); applied from
    /// the adapter's events, under a key derived from the event.
    pub async fn record_financial_freeze(&self, req: pb::RecordFinancialFreezeRequest) -> Result<(), ApiError> {
        self.run("RecordFinancialFreeze", &req.idempotency_key, &req, || async {
            let card_id = convert::card_id(&req.card_id)?;
            let bank_code = convert::text("bank_code", &req.bank_code, 32)?;
            self.banks.require("bank_code", &bank_code)?;
            let kind = if req.frozen { Some(convert::loss_kind(req.loss_kind)?) } else { None };
            let ctx = convert::context(
                Some(&pb::Actor {
                    channel: pb::Channel::BankBranch as i32,
                    operator_id: format!("bank-adapter.{bank_code}"),
                    site_id: bank_code.clone(),
                    ..Default::default()
                }),
                None,
            )?;
            self.change_card(&req.idempotency_key, &card_id, "financial_freeze", &ctx, |rec, _| {
                let card = match kind {
                    Some(kind) => rec.card.freeze_financial(&bank_code, kind)?,
                    None => rec.card.unfreeze_financial(&bank_code)?,
                };
                let event = Kind::FinancialFreezeRecorded(ev::FinancialFreezeRecorded {
                    bank_code: bank_code.clone(),
                    frozen: req.frozen,
                    loss_kind: req.loss_kind,
                });
                Ok((Self::with_card(rec, card), Some(event), ()))
            })
            .await
        })
        .await
    }

    pub async fn verify_social_pin(
        &self,
        req: pb::VerifySocialPinRequest,
    ) -> Result<pb::VerifySocialPinResponse, ApiError> {
        self.run("VerifySocialPin", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), None)?;
            let card_id = convert::card_id(&req.card_id)?;
            validate_pin("pin", &req.pin)?;
            let rec = self.load_card(&card_id).await?;
            let correct = self.pins.verify(&card_id, &req.pin, &rec.pin_digest);
            let (card, outcome) = rec.card.pin_attempt(correct, &self.policy)?;
            let mut plan = Plan::new(pb::VerifySocialPinResponse {
                verified: outcome.verified,
                remaining_attempts: outcome.remaining_attempts,
                locked: outcome.locked,
            });
            // A right PIN with no wrong ones before changes nothing; anything else is recorded.
            if !(correct && rec.card.pin.wrong_attempts == 0) {
                let event = pin_lock_event(&card, outcome.locked);
                self.record_change(
                    &mut plan.commit,
                    &req.idempotency_key,
                    if correct { "pin_verified" } else { "pin_wrong" },
                    &ctx,
                    Some(&rec.card),
                    &card,
                    event,
                    self.clock.now(),
                );
                plan.commit.cards.push(CardWrite::Update(Self::with_card(&rec, card)));
            }
            Ok(plan)
        })
        .await
    }

    pub async fn change_social_pin(
        &self,
        req: pb::ChangeSocialPinRequest,
    ) -> Result<pb::ChangeSocialPinResponse, ApiError> {
        self.run("ChangeSocialPin", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), None)?;
            let card_id = convert::card_id(&req.card_id)?;
            validate_pin("old_pin", &req.old_pin)?;
            validate_pin("new_pin", &req.new_pin)?;
            let rec = self.load_card(&card_id).await?;
            let now = self.clock.now();
            if !self.pins.verify(&card_id, &req.old_pin, &rec.pin_digest) {
                // The wrong old PIN counts like any wrong entry, so a change cannot be used to guess.
                let (card, outcome) = rec.card.pin_attempt(false, &self.policy)?;
                let mut plan = Plan::new(pb::ChangeSocialPinResponse {
                    card: Some(convert::card_to_pb(&card)),
                    changed: false,
                    remaining_attempts: outcome.remaining_attempts,
                    locked: outcome.locked,
                });
                let event = pin_lock_event(&card, outcome.locked);
                self.record_change(
                    &mut plan.commit,
                    &req.idempotency_key,
                    "pin_wrong",
                    &ctx,
                    Some(&rec.card),
                    &card,
                    event,
                    now,
                );
                plan.commit.cards.push(CardWrite::Update(Self::with_card(&rec, card)));
                return Ok(plan);
            }
            let card = rec.card.change_pin(&req.new_pin, &ctx, &self.policy)?;
            let mut plan = Plan::new(pb::ChangeSocialPinResponse {
                card: Some(convert::card_to_pb(&card)),
                changed: true,
                remaining_attempts: self.policy.social_pin_max_wrong,
                locked: false,
            });
            self.record_change(
                &mut plan.commit,
                &req.idempotency_key,
                "pin_changed",
                &ctx,
                Some(&rec.card),
                &card,
                Some(Kind::SocialPinChanged(ev::SocialPinChanged {})),
                now,
            );
            plan.commit
                .cards
                .push(CardWrite::Update(CardRecord { card, pin_digest: self.pins.digest(&card_id, &req.new_pin) }));
            Ok(plan)
        })
        .await
    }

    pub async fn reset_social_pin(
        &self,
        req: pb::ResetSocialPinRequest,
    ) -> Result<pb::ResetSocialPinResponse, ApiError> {
        self.run("ResetSocialPin", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), req.documents.as_ref())?;
            let card_id = convert::card_id(&req.card_id)?;
            validate_pin("new_pin", &req.new_pin)?;
            self.change_card(&req.idempotency_key, &card_id, "pin_reset", &ctx, |rec, _| {
                let card = rec.card.reset_pin(&req.new_pin, &ctx, &self.policy)?;
                let resp = pb::ResetSocialPinResponse { card: Some(convert::card_to_pb(&card)) };
                let record = CardRecord { card, pin_digest: self.pins.digest(&card_id, &req.new_pin) };
                Ok((record, Some(Kind::SocialPinReset(ev::SocialPinReset {})), resp))
            })
            .await
        })
        .await
    }

    pub async fn cancel_card(&self, req: pb::CancelCardRequest) -> Result<pb::CancelCardResponse, ApiError> {
        self.run("CancelCard", &req.idempotency_key, &req, || async {
            let ctx = convert::context(req.actor.as_ref(), req.documents.as_ref())?;
            let card_id = convert::card_id(&req.card_id)?;
            let reason = convert::text("reason", &req.reason, MAX_TEXT)?;
            self.change_card(&req.idempotency_key, &card_id, "cancel", &ctx, |rec, _| {
                let card = rec.card.cancel(&reason, &ctx)?;
                let resp = pb::CancelCardResponse { card: Some(convert::card_to_pb(&card)) };
                Ok((
                    Self::with_card(rec, card),
                    Some(Kind::CardCancelled(ev::CardCancelled { reason: reason.clone() })),
                    resp,
                ))
            })
            .await
        })
        .await
    }

    // ---- queries ----

    pub async fn get_card(&self, req: pb::GetCardRequest) -> Result<pb::GetCardResponse, ApiError> {
        use pb::get_card_request::Lookup;
        let rec = match &req.lookup {
            Some(Lookup::CardId(id)) => self.load_card(&convert::card_id(id)?).await?,
            Some(Lookup::CardNumber(n)) => {
                let number = CardNumber::parse(n)?;
                self.store.card_by_number(number.as_str()).await.map_err(store_error)?.ok_or_else(|| {
                    ApiError::Rejected(Rejection::not_found("CARD_NOT_FOUND", "no card with this number"))
                })?
            }
            None => {
                return Err(Rejection::invalid("lookup", "LOOKUP_REQUIRED", "give a card_id or a card_number").into());
            }
        };
        Ok(pb::GetCardResponse { card: Some(convert::card_to_pb(&rec.card)) })
    }

    /// Walks the audit trail's hash chains, a page at a time.
    pub async fn verify_audit_trail(
        &self,
        req: pb::VerifyAuditTrailRequest,
    ) -> Result<pb::VerifyAuditTrailResponse, ApiError> {
        let card = if req.card_id.trim().is_empty() { None } else { Some(convert::card_id(&req.card_id)?) };
        let mut walker = crate::audit_chain::Walker::default();
        let mut after = None;
        loop {
            let page = self.store.audit_chain(card.as_deref(), after.clone(), 5_000).await.map_err(store_error)?;
            for e in &page {
                walker.step(e);
            }
            match page.last() {
                Some(last) if page.len() == 5_000 => after = Some((last.record.card_id.clone(), last.seq)),
                _ => break,
            }
        }
        let v = walker.result;
        if !v.breaks.is_empty() {
            tracing::error!(breaks = v.breaks.len(), "the audit trail's hash chain is broken");
        }
        Ok(pb::VerifyAuditTrailResponse {
            cards_checked: v.cards,
            entries_checked: v.entries,
            unchained_entries: v.unchained,
            breaks: v
                .breaks
                .into_iter()
                .map(|b| pb::AuditChainBreak { card_id: b.card_id, sequence: b.seq, reason: b.reason.to_string() })
                .collect(),
        })
    }

    pub async fn list_audit_trail(
        &self,
        req: pb::ListAuditTrailRequest,
    ) -> Result<pb::ListAuditTrailResponse, ApiError> {
        let card_id = convert::card_id(&req.card_id)?;
        self.load_card(&card_id).await?;
        let rows = self.store.audit_trail(&card_id).await.map_err(store_error)?;
        let entries = rows
            .into_iter()
            .map(|(seq, a)| {
                let actor: socialcard_domain::Actor = serde_json::from_str(&a.actor).unwrap_or_default();
                let documents: socialcard_domain::Documents = serde_json::from_str(&a.documents).unwrap_or_default();
                let channel = socialcard_domain::Channel::from_label(&a.channel);
                pb::AuditEntry {
                    sequence: seq,
                    card_id: a.card_id,
                    action: a.action,
                    actor: Some(match channel {
                        Some(c) => convert::actor_to_pb(c, &actor),
                        None => pb::Actor::default(),
                    }),
                    documents: Some(convert::documents_to_pb(&documents)),
                    from_state: a.from_state,
                    to_state: a.to_state,
                    idempotency_key: a.idempotency_key,
                    at: Some(convert::timestamp(a.at)),
                }
            })
            .collect();
        Ok(pb::ListAuditTrailResponse { entries })
    }
}

/// The event of a PIN entry: only the one that locks the card is news to other services.
fn pin_lock_event(card: &Card, locked: bool) -> Option<Kind> {
    locked.then_some(Kind::SocialPinLocked(ev::SocialPinLocked { wrong_attempts: card.pin.wrong_attempts }))
}

fn person_to_pb(p: &PersonRecord, id: &CitizenId) -> pb::Person {
    pb::Person {
        citizen_id_masked: id.masked(),
        name: p.name.clone(),
        gender: match id.gender() {
            socialcard_domain::Gender::Male => pb::Gender::Male,
            socialcard_domain::Gender::Female => pb::Gender::Female,
        } as i32,
        birth_date: id.birth_date().to_string(),
        region_code: id.region_code().to_string(),
        phone: p.phone.clone(),
        registered_at: Some(convert::timestamp(p.registered_at)),
    }
}

fn delivery_address(a: &pb::Address) -> Result<DeliveryAddress, Rejection> {
    let line = convert::text("delivery_address.line", &a.line, MAX_TEXT)?;
    if line.is_empty() {
        return Err(Rejection::invalid(
            "delivery_address.line",
            "ADDRESS_REQUIRED",
            "a delivery address needs its street line",
        ));
    }
    let postal_code = convert::text("delivery_address.postal_code", &a.postal_code, 6)?;
    if !postal_code.is_empty() && (postal_code.len() != 6 || !postal_code.bytes().all(|b| b.is_ascii_digit())) {
        return Err(Rejection::invalid(
            "delivery_address.postal_code",
            "POSTAL_CODE_FORMAT",
            "a postal code has six digits",
        ));
    }
    Ok(DeliveryAddress {
        recipient: convert::text("delivery_address.recipient", &a.recipient, 50)?,
        phone: if a.phone.is_empty() { String::new() } else { convert::phone("delivery_address.phone", &a.phone)? },
        line,
        district: convert::text("delivery_address.district", &a.district, 50)?,
        postal_code,
    })
}

fn delivery_to_pb(d: &DeliveryAddress) -> pb::Address {
    pb::Address {
        recipient: d.recipient.clone(),
        phone: d.phone.clone(),
        line: d.line.clone(),
        district: d.district.clone(),
        postal_code: d.postal_code.clone(),
    }
}
