//! The financial side of losses (R25-R27). The loss coordinator freezes and unfreezes a card's financial
//! function here (`BankCoordinationService`); the freeze and its `FinancialFrozen` / `FinancialUnfrozen`
//! event commit in one transaction, and the registry mirrors them. A loss or an unlock that the bank's own
//! teller takes at a branch (`ReportLoss`, `UnlockFinancial`) is handed to the loss coordinator, which
//! owns the case and locks both sides (a loss anywhere locks everywhere).

use std::time::Duration;

use prost::Message;
use sha2::{Digest, Sha256};
use socialcard_domain::RejectionKind;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::events::v1 as ev;
use socialcard_proto::loss::v1 as loss;
use socialcard_proto::registry::v1 as reg;
use socialcard_server::ApiError;
use sqlx::Row;
use time::OffsetDateTime;
use tonic::{Code, Request, Response, Status};

use crate::{
    BankAdapter, Budget, DEFAULT_REGISTRY_TIMEOUT, db, micros, registry_error, reject, remaining_deadline,
    store_answer, text,
};

fn loss_kind_name(kind: reg::LossKind) -> &'static str {
    match kind {
        reg::LossKind::Temporary => "temporary",
        reg::LossKind::Written => "written",
        reg::LossKind::Automatic => "automatic",
        reg::LossKind::Unspecified => "unspecified",
    }
}

/// The coordinator's keys are derived from a case or timer (longer than a bank's): up to 128 printable
/// ASCII characters, as the registry takes.
fn coordination_key(value: &str) -> Result<String, ApiError> {
    let k = value.trim();
    if k.is_empty() || k.len() > 128 || !k.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(reject(
            RejectionKind::InvalidArgument,
            "IDEMPOTENCY_KEY_FORMAT",
            "an idempotency key is 1 to 128 printable ASCII characters",
        ));
    }
    Ok(k.to_string())
}

fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.unix_timestamp(), nanos: 0 }
}

/// A coordinator refusal passes through with its code and reason; transport failures say unavailable.
fn coordinator_error(status: &Status) -> ApiError {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::Internal => {
            ApiError::Unavailable(format!("loss coordinator: {}", status.message()))
        }
        _ => registry_error(status),
    }
}

impl BankAdapter {
    /// The card's current freeze here, if any: (case id, loss kind).
    pub async fn current_freeze(&self, card_id: &str) -> Result<Option<(String, String)>, ApiError> {
        self.readers
            .read(|d| {
                d.query_row(
                    "SELECT case_id, loss_kind FROM freezes WHERE card_id = $1 AND released_at IS NULL",
                    &[card_id.into()],
                    |r| Ok((r.text(0)?, r.text(1)?)),
                )
            })
            .map_err(|e| ApiError::Unavailable(e.to_string()))
    }

    /// R26: the coordinator freezes the financial function of one of this bank's cards.
    pub async fn freeze_financial(
        &self,
        req: bank::FreezeFinancialRequest,
        deadline: Option<Duration>,
    ) -> Result<bank::FreezeFinancialResponse, ApiError> {
        let key = coordination_key(&req.idempotency_key)?;
        let hash = Sha256::digest(req.encode_to_vec()).to_vec();
        if let Some(stored) = self.stored_answer(&key, &hash).await? {
            return Ok(stored);
        }
        let case_id = text("case_id", &req.case_id)?;
        let kind = reg::LossKind::try_from(req.loss_kind)
            .ok()
            .filter(|k| matches!(k, reg::LossKind::Temporary | reg::LossKind::Written))
            .ok_or_else(|| {
                reject(
                    RejectionKind::InvalidArgument,
                    "LOSS_KIND_UNKNOWN",
                    "a freeze follows a temporary or a written loss",
                )
            })?;
        let card = self.own_card_by_id(&req.card_id, deadline.unwrap_or(DEFAULT_REGISTRY_TIMEOUT)).await?;
        let now = OffsetDateTime::now_utc();
        let mut tx = self.writer.begin().await.map_err(db)?;
        let current: Option<String> =
            sqlx::query("SELECT loss_kind FROM freezes WHERE card_id = $1 AND released_at IS NULL")
                .bind(&card.card_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?
                .map(|r| r.try_get("loss_kind"))
                .transpose()
                .map_err(db)?;
        // A freeze already in place stays; a written report upgrades a temporary one (R27).
        let changes = match current.as_deref() {
            None => true,
            Some("temporary") => kind == reg::LossKind::Written,
            Some(_) => false,
        };
        if changes {
            sqlx::query(
                "INSERT INTO freezes (card_id, card_number, case_id, loss_kind, frozen_at, released_at, release_reason)
                 VALUES ($1, $2, $3, $4, $5, NULL, NULL)
                 ON CONFLICT (card_id) DO UPDATE SET case_id = excluded.case_id, loss_kind = excluded.loss_kind,
                     frozen_at = excluded.frozen_at, released_at = NULL, release_reason = NULL",
            )
            .bind(&card.card_id)
            .bind(&card.card_number)
            .bind(&case_id)
            .bind(loss_kind_name(kind))
            .bind(micros(now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            let event = ev::FinancialEvent {
                card_id: card.card_id.clone(),
                bank_code: self.bank.code.clone(),
                occurred_at: Some(timestamp(now)),
                kind: Some(ev::financial_event::Kind::FinancialFrozen(ev::FinancialFrozen {
                    loss_kind: kind as i32,
                    case_id: case_id.clone(),
                })),
            };
            self.append_event(&mut tx, &card.card_id, "socialcard.financial.v1.FinancialFrozen", &event, now).await?;
        }
        let response = bank::FreezeFinancialResponse {
            financial_state: reg::FinancialState::Frozen as i32,
            frozen_at: Some(timestamp(now)),
        };
        store_answer(&mut *tx, &key, &hash, &response, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(self.stored_answer(&key, &hash).await?.unwrap_or(response))
    }

    /// R27: the coordinator lifts the freeze (an unlock at a branch, or a lapsed temporary loss).
    pub async fn unfreeze_financial(
        &self,
        req: bank::UnfreezeFinancialRequest,
        deadline: Option<Duration>,
    ) -> Result<bank::UnfreezeFinancialResponse, ApiError> {
        let key = coordination_key(&req.idempotency_key)?;
        let hash = Sha256::digest(req.encode_to_vec()).to_vec();
        let result = self.unfreeze_once(req, deadline, &key, &hash).await;
        self.or_replay(&key, &hash, result).await
    }

    async fn unfreeze_once(
        &self,
        req: bank::UnfreezeFinancialRequest,
        deadline: Option<Duration>,
        key: &str,
        hash: &[u8],
    ) -> Result<bank::UnfreezeFinancialResponse, ApiError> {
        if let Some(stored) = self.stored_answer(key, hash).await? {
            return Ok(stored);
        }
        let case_id = text("case_id", &req.case_id)?;
        let reason = match bank::UnfreezeReason::try_from(req.reason) {
            Ok(bank::UnfreezeReason::Unlocked) => {
                text("teller_id", &req.teller_id)?;
                text("branch_id", &req.branch_id)?;
                "unlocked"
            }
            Ok(bank::UnfreezeReason::Expired) => "expired",
            _ => {
                return Err(reject(
                    RejectionKind::InvalidArgument,
                    "UNFREEZE_REASON_UNKNOWN",
                    "say whether the freeze was unlocked or lapsed",
                ));
            }
        };
        let card = self.own_card_by_id(&req.card_id, deadline.unwrap_or(DEFAULT_REGISTRY_TIMEOUT)).await?;
        let now = OffsetDateTime::now_utc();
        let mut tx = self.writer.begin().await.map_err(db)?;
        let current = sqlx::query("SELECT case_id, loss_kind FROM freezes WHERE card_id = $1 AND released_at IS NULL")
            .bind(&card.card_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        let Some(current) = current else {
            return Err(reject(
                RejectionKind::FailedPrecondition,
                "NOT_FROZEN",
                "the financial function is not frozen",
            ));
        };
        let frozen_kind: String = current.try_get("loss_kind").map_err(db)?;
        if reason == "expired" && frozen_kind != "temporary" {
            return Err(reject(
                RejectionKind::FailedPrecondition,
                "NOT_TEMPORARY_LOSS",
                "only a temporary loss lapses; a written one is undone at a branch",
            ));
        }
        sqlx::query("UPDATE freezes SET released_at = $2, release_reason = $3 WHERE card_id = $1")
            .bind(&card.card_id)
            .bind(micros(now))
            .bind(reason)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let event = ev::FinancialEvent {
            card_id: card.card_id.clone(),
            bank_code: self.bank.code.clone(),
            occurred_at: Some(timestamp(now)),
            kind: Some(ev::financial_event::Kind::FinancialUnfrozen(ev::FinancialUnfrozen {
                case_id,
                reason: reason.to_string(),
            })),
        };
        self.append_event(&mut tx, &card.card_id, "socialcard.financial.v1.FinancialUnfrozen", &event, now).await?;
        let active: bool = sqlx::query("SELECT 1 FROM financial_cards WHERE card_id = $1 AND state = 'active'")
            .bind(&card.card_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?
            .is_some();
        let response = bank::UnfreezeFinancialResponse {
            financial_state: if active {
                reg::FinancialState::Active as i32
            } else {
                reg::FinancialState::NotActivated as i32
            },
        };
        store_answer(&mut *tx, key, hash, &response, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(self.stored_answer(key, hash).await?.unwrap_or(response))
    }

    fn coordinator(
        &self,
    ) -> Result<loss::loss_coordinator_service_client::LossCoordinatorServiceClient<tonic::transport::Channel>, ApiError>
    {
        self.coordinator
            .clone()
            .ok_or_else(|| ApiError::Unavailable("no loss coordinator is configured for this adapter".into()))
    }

    /// R25: a written loss at a branch of the card's bank. The coordinator opens the case and locks both
    /// sides; the bank's key is passed on (prefixed with the bank), so a retry is the same case.
    pub async fn report_loss(
        &self,
        req: bank::ReportLossRequest,
        deadline: Option<Duration>,
    ) -> Result<bank::ReportLossResponse, ApiError> {
        let key = text("idempotency_key", &req.idempotency_key)?;
        let teller = text("teller_id", &req.teller_id)?;
        let branch = text("branch_id", &req.branch_id)?;
        // A written loss at the counter, the holder in person with an ID card; a temporary loss on the
        // bank's phone line (R25), which the coordinator records as a phone report.
        let (channel, documents) = match reg::LossKind::try_from(req.loss_kind) {
            Ok(reg::LossKind::Written) => {
                if !req.holder_id_checked {
                    return Err(reject(
                        RejectionKind::InvalidArgument,
                        "HOLDER_ID_REQUIRED",
                        "a written loss needs the holder in person with an ID card (R25, R31)",
                    ));
                }
                (
                    reg::Channel::BankBranch,
                    reg::Documents {
                        presenter: reg::Presenter::Holder as i32,
                        holder_id_card: true,
                        ..Default::default()
                    },
                )
            }
            Ok(reg::LossKind::Temporary) => (
                reg::Channel::Hotline,
                reg::Documents { presenter: reg::Presenter::Holder as i32, ..Default::default() },
            ),
            _ => {
                return Err(reject(
                    RejectionKind::InvalidArgument,
                    "LOSS_KIND_UNKNOWN",
                    "a bank takes a written loss at a branch or a temporary loss by phone (R25)",
                ));
            }
        };
        let budget = Budget::new(deadline);
        let card = self.card_ref(&req.card_number, budget.left()).await?;
        self.remember(&card).await?;
        let mut call = Request::new(loss::ReportLossRequest {
            idempotency_key: format!("bank:{}:{key}", self.bank.code),
            card_id: card.card_id,
            card_number: String::new(),
            loss_kind: req.loss_kind,
            actor: Some(reg::Actor {
                channel: channel as i32,
                operator_id: teller,
                site_id: branch,
                ..Default::default()
            }),
            documents: Some(documents),
        });
        call.set_timeout(budget.left());
        socialcard_telemetry::inject(&mut call);
        let case = self
            .coordinator()?
            .report_loss(call)
            .await
            .map_err(|s| coordinator_error(&s))?
            .into_inner()
            .loss_case
            .ok_or_else(|| ApiError::Internal("the coordinator answered without a case".into()))?;
        Ok(bank::ReportLossResponse {
            case_id: case.case_id,
            social_state: if case.social_locked {
                reg::SocialState::LossLocked as i32
            } else {
                reg::SocialState::Unspecified as i32
            },
            financial_state: if case.financial_frozen {
                reg::FinancialState::Frozen as i32
            } else {
                reg::FinancialState::Unspecified as i32
            },
        })
    }

    /// R27 (financial side): the bank's own unlock at a branch, through the card's open loss case.
    pub async fn unlock_financial(
        &self,
        req: bank::UnlockFinancialRequest,
        deadline: Option<Duration>,
    ) -> Result<bank::UnlockFinancialResponse, ApiError> {
        let key = text("idempotency_key", &req.idempotency_key)?;
        let teller = text("teller_id", &req.teller_id)?;
        let branch = text("branch_id", &req.branch_id)?;
        if !req.holder_id_checked {
            return Err(reject(
                RejectionKind::InvalidArgument,
                "HOLDER_ID_REQUIRED",
                "an unlock needs the holder in person with an ID card (R27)",
            ));
        }
        let budget = Budget::new(deadline);
        let card = self.card_ref(&req.card_number, budget.left()).await?;
        self.remember(&card).await?;
        let mut call = Request::new(loss::UnlockRequest {
            idempotency_key: format!("bank:{}:{key}", self.bank.code),
            case_id: String::new(),
            card_id: card.card_id,
            actor: Some(reg::Actor {
                channel: reg::Channel::BankBranch as i32,
                operator_id: teller,
                site_id: branch,
                ..Default::default()
            }),
            documents: Some(reg::Documents {
                presenter: reg::Presenter::Holder as i32,
                holder_id_card: true,
                card_presented: req.card_presented,
                ..Default::default()
            }),
        });
        call.set_timeout(budget.left());
        socialcard_telemetry::inject(&mut call);
        let case = self
            .coordinator()?
            .unlock(call)
            .await
            .map_err(|s| coordinator_error(&s))?
            .into_inner()
            .loss_case
            .ok_or_else(|| ApiError::Internal("the coordinator answered without a case".into()))?;
        let active: bool = sqlx::query("SELECT 1 FROM financial_cards WHERE card_id = $1 AND state = 'active'")
            .bind(&case.card_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .is_some();
        Ok(bank::UnlockFinancialResponse {
            financial_state: if case.financial_frozen {
                reg::FinancialState::Frozen as i32
            } else if active {
                reg::FinancialState::Active as i32
            } else {
                reg::FinancialState::NotActivated as i32
            },
            case_id: case.case_id,
            social_still_locked: case.social_locked,
        })
    }

    /// Looks a card up by id at the registry and refuses another bank's card.
    async fn own_card_by_id(&self, card_id: &str, timeout: Duration) -> Result<reg::Card, ApiError> {
        let id = text("card_id", card_id)?;
        let mut req = Request::new(reg::GetCardRequest { lookup: Some(reg::get_card_request::Lookup::CardId(id)) });
        req.set_timeout(timeout);
        socialcard_telemetry::inject(&mut req);
        let card = self.registry.clone().get_card(req).await.map_err(|s| registry_error(&s))?.into_inner().card;
        let card = card.ok_or_else(|| ApiError::Internal("registry answered without a card".into()))?;
        if card.bank_code != self.bank.code {
            tracing::warn!(bank = %self.bank.code, "refused to freeze another bank's card");
            return Err(reject(RejectionKind::PermissionDenied, "WRONG_BANK", "the card belongs to another bank"));
        }
        Ok(card)
    }

    pub fn into_coordination_server(
        self,
    ) -> bank::bank_coordination_service_server::BankCoordinationServiceServer<Self> {
        bank::bank_coordination_service_server::BankCoordinationServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl bank::bank_coordination_service_server::BankCoordinationService for BankAdapter {
    async fn freeze_financial(
        &self,
        request: Request<bank::FreezeFinancialRequest>,
    ) -> Result<Response<bank::FreezeFinancialResponse>, Status> {
        let deadline = remaining_deadline(&request);
        BankAdapter::freeze_financial(self, request.into_inner(), deadline)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn unfreeze_financial(
        &self,
        request: Request<bank::UnfreezeFinancialRequest>,
    ) -> Result<Response<bank::UnfreezeFinancialResponse>, Status> {
        let deadline = remaining_deadline(&request);
        BankAdapter::unfreeze_financial(self, request.into_inner(), deadline)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

/// The coordination service's gRPC name, as health and reflection report it.
pub const COORDINATION_SERVICE_NAME: &str = <bank::bank_coordination_service_server::BankCoordinationServiceServer<
    BankAdapter,
> as tonic::server::NamedService>::NAME;
