//! Account opening for production batches: the bank answers, per card, with the account it opened or why
//! it could not. Each result becomes a `RecordProductionResult` at the registry under a key derived from
//! the bank's key and the card, so a retried batch records nothing twice; a card the registry refuses is
//! reported back with its reason while the rest of the batch goes through.

use std::time::Duration;

use prost::Message;
use sha2::{Digest, Sha256};
use socialcard_domain::RejectionKind;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::registry::v1 as reg;
use socialcard_server::ApiError;
use socialcard_server::error::reason_of;
use time::OffsetDateTime;
use tonic::{Code, Request};

use crate::{BankAdapter, Budget, REMEMBER_CARD, db, micros, reject, store_answer, text};

/// The most results one batch may carry.
pub const MAX_BATCH_RESULTS: usize = 10_000;

/// A result checked at the edge: the card and what the bank says about it.
struct Checked {
    card_id: String,
    result: reg::record_production_result_request::Result,
}

fn check(results: &[bank::AccountOpeningResult]) -> Result<Vec<Checked>, ApiError> {
    if results.is_empty() {
        return Err(reject(RejectionKind::InvalidArgument, "RESULTS_REQUIRED", "a batch confirms at least one card"));
    }
    if results.len() > MAX_BATCH_RESULTS {
        return Err(reject(
            RejectionKind::InvalidArgument,
            "BATCH_TOO_LARGE",
            &format!("a batch confirms at most {MAX_BATCH_RESULTS} cards"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let card_id = text("results.card_id", &r.card_id)?;
            if !seen.insert(card_id.clone()) {
                return Err(reject(
                    RejectionKind::InvalidArgument,
                    "DUPLICATE_CARD",
                    &format!("results[{i}] repeats a card of this batch"),
                ));
            }
            let result = match &r.result {
                Some(bank::account_opening_result::Result::AccountNumber(a)) => {
                    let a = a.trim();
                    if a.is_empty() || a.len() > 19 || !a.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(reject(
                            RejectionKind::InvalidArgument,
                            "ACCOUNT_NUMBER_FORMAT",
                            &format!("results[{i}].account_number is 12 to 19 digits"),
                        ));
                    }
                    reg::record_production_result_request::Result::AccountNumber(a.to_string())
                }
                Some(bank::account_opening_result::Result::FailureReason(f)) => {
                    let reason = text("results.failure_reason", f)?;
                    reg::record_production_result_request::Result::Failure(reg::ProductionFailure {
                        stage: reg::ProductionStage::BankAccount as i32,
                        reason,
                    })
                }
                None => {
                    return Err(reject(
                        RejectionKind::InvalidArgument,
                        "RESULT_REQUIRED",
                        &format!("results[{i}] needs an account number or a failure reason"),
                    ));
                }
            };
            Ok(Checked { card_id, result })
        })
        .collect()
}

impl BankAdapter {
    pub async fn confirm_account_opening(
        &self,
        req: bank::ConfirmAccountOpeningRequest,
        deadline: Option<Duration>,
    ) -> Result<bank::ConfirmAccountOpeningResponse, ApiError> {
        let key = text("idempotency_key", &req.idempotency_key)?;
        let hash = Sha256::digest(req.encode_to_vec()).to_vec();
        if let Some(stored) = self.stored_answer(&key, &hash).await? {
            return Ok(stored);
        }
        let batch = text("batch_id", &req.batch_id)?;
        let checked = check(&req.results)?;
        let budget = Budget::new(deadline);
        let mut outcomes = Vec::with_capacity(checked.len());
        // The cards whose accounts this bank opened: from now on the adapter knows them by number.
        let mut opened = Vec::new();
        for c in checked {
            let mut lookup = Request::new(reg::GetCardRequest {
                lookup: Some(reg::get_card_request::Lookup::CardId(c.card_id.clone())),
            });
            lookup.set_timeout(budget.left());
            socialcard_telemetry::inject(&mut lookup);
            let card = match self.registry.clone().get_card(lookup).await {
                Ok(r) => r.into_inner().card.unwrap_or_default(),
                Err(s) if is_transport(&s) => return Err(unavailable(&s)),
                Err(s) => {
                    outcomes.push(refused(&c.card_id, &s));
                    continue;
                }
            };
            if card.bank_code != self.bank.code {
                tracing::warn!(bank = %self.bank.code, "account opening for another bank's card refused");
                outcomes.push(bank::AccountOpeningOutcome {
                    card_id: c.card_id,
                    accepted: false,
                    reason: "WRONG_BANK".into(),
                });
                continue;
            }
            let mut call = Request::new(reg::RecordProductionResultRequest {
                idempotency_key: format!("bank:{}:{key}:{}", self.bank.code, c.card_id),
                card_id: c.card_id.clone(),
                actor: Some(reg::Actor {
                    channel: reg::Channel::Production as i32,
                    operator_id: format!("bank-adapter.{}", self.bank.code),
                    site_id: batch.clone(),
                    ..Default::default()
                }),
                result: Some(c.result),
            });
            call.set_timeout(budget.left());
            socialcard_telemetry::inject(&mut call);
            match self.registry.clone().record_production_result(call).await {
                Ok(_) => {
                    if !card.card_number.is_empty() {
                        opened.push((card.card_number, c.card_id.clone()));
                    }
                    outcomes.push(bank::AccountOpeningOutcome {
                        card_id: c.card_id,
                        accepted: true,
                        reason: String::new(),
                    });
                }
                // The cards recorded so far stay recorded; the bank's retry with the same key replays them.
                Err(s) if is_transport(&s) => return Err(unavailable(&s)),
                Err(s) => outcomes.push(refused(&c.card_id, &s)),
            }
        }
        let accepted = u32::try_from(outcomes.iter().filter(|o| o.accepted).count()).unwrap_or(u32::MAX);
        let rejected = u32::try_from(outcomes.len()).unwrap_or(u32::MAX).saturating_sub(accepted);
        let response = bank::ConfirmAccountOpeningResponse { accepted, rejected, outcomes };
        let now = OffsetDateTime::now_utc();
        let mut tx = self.writer.begin().await.map_err(db)?;
        for (number, card_id) in &opened {
            sqlx::query(REMEMBER_CARD)
                .bind(number)
                .bind(card_id)
                .bind(micros(now))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        store_answer(&mut *tx, &key, &hash, &response, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(self.stored_answer(&key, &hash).await?.unwrap_or(response))
    }
}

fn is_transport(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::Aborted)
}

fn unavailable(s: &tonic::Status) -> ApiError {
    ApiError::Unavailable(format!(
        "registry: {}; the cards confirmed so far are recorded, retry the batch with the same key",
        s.message()
    ))
}

fn refused(card_id: &str, s: &tonic::Status) -> bank::AccountOpeningOutcome {
    bank::AccountOpeningOutcome {
        card_id: card_id.to_string(),
        accepted: false,
        reason: reason_of(s).unwrap_or_else(|| "REGISTRY_REFUSED".into()),
    }
}
