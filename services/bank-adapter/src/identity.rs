//! Who may call a bank's adapter over mutual TLS. The bank-facing API (`BankCardService`) admits only
//! its own bank's core system, by the client certificate naming `spiffe://socialcard/bank/<code>`;
//! another bank's certificate gets PERMISSION_DENIED and an audit line. The coordination API
//! (`BankCoordinationService`) admits only the loss coordinator's service certificate.
//!
//! Serve these over [`socialcard_server::grpc::serve_with_tls`]; without TLS every call would be
//! UNAUTHENTICATED (there is no certificate to read).

use socialcard_proto::bank::v1 as bank;
use socialcard_server::tls::{Allow, RequirePeer};
use tonic::service::interceptor::InterceptedService;

use crate::BankAdapter;

/// The service identity of the loss coordinator, the one caller of the coordination API.
pub const LOSS_COORDINATOR: &str = "loss-coordinator";

/// Admits only `bank_code`'s core system.
pub fn bank_guard(bank_code: &str) -> RequirePeer {
    RequirePeer::new(&format!("bank-adapter[{bank_code}]"), Allow::bank(bank_code, &[]))
}

/// Admits only the loss coordinator.
pub fn coordination_guard(bank_code: &str) -> RequirePeer {
    let allow = Allow { services: vec![LOSS_COORDINATOR.to_string()], ..Allow::default() };
    RequirePeer::new(&format!("bank-adapter[{bank_code}] coordination"), allow)
}

impl BankAdapter {
    /// The bank-facing service behind its bank's certificate check.
    pub fn into_mtls_server(
        self,
    ) -> InterceptedService<bank::bank_card_service_server::BankCardServiceServer<Self>, RequirePeer> {
        let guard = bank_guard(&self.bank.code);
        InterceptedService::new(self.into_server(), guard)
    }

    /// The loss coordinator's service behind its certificate check.
    pub fn into_mtls_coordination_server(
        self,
    ) -> InterceptedService<bank::bank_coordination_service_server::BankCoordinationServiceServer<Self>, RequirePeer>
    {
        let guard = coordination_guard(&self.bank.code);
        InterceptedService::new(self.into_coordination_server(), guard)
    }
}
