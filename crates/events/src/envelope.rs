//! The envelope of one event and its Kafka form: key = subject (card id), value = protobuf payload,
//! headers = CloudEvents binary-mode attributes plus `traceparent`.

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::EventError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// UUID v7: unique, time-ordered; the inbox key.
    pub id: String,
    /// e.g. `socialcard.card.v1.SocialActivated`.
    pub event_type: String,
    /// The producing service, e.g. `registry`.
    pub source: String,
    /// The card id; also the Kafka key.
    pub subject: String,
    pub time: OffsetDateTime,
    /// W3C trace context of the change that produced the event.
    pub traceparent: Option<String>,
    pub topic: String,
    pub payload: Vec<u8>,
}

pub const CE_ID: &str = "ce_id";
pub const CE_TYPE: &str = "ce_type";
pub const CE_SOURCE: &str = "ce_source";
pub const CE_SUBJECT: &str = "ce_subject";
pub const CE_TIME: &str = "ce_time";
pub const CE_SPECVERSION: &str = "ce_specversion";
pub const TRACEPARENT: &str = "traceparent";

impl Envelope {
    pub fn kafka_headers(&self) -> OwnedHeaders {
        let time = self.time.format(&Rfc3339).unwrap_or_default();
        let mut h = OwnedHeaders::new_with_capacity(7)
            .insert(Header { key: CE_SPECVERSION, value: Some("1.0") })
            .insert(Header { key: CE_ID, value: Some(&self.id) })
            .insert(Header { key: CE_TYPE, value: Some(&self.event_type) })
            .insert(Header { key: CE_SOURCE, value: Some(&self.source) })
            .insert(Header { key: CE_SUBJECT, value: Some(&self.subject) })
            .insert(Header { key: CE_TIME, value: Some(&time) });
        if let Some(tp) = &self.traceparent {
            h = h.insert(Header { key: TRACEPARENT, value: Some(tp) });
        }
        h
    }

    /// Reads an envelope back from a Kafka message; a message without the required attributes is
    /// malformed (and goes to the dead-letter topic).
    pub fn from_message<M: Message>(m: &M) -> Result<Envelope, EventError> {
        let mut id = None;
        let mut event_type = None;
        let mut source = None;
        let mut subject = None;
        let mut time = None;
        let mut traceparent = None;
        if let Some(headers) = m.headers() {
            for h in headers.iter() {
                let Some(v) = h.value.map(|v| String::from_utf8_lossy(v).into_owned()) else { continue };
                match h.key {
                    CE_ID => id = Some(v),
                    CE_TYPE => event_type = Some(v),
                    CE_SOURCE => source = Some(v),
                    CE_SUBJECT => subject = Some(v),
                    CE_TIME => time = Some(v),
                    TRACEPARENT => traceparent = Some(v),
                    _ => {}
                }
            }
        }
        let missing = |name: &str| EventError::Malformed(format!("header {name} missing"));
        let time = time.ok_or_else(|| missing(CE_TIME))?;
        Ok(Envelope {
            id: id.ok_or_else(|| missing(CE_ID))?,
            event_type: event_type.ok_or_else(|| missing(CE_TYPE))?,
            source: source.ok_or_else(|| missing(CE_SOURCE))?,
            subject: subject.ok_or_else(|| missing(CE_SUBJECT))?,
            time: OffsetDateTime::parse(&time, &Rfc3339).map_err(|e| EventError::Malformed(format!("ce_time: {e}")))?,
            traceparent,
            topic: m.topic().to_string(),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        })
    }
}
