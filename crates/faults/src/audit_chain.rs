//! The registry's tamper-evident audit chain, when it has one: `VerifyAuditTrail` called by its wire
//! name with the messages declared here, so the suite asks a registry that has the method and says
//! "not available" to one that answers UNIMPLEMENTED, rather than assuming either.

use tonic::transport::Channel;

#[derive(Clone, PartialEq, prost::Message)]
pub struct VerifyAuditTrailRequest {
    /// Empty: every card's chain.
    #[prost(string, tag = "1")]
    pub card_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AuditChainBreak {
    #[prost(string, tag = "1")]
    pub card_id: String,
    #[prost(int64, tag = "2")]
    pub sequence: i64,
    #[prost(string, tag = "3")]
    pub reason: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VerifyAuditTrailResponse {
    #[prost(uint64, tag = "1")]
    pub cards_checked: u64,
    #[prost(uint64, tag = "2")]
    pub entries_checked: u64,
    #[prost(uint64, tag = "3")]
    pub unchained_entries: u64,
    #[prost(message, repeated, tag = "4")]
    pub breaks: Vec<AuditChainBreak>,
}

/// What the verification said.
#[derive(Debug)]
pub enum Chain {
    NotAvailable,
    Verified(VerifyAuditTrailResponse),
    Failed(tonic::Status),
}

pub async fn verify(channel: Channel) -> Chain {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return Chain::Failed(tonic::Status::unavailable(e.to_string()));
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/socialcard.registry.v1.RegistryService/VerifyAuditTrail",
    );
    let codec = tonic_prost::ProstCodec::<VerifyAuditTrailRequest, VerifyAuditTrailResponse>::default();
    match grpc.unary(tonic::Request::new(VerifyAuditTrailRequest::default()), path, codec).await {
        Ok(r) => Chain::Verified(r.into_inner()),
        Err(s) if s.code() == tonic::Code::Unimplemented => Chain::NotAvailable,
        Err(s) => Chain::Failed(s),
    }
}
