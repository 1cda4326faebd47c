//! What a consumer does with an event. The handler owns its database: it must write its effect and the
//! event's inbox row in one transaction (see [`crate::inbox`]), so a redelivered event is recognised.

use async_trait::async_trait;
use tracing::Instrument as _;

use crate::Envelope;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The effect was written now.
    Applied,
    /// Nothing was written: the inbox already had this event, or the handler has no part in events of
    /// its kind.
    Duplicate,
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// May succeed later (database briefly away): retried.
    #[error("transient: {0}")]
    Transient(String),
    /// Will never succeed (undecodable payload, impossible state): dead-lettered at once.
    #[error("permanent: {0}")]
    Permanent(String),
}

#[async_trait]
pub trait Handler: Send + Sync {
    async fn handle(&self, event: &crate::Envelope) -> Result<Applied, HandlerError>;

    /// Whether [`Handler::handle_batch`] applies batches. False (the default): the consumer hands the
    /// handler its events one at a time.
    fn has_batch_form(&self) -> bool {
        false
    }

    /// Applies `events` in order in one transaction, all or nothing: the answer for each, or an error
    /// that left none of them written. Called only when [`Handler::has_batch_form`] says so; `None`
    /// means no batch form after all, and the events go one at a time. A transient error is retried
    /// like one event's; after that, or after a permanent error, the consumer tries the batch's halves
    /// (see [`handle_events`]), so a poison event is retried and dead-lettered alone while the rest of
    /// its batch is applied.
    async fn handle_batch(&self, events: &[Envelope]) -> Option<Result<Vec<Applied>, HandlerError>> {
        let _ = events;
        None
    }
}

/// Handles `events` (in order) as a consumer does: more than one together through
/// [`Handler::handle_batch`] when the handler has a batch form, one transaction for all; otherwise each
/// alone through [`handle_with_retries`]. A batch still failing after its retries (or failing
/// permanently at once) is split in halves, each tried the same way
/// in order, so a poison event ends up alone (retried, then dead-lettered) after about log2(n) failed
/// batches while the events around it still go in batches. One outcome per event, in order; an error
/// means the event must be dead-lettered. Spans: one `process` span per batch, linked to the traces that
/// wrote its events, or one per event, a child of the trace that wrote it.
pub async fn handle_events(
    handler: &dyn Handler,
    events: &[Envelope],
    max_attempts: u32,
    backoff: std::time::Duration,
    system: &'static str,
) -> Vec<Result<Applied, HandlerError>> {
    let mut outcomes = Vec::with_capacity(events.len());
    // Ranges still to handle, the next on top: halves are pushed second half first.
    let mut pending: Vec<std::ops::Range<usize>> = Vec::with_capacity(16);
    pending.push(0..events.len());
    while let Some(range) = pending.pop() {
        let part = &events[range.clone()];
        if part.len() > 1 && handler.has_batch_form() {
            match handle_batch(handler, part, max_attempts, backoff, system).await {
                Batch::Applied(applied) => {
                    outcomes.extend(applied.into_iter().map(Ok));
                    continue;
                }
                Batch::Failed => {
                    let mid = range.start + part.len() / 2;
                    pending.push(mid..range.end);
                    pending.push(range.start..mid);
                    continue;
                }
                Batch::NoBatchForm => {}
            }
        }
        for event in part {
            outcomes.push(handle_one(handler, event, max_attempts, backoff, system).await);
        }
    }
    outcomes
}

/// One event alone through [`handle_with_retries`], in a `process` span that continues the trace that
/// wrote it.
pub async fn handle_one(
    handler: &dyn Handler,
    event: &Envelope,
    max_attempts: u32,
    backoff: std::time::Duration,
    system: &'static str,
) -> Result<Applied, HandlerError> {
    let span = socialcard_telemetry::consumer_span(system, &event.topic, &event.id, event.traceparent.as_deref());
    handle_with_retries(handler, event, max_attempts, backoff).instrument(span).await
}

enum Batch {
    Applied(Vec<Applied>),
    Failed,
    NoBatchForm,
}

/// One batch through the handler's batch form, retried on transient errors as one event is.
async fn handle_batch(
    handler: &dyn Handler,
    events: &[Envelope],
    max_attempts: u32,
    backoff: std::time::Duration,
    system: &'static str,
) -> Batch {
    let topic = match events.iter().all(|e| e.topic == events[0].topic) {
        true => events[0].topic.as_str(),
        false => "(several)",
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let span = socialcard_telemetry::consumer_batch_span(
            system,
            topic,
            events.iter().map(|e| e.traceparent.as_deref()),
            events.len(),
        );
        match handler.handle_batch(events).instrument(span).await {
            Some(Ok(applied)) if applied.len() == events.len() => return Batch::Applied(applied),
            Some(Ok(applied)) => {
                tracing::error!(
                    events = events.len(),
                    answers = applied.len(),
                    "a batch answered for the wrong number of events"
                );
                return Batch::Failed;
            }
            Some(Err(HandlerError::Transient(e))) if attempt < max_attempts => {
                tracing::warn!(events = events.len(), attempt, error = %e, "a batch failed, retrying");
                tokio::time::sleep(backoff * attempt).await;
            }
            Some(Err(e)) => {
                tracing::warn!(events = events.len(), error = %e, "a batch failed; trying its halves");
                return Batch::Failed;
            }
            None => return Batch::NoBatchForm,
        }
    }
}

/// Runs `handler` with up to `max_attempts` tries (backing off between transient failures); returns
/// the last error when the event must be dead-lettered.
pub async fn handle_with_retries(
    handler: &dyn Handler,
    event: &Envelope,
    max_attempts: u32,
    backoff: std::time::Duration,
) -> Result<Applied, HandlerError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match handler.handle(event).await {
            Ok(a) => return Ok(a),
            Err(HandlerError::Permanent(e)) => return Err(HandlerError::Permanent(e)),
            Err(HandlerError::Transient(e)) if attempt >= max_attempts => return Err(HandlerError::Transient(e)),
            Err(HandlerError::Transient(e)) => {
                tracing::warn!(event_id = %event.id, attempt, error = %e, "handler failed, retrying");
                tokio::time::sleep(backoff * attempt).await;
            }
        }
    }
}
