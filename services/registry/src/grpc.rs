//! The gRPC transport of `socialcard.registry.v1.RegistryService`: each handler hands the request to the
//! application layer and maps its error to a status; no rules and no SQL here.

use socialcard_proto::registry::v1 as pb;
use socialcard_proto::registry::v1::registry_service_server::RegistryService;
use tonic::{Request, Response, Status};

use crate::app::Registry;

#[derive(Clone, Debug)]
pub struct RegistryGrpc {
    registry: Registry,
}

impl RegistryGrpc {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }

    pub fn into_server(self) -> pb::registry_service_server::RegistryServiceServer<Self> {
        pb::registry_service_server::RegistryServiceServer::new(self)
    }
}

macro_rules! handlers {
    ($($rpc:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl RegistryService for RegistryGrpc {
            $(
                async fn $rpc(&self, request: Request<$req>) -> Result<Response<$resp>, Status> {
                    self.registry.$rpc(request.into_inner()).await.map(Response::new).map_err(Status::from)
                }
            )*
        }
    };
}

handlers! {
    register_person(pb::RegisterPersonRequest) -> pb::RegisterPersonResponse;
    get_person(pb::GetPersonRequest) -> pb::GetPersonResponse;
    submit_application(pb::SubmitApplicationRequest) -> pb::SubmitApplicationResponse;
    review_application(pb::ReviewApplicationRequest) -> pb::ReviewApplicationResponse;
    start_production(pb::StartProductionRequest) -> pb::StartProductionResponse;
    record_production_result(pb::RecordProductionResultRequest) -> pb::RecordProductionResultResponse;
    record_shipment_progress(pb::RecordShipmentProgressRequest) -> pb::RecordShipmentProgressResponse;
    record_collection(pb::RecordCollectionRequest) -> pb::RecordCollectionResponse;
    return_for_remake(pb::ReturnForRemakeRequest) -> pb::ReturnForRemakeResponse;
    activate_social_function(pb::ActivateSocialFunctionRequest) -> pb::ActivateSocialFunctionResponse;
    record_financial_activation(pb::RecordFinancialActivationRequest) -> pb::RecordFinancialActivationResponse;
    cancel_financial_activation(pb::CancelFinancialActivationRequest) -> pb::CancelFinancialActivationResponse;
    lock_social_function(pb::LockSocialFunctionRequest) -> pb::LockSocialFunctionResponse;
    unlock_social_function(pb::UnlockSocialFunctionRequest) -> pb::UnlockSocialFunctionResponse;
    enforce_deadline(pb::EnforceDeadlineRequest) -> pb::EnforceDeadlineResponse;
    verify_social_pin(pb::VerifySocialPinRequest) -> pb::VerifySocialPinResponse;
    change_social_pin(pb::ChangeSocialPinRequest) -> pb::ChangeSocialPinResponse;
    reset_social_pin(pb::ResetSocialPinRequest) -> pb::ResetSocialPinResponse;
    cancel_card(pb::CancelCardRequest) -> pb::CancelCardResponse;
    get_card(pb::GetCardRequest) -> pb::GetCardResponse;
    list_audit_trail(pb::ListAuditTrailRequest) -> pb::ListAuditTrailResponse;
    verify_audit_trail(pb::VerifyAuditTrailRequest) -> pb::VerifyAuditTrailResponse;
}
