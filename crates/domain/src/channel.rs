//! Who did something, through which channel, with whose documents (R7, R19, R25, R31).

use serde::{Deserialize, Serialize};

use crate::rejection::Rejection;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Channel {
    BankBranch,
    EmployerBatch,
    Online,
    CommunityPoint,
    BureauWindow,
    /// 12345, or 962222 ext. 5.
    Hotline,
    Hotline12333SelfService,
    Hotline12333Operator,
    /// A designated hospital's or pharmacy's card terminal.
    MedicalTerminal,
    Courier,
    /// Bank account opening, card factory and key centre reporting per card.
    Production,
    Scheduler,
}

impl Channel {
    pub const ALL: [Channel; 12] = [
        Channel::BankBranch,
        Channel::EmployerBatch,
        Channel::Online,
        Channel::CommunityPoint,
        Channel::BureauWindow,
        Channel::Hotline,
        Channel::Hotline12333SelfService,
        Channel::Hotline12333Operator,
        Channel::MedicalTerminal,
        Channel::Courier,
        Channel::Production,
        Channel::Scheduler,
    ];

    /// The channel whose [`Channel::as_str`] label is `label`.
    pub fn from_label(label: &str) -> Option<Channel> {
        Self::ALL.into_iter().find(|c| c.as_str() == label)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::BankBranch => "bank_branch",
            Channel::EmployerBatch => "employer_batch",
            Channel::Online => "online",
            Channel::CommunityPoint => "community_point",
            Channel::BureauWindow => "bureau_window",
            Channel::Hotline => "hotline",
            Channel::Hotline12333SelfService => "hotline_12333_self_service",
            Channel::Hotline12333Operator => "hotline_12333_operator",
            Channel::MedicalTerminal => "medical_terminal",
            Channel::Courier => "courier",
            Channel::Production => "production",
            Channel::Scheduler => "scheduler",
        }
    }

    /// Channels where a person stands at a counter.
    pub fn is_counter(self) -> bool {
        matches!(self, Channel::BankBranch | Channel::CommunityPoint | Channel::BureauWindow)
    }

    pub fn is_phone(self) -> bool {
        matches!(self, Channel::Hotline | Channel::Hotline12333SelfService | Channel::Hotline12333Operator)
    }
}

/// Who acted through the channel. Stored (sealed) with every audit row, as JSON that leaves out what
/// is absent: three audit rows per card of a batch import made these a sixth of its bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// Teller, clerk or operator id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_id: Option<String>,
    /// Branch, service point, hospital or batch site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_id: Option<String>,
    /// The calling number on hotlines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_phone: Option<String>,
    /// The identity check's reference for online and bank-branch face verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_ref: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Presenter {
    #[default]
    Holder,
    Guardian,
    Agent,
}

/// Documents presented at a counter (R19, R31). As JSON, only the documents presented are written
/// (a missing one reads as not presented), as with [`Actor`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Documents {
    pub presenter: Presenter,
    #[serde(skip_serializing_if = "is_false")]
    pub holder_id_card: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub household_register: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub card_presented: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub guardianship_proof: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub written_authorization: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub agent_id_card: bool,
}

/// The context every transition carries: channel, actor, documents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    pub channel: Channel,
    pub actor: Actor,
    pub documents: Documents,
}

impl Context {
    pub fn new(channel: Channel) -> Self {
        Self { channel, actor: Actor::default(), documents: Documents::default() }
    }

    pub fn with_actor(mut self, actor: Actor) -> Self {
        self.actor = actor;
        self
    }

    pub fn with_documents(mut self, documents: Documents) -> Self {
        self.documents = documents;
        self
    }

    /// Counter channels must say where and who served.
    pub fn require_site(&self) -> Result<(), Rejection> {
        if self.actor.site_id.as_deref().is_none_or(str::is_empty) {
            return Err(Rejection::invalid(
                "actor.site_id",
                "SITE_REQUIRED",
                format!("the {} channel must name its site", self.channel.as_str()),
            ));
        }
        Ok(())
    }

    /// R19/R31: business at a counter by the holder in person or by a proxy with the right papers.
    /// `holder_under_16` allows the household register in place of the holder's ID card for a guardian.
    /// `card_required` is false only where the card itself is not needed (a loss report).
    pub fn require_counter_documents(&self, holder_under_16: bool, card_required: bool) -> Result<(), Rejection> {
        self.require_site()?;
        let d = &self.documents;
        if card_required && !d.card_presented {
            return Err(Rejection::invalid("documents.card_presented", "CARD_REQUIRED", "the card must be presented"));
        }
        let holder_identity = d.holder_id_card || (holder_under_16 && d.household_register);
        if !holder_identity {
            return Err(Rejection::invalid(
                "documents.holder_id_card",
                "HOLDER_ID_REQUIRED",
                "the holder's ID card (or, under 16, the household register) must be presented",
            ));
        }
        match d.presenter {
            Presenter::Holder => Ok(()),
            Presenter::Guardian if d.guardianship_proof && d.agent_id_card => Ok(()),
            Presenter::Agent if d.written_authorization && d.agent_id_card => Ok(()),
            Presenter::Guardian => Err(Rejection::invalid(
                "documents",
                "PROXY_DOCUMENTS_MISSING",
                "a guardian needs a guardianship proof and their own ID card",
            )),
            Presenter::Agent => Err(Rejection::invalid(
                "documents",
                "PROXY_DOCUMENTS_MISSING",
                "an agent needs the holder's written authorization and their own ID card",
            )),
        }
    }

    /// R7, R19: online business needs an identity check (face recognition or QR scan) and is done by the
    /// holder or a parent/guardian, never an agent.
    pub fn require_online_identity(&self, what: &str) -> Result<(), Rejection> {
        if self.actor.verification_ref.as_deref().is_none_or(str::is_empty) {
            return Err(Rejection::invalid(
                "actor.verification_ref",
                "IDENTITY_VERIFICATION_REQUIRED",
                format!("online {what} need a face or QR identity check"),
            ));
        }
        if self.documents.presenter == Presenter::Agent {
            return Err(Rejection::invalid(
                "documents.presenter",
                "PROXY_NOT_ALLOWED",
                format!("online {what}: the holder or a guardian, not an agent"),
            ));
        }
        Ok(())
    }

    /// The holder in person with ID card (and the card where `card_required`): no proxy.
    pub fn require_holder_in_person(&self, card_required: bool) -> Result<(), Rejection> {
        if self.documents.presenter != Presenter::Holder {
            return Err(Rejection::invalid(
                "documents.presenter",
                "PROXY_NOT_ALLOWED",
                "only the holder in person may do this",
            ));
        }
        self.require_counter_documents(false, card_required)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actors_and_documents_store_what_is_there_and_read_both_forms() {
        let actor = Actor { site_id: Some("branch-310105".into()), ..Actor::default() };
        let documents = Documents { holder_id_card: true, card_presented: true, ..Documents::default() };
        let (a, d) = (serde_json::to_string(&actor).unwrap(), serde_json::to_string(&documents).unwrap());
        assert_eq!(a, r#"{"site_id":"branch-310105"}"#);
        assert_eq!(d, r#"{"presenter":"Holder","holder_id_card":true,"card_presented":true}"#);
        assert_eq!(serde_json::from_str::<Actor>(&a).unwrap(), actor);
        assert_eq!(serde_json::from_str::<Documents>(&d).unwrap(), documents);
        // Rows written before, with every field spelled out, read the same.
        let full_actor =
            r#"{"operator_id":null,"site_id":"branch-310105","caller_phone":null,"verification_ref":null}"#;
        let full_documents = r#"{"presenter":"Holder","holder_id_card":true,"household_register":false,"card_presented":true,"guardianship_proof":false,"written_authorization":false,"agent_id_card":false}"#;
        assert_eq!(serde_json::from_str::<Actor>(full_actor).unwrap(), actor);
        assert_eq!(serde_json::from_str::<Documents>(full_documents).unwrap(), documents);
    }
}
