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

    /// How many events the consumer may hand [`Handler::handle`] at once when it handles them one at a
    /// time: events of different subjects (cards) at once, those of one subject always one after
    /// another, in order. Kafka orders events only within a key (the subject), so a handler that is
    /// correct behind Kafka is correct here. 1 (the default): one event at a time. For a handler whose
    /// writes meet in a group writer (the registry's) or a connection pool, concurrent events share
    /// commits rather than queue for one each.
    fn concurrency(&self) -> usize {
        1
    }
}

/// Handles `events` (in order) as a consumer does: more than one together through
/// [`Handler::handle_batch`] when the handler has a batch form, one transaction for all; otherwise each
/// alone through [`handle_with_retries`], several subjects at once when the handler's
/// [`Handler::concurrency`] allows (each subject's events in order). A batch still failing after its
/// retries (or failing permanently at once) is split in halves, each tried the same way in order, so a
/// poison event ends up alone (retried, then dead-lettered) after about log2(n) failed
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
        outcomes.extend(handle_each(handler, part, max_attempts, backoff, system).await);
    }
    outcomes
}

/// Each of `events` alone through [`handle_one`]: up to [`Handler::concurrency`] subjects at once, the
/// events of one subject in order, one after another. One outcome per event, in the order of `events`.
async fn handle_each(
    handler: &dyn Handler,
    events: &[Envelope],
    max_attempts: u32,
    backoff: std::time::Duration,
    system: &'static str,
) -> Vec<Result<Applied, HandlerError>> {
    let limit = handler.concurrency().max(1);
    if limit == 1 || events.len() < 2 {
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            outcomes.push(handle_one(handler, event, max_attempts, backoff, system).await);
        }
        return outcomes;
    }
    // The events of each subject, in order; subjects in the order they first appear.
    let mut chains: Vec<Vec<usize>> = Vec::new();
    let mut chain_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, event) in events.iter().enumerate() {
        let chain = *chain_of.entry(event.subject.as_str()).or_insert_with(|| {
            chains.push(Vec::new());
            chains.len() - 1
        });
        chains[chain].push(i);
    }
    let run = |chain: Vec<usize>| async move {
        let mut done = Vec::with_capacity(chain.len());
        for i in chain {
            done.push((i, handle_one(handler, &events[i], max_attempts, backoff, system).await));
        }
        done
    };
    let mut outcomes: Vec<Option<Result<Applied, HandlerError>>> = events.iter().map(|_| None).collect();
    let mut waiting = chains.into_iter();
    let mut running = futures_util::stream::FuturesUnordered::new();
    running.extend(waiting.by_ref().take(limit).map(run));
    while let Some(done) = futures_util::StreamExt::next(&mut running).await {
        for (i, outcome) in done {
            outcomes[i] = Some(outcome);
        }
        running.extend(waiting.next().map(run));
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(HandlerError::Permanent("the event was never handled".into()))))
        .collect()
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// Records what it was handed and how many events it held at once; each event takes 5 ms (paused
    /// time), 100 ms when its payload says "slow"; it is applied, a duplicate when the payload says
    /// "seen", or fails permanently when it says "poison".
    struct Recorder {
        concurrency: usize,
        state: Mutex<Seen>,
    }

    /// Events held now, the most held at once, and (subject, event id) in the order they finished.
    type Seen = (usize, usize, Vec<(String, String)>);

    impl Recorder {
        fn new(concurrency: usize) -> Self {
            Self { concurrency, state: Mutex::new((0, 0, Vec::new())) }
        }

        /// The most events held at once, and (subject, event id) in the order they finished.
        fn seen(&self) -> (usize, Vec<(String, String)>) {
            let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (s.1, s.2.clone())
        }
    }

    #[async_trait]
    impl Handler for Recorder {
        async fn handle(&self, event: &Envelope) -> Result<Applied, HandlerError> {
            {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                s.0 += 1;
                s.1 = s.1.max(s.0);
            }
            let took = if event.payload == b"slow" { 100 } else { 5 };
            tokio::time::sleep(Duration::from_millis(took)).await;
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.0 -= 1;
            s.2.push((event.subject.clone(), event.id.clone()));
            match event.payload.as_slice() {
                b"poison" => Err(HandlerError::Permanent("poison".into())),
                b"seen" => Ok(Applied::Duplicate),
                _ => Ok(Applied::Applied),
            }
        }

        fn concurrency(&self) -> usize {
            self.concurrency
        }
    }

    fn event(i: usize, subject: &str, payload: &[u8]) -> Envelope {
        Envelope {
            id: format!("e{i}"),
            event_type: "test.v1.Changed".into(),
            source: "test".into(),
            subject: subject.into(),
            time: time::OffsetDateTime::UNIX_EPOCH,
            traceparent: None,
            topic: "test".into(),
            payload: payload.to_vec(),
        }
    }

    /// 40 events over 10 subjects, interleaved; event 0 (subject 0) is slow: its subject's next event
    /// would overtake it if it were not held back; event 13 (subject 3) is poison; every seventh from
    /// event 5 on was seen before.
    fn events() -> Vec<Envelope> {
        let payload = |i| match i {
            0 => b"slow".as_slice(),
            13 => b"poison".as_slice(),
            i if i % 7 == 5 => b"seen".as_slice(),
            _ => b"ok".as_slice(),
        };
        (0..40).map(|i| event(i, &format!("card-{}", i % 10), payload(i))).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn subjects_are_handled_at_once_each_in_order() {
        let handler = Recorder::new(4);
        let events = events();
        let outcomes = handle_events(&handler, &events, 1, Duration::ZERO, "test").await;

        // One outcome per event, in the events' order: each event's own answer.
        assert_eq!(outcomes.len(), events.len());
        for (i, outcome) in outcomes.iter().enumerate() {
            match i {
                13 => assert!(outcome.is_err(), "event {i}: {outcome:?}"),
                i if i % 7 == 5 => assert!(matches!(outcome, Ok(Applied::Duplicate)), "event {i}: {outcome:?}"),
                _ => assert!(matches!(outcome, Ok(Applied::Applied)), "event {i}: {outcome:?}"),
            }
        }
        let (most, finished) = handler.seen();
        assert_eq!(most, 4, "up to the handler's concurrency at once, never more");
        assert_eq!(finished.len(), events.len(), "every event handled once");
        // Within a subject, the order of the events (the poison one's successors included).
        for subject in 0..10 {
            let order: Vec<&str> =
                finished.iter().filter(|(s, _)| *s == format!("card-{subject}")).map(|(_, id)| id.as_str()).collect();
            let expected: Vec<String> = (0..4).map(|k| format!("e{}", subject + 10 * k)).collect();
            assert_eq!(order, expected, "subject card-{subject}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_at_a_time_by_default() {
        let handler = Recorder::new(1);
        let events = events();
        let outcomes = handle_events(&handler, &events, 1, Duration::ZERO, "test").await;
        assert_eq!(outcomes.iter().filter(|o| o.is_err()).count(), 1);
        let (most, finished) = handler.seen();
        assert_eq!(most, 1);
        let ids: Vec<&str> = finished.iter().map(|(_, id)| id.as_str()).collect();
        let expected: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
        assert_eq!(ids, expected, "in the events' order");
    }
}
