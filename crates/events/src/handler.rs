//! What a consumer does with an event. The handler owns its database: it must write its effect and the
//! event's inbox row in one transaction (see [`crate::inbox`]), so a redelivered event is recognised.

use async_trait::async_trait;

use crate::Envelope;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The effect was written now.
    Applied,
    /// The inbox already had this event: nothing was written.
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
